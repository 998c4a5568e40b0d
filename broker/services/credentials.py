"""Minting: the intent recorded first, the backend call, then the issuance record (fail closed).

    1. one write transaction: the task may mint (``tasks.authorize_mint``), the template renders
       with the task's parameters, the backend's ``plan`` accepts the request, and the intent
       (credential ``minting``, with the plan's identifiers) is stored;
    2. the backend call, outside any transaction;
    3. one write transaction: the credential ``active``, the task ``active``, the issuance event.

A backend that refuses or is down leaves the credential ``failed`` and the task approved: nothing
was issued, so the approval is not spent and the agent may retry (the same ``Idempotency-Key``
too), up to ``MAX_MINT_FAILURES`` attempts, after which the task ends ``failed``. A backend whose
answer was lost leaves the credential ``revoke_pending`` for the reaper. A scope misconfigured at
its backend (``ScopeMisconfigured``) is reported to the agent as such, its cause logged and kept
for ``/readyz`` (``ScopeHealth``). If step 3 cannot be written, or the task ended meanwhile,
what was minted is revoked before the error is returned. If the broker dies between 2 and 3, the
reaper finds the stale intent and revokes whatever it made.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from broker.backends.base import Backend, Minted, MintOutcomeUnknown, MintRequest
from broker.domain.audit import AuditEvent, EventName, Outcome
from broker.domain.ids import new_id
from broker.domain.records import Credential, Session, Task
from broker.domain.task import MAX_MINT_FAILURES, CredentialState, TaskState, failed_mints
from broker.errors import BrokerError, Conflict, NotFound, ScopeMisconfigured, ServiceUnavailable
from broker.scopes.loader import LoadedTemplate, ScopeCatalog
from broker.scopes.render import render_backend
from broker.services.common import Clock, record
from broker.services.revocation import Revoker
from broker.services.scope_health import ScopeHealth
from broker.services.tasks import (
    Notifier,
    UnknownTask,
    audit_task_refusal,
    audit_unreachable,
    authorize_mint,
    fail_task,
    reachable_task,
    task_attributes,
)
from broker.settings import Settings
from broker.store import Database, Tx, repo

log = logging.getLogger(__name__)

#: Which broker backend serves each template backend type.
BACKEND_FOR_TYPE = {
    "vault_token": "vault",
    "vault_database": "vault",
    "aws_sts": "aws_sts",
    "broker_jwt": "broker_jwt",
    "github_app": "github",
}
#: Credential details worth copying onto the issuance span (never a secret).
_SPAN_DETAILS = (
    "policies",
    "num_uses",
    "role",
    "username",
    "accessor",
    "role_arn",
    "assumed_role_arn",
    "source_identity",
    "role_session_name",
    "packed_policy_size",
    "audience",
    "kid",
    "installation_id",
    "hashed_token",
)
#: Slack added to an intent's expiry bound (the backend's clock, the call's duration).
INTENT_SLACK = 60.0


@dataclass(frozen=True, slots=True)
class Issued:
    credential: Credential
    minted: Minted


class _TaskEnded(Exception):
    """The task left ``approved`` while its credential was being minted."""


class CredentialService:
    """Mints the credential of an approved task."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: ScopeCatalog,
        backends: Mapping[str, Backend],
        clock: Clock,
        *,
        revoker: Revoker | None = None,
        notifier: Notifier | None = None,
        scope_health: ScopeHealth | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.backends = backends
        self.clock = clock
        self.revoker = revoker or Revoker(db, backends, clock)
        self.notifier = notifier
        self.scope_health = scope_health or ScopeHealth()

    def mint(self, session: Session, task_id: str, idempotency_key: str | None = None) -> Issued:
        """Mint the task's credential; the secret is in the result only."""
        now = self.clock()
        # 1. Check the task and record the intent, in one transaction.
        try:
            task, refusal, planned = self._authorize(session, task_id, idempotency_key, now)
        except UnknownTask as unknown:  # nothing was written: audit the refusal on its own
            audit_unreachable(self.db, now, session, unknown, "mint")
            raise
        if refusal is not None:
            raise refusal  # after the commit: the refusal's audit event is kept
        assert planned is not None
        cred, request, backend = planned
        # 2. The backend call, outside any transaction.
        try:
            minted = backend.mint(request)
        except MintOutcomeUnknown as exc:
            self._record_failure(task, cred, exc, outcome_unknown=True)
            raise
        except ScopeMisconfigured as exc:
            misconfigured = self._misconfigured(task, exc, self._loaded(task.scope))
            self._record_failure(task, cred, misconfigured, outcome_unknown=False)
            raise misconfigured from None
        except BrokerError as exc:
            self._record_failure(task, cred, exc, outcome_unknown=False)
            raise
        except Exception as exc:  # a backend library failing in an unplanned way
            error = MintOutcomeUnknown(
                "the backend failed while minting; nothing was issued",
                code="backend_error",
                internal=repr(exc)[:500],
            )
            log.exception("backend %s failed while minting %s", backend.name, cred.id)
            self._record_failure(task, cred, error, outcome_unknown=True)
            raise error from None
        if self.settings.dev_mode and self.settings.dev_fault == "pause_after_mint":
            self._pause_for_crash_test(cred.id)
        # 3. The issuance record; if it cannot be written, revoke and fail closed.
        issued = self._record_issue(session, task, cred, request, backend, minted, now)
        self.scope_health.healthy(task.scope)
        return issued

    def _misconfigured(
        self, task: Task, exc: ScopeMisconfigured, loaded: LoadedTemplate | None
    ) -> ScopeMisconfigured:
        """The agent learns the scope is misconfigured and who owns it; the cause goes to the
        log and ``/readyz`` (it names policies and roles the agent has no business knowing)."""
        cause = exc.internal or exc.detail
        self.scope_health.misconfigured(task.scope, cause, self.clock())
        owner = loaded.template.owner if loaded is not None else None
        return ScopeMisconfigured(
            f"the scope {task.scope!r} is misconfigured at its backend; nothing was issued "
            "and retrying will not help until it is fixed"
            + (f" (its owner: {owner})" if owner else ""),
            internal=cause,
            extra={"scope": task.scope, **({"owner": owner} if owner else {})},
        )

    # --- step 1 ---------------------------------------------------------------------------

    def _authorize(
        self, session: Session, task_id: str, idempotency_key: str | None, now: float
    ) -> tuple[Task, BrokerError | None, tuple[Credential, MintRequest, Backend] | None]:
        """Step 1 in one transaction: the refusal (audited, committed) or the recorded intent."""
        refusal: BrokerError | None = None
        planned: tuple[Credential, MintRequest, Backend] | None = None
        with self.db.write() as conn:
            task = reachable_task(conn, session, task_id, for_update=True)
            own_refusal: BrokerError | None = None
            if idempotency_key:
                own_refusal = self._replayed(conn, task, idempotency_key)
            if own_refusal is None:
                loaded = self._loaded(task.scope)
                # Audits its own refusals (and may end a lapsed task: commit, do not roll back).
                refusal = authorize_mint(
                    conn, task, loaded, now, session_id=session.id, notifier=self.notifier
                )
                if refusal is None:
                    assert loaded is not None
                    try:
                        planned = self._intent(conn, session, task, loaded, now, idempotency_key)
                    except BrokerError as exc:
                        own_refusal = exc
            if own_refusal is not None:
                audit_task_refusal(conn, task, own_refusal, now, session_id=session.id)
                refusal = own_refusal
        return task, refusal, planned

    @staticmethod
    def _replayed(conn: Tx, task: Task, key: str) -> BrokerError | None:
        previous = repo.credential_by_idempotency_key(conn, task.id, key)
        if previous is None:
            return None
        if previous.state is CredentialState.MINTING:
            return Conflict(
                "a mint with this Idempotency-Key is under way; retry shortly",
                code="mint_in_progress",
                extra={"credential_id": previous.id},
            )
        return Conflict(
            "a credential was already issued for this Idempotency-Key; secrets are shown once",
            code="already_issued",
            extra={"credential_id": previous.id, "state": previous.state.value},
        )

    def _loaded(self, scope: str) -> LoadedTemplate | None:
        try:
            return self.catalog.get(scope)
        except NotFound:
            return None

    def _intent(
        self,
        conn: Tx,
        session: Session,
        task: Task,
        loaded: LoadedTemplate,
        now: float,
        idempotency_key: str | None,
    ) -> tuple[Credential, MintRequest, Backend]:
        template = loaded.template
        spec = render_backend(template, task.params, forbidden=loaded.forbidden_policies)
        backend_name = BACKEND_FOR_TYPE[spec.type]
        backend = self.backends.get(backend_name)
        if backend is None:
            raise ServiceUnavailable(
                f"the {backend_name} backend is not configured", code="backend_not_configured"
            )
        # The task ends with the session that requested it (the reaper ends it then), so its
        # credential lives no longer than that session nor the one minting it.
        owner = (
            session if task.session_id == session.id else repo.get_session(conn, task.session_id)
        )
        ttl = int(
            min(
                task.ttl,
                template.ttl.max,
                self.settings.credential_max_ttl,
                session.expires_at - now,
                (owner.expires_at if owner is not None else now) - now,
            )
        )
        if ttl < 1:
            raise Conflict("the session ends too soon to issue a credential", code="session_ending")
        request = MintRequest(
            task_id=task.id,
            credential_id=new_id("crd"),
            scope=task.scope,
            issuer=task.issuer,
            subject=task.subject,
            ttl=ttl,
            spec=spec,
            params=task.params,
            max_uses=template.max_uses,
            session_id=session.id,
            cluster=self.settings.cluster_name,
        )
        planned = backend.plan(request)  # pure: refusals here leave nothing behind
        request = replace(request, planned=planned)
        cred = Credential(
            id=request.credential_id,
            task_id=task.id,
            backend=backend_name,
            kind=spec.type,
            state=CredentialState.MINTING,
            created_at=now,
            # An upper bound until the backend says: what the reaper may have to deny or wait out.
            expires_at=now + ttl + INTENT_SLACK,
            details=dict(planned),
            idempotency_key=idempotency_key,
        )
        repo.insert_credential(conn, cred)
        repo.update_task(conn, task.id, mints=task.mints + 1, updated_at=now)
        return cred, request, backend

    # --- step 2 failures ------------------------------------------------------------------

    def _record_failure(
        self, task: Task, cred: Credential, exc: BrokerError, *, outcome_unknown: bool
    ) -> None:
        """Nothing was issued: the task may mint again (the same Idempotency-Key too).

        When the backend may have created something anyway, the credential stays for the
        reaper to revoke (``revoke_pending``, no handle); otherwise it is ``failed``.
        """
        now = self.clock()
        details = {**cred.details, "error_code": exc.code}
        with self.db.write() as conn:
            if outcome_unknown:
                state = CredentialState.REVOKE_PENDING
                repo.update_credential(
                    conn,
                    cred.id,
                    state=state,
                    idempotency_key=None,
                    next_attempt_at=now,
                    last_error=(exc.internal or exc.detail)[:500],
                    # Whatever the backend made, it made before this: it bounds an STS
                    # session's issue time, and a lease's creation, for the reaper.
                    details={**details, "mint_call_ended_at": now},
                )
            else:
                state = CredentialState.FAILED
                repo.update_credential(
                    conn,
                    cred.id,
                    state=state,
                    idempotency_key=None,
                    last_error=(exc.internal or exc.detail)[:500],
                    details=details,
                )
            repo.update_task(conn, task.id, mints=task.mints, updated_at=now)
            record(
                conn,
                AuditEvent(
                    name=EventName.CREDENTIAL_ISSUE,
                    outcome=Outcome.FAILURE,
                    time=now,
                    trace_id=task.trace_id,
                    parent_span_id=task.span_id,
                    task_id=task.id,
                    credential_id=cred.id,
                    actor_issuer=task.issuer,
                    actor_subject=task.subject,
                    attributes={
                        **task_attributes(task),
                        "broker.credential.id": cred.id,
                        "broker.backend": cred.backend,
                        "broker.error.code": exc.code,
                        "broker.error.detail": exc.detail,
                        "broker.credential.state": state.value,
                        "broker.credential.outcome_unknown": outcome_unknown,
                    },
                ),
            )
            current = repo.get_task(conn, task.id, for_update=True)
            failed = failed_mints(repo.credentials_for(conn, task.id))
            if (
                current is not None
                and current.state is TaskState.APPROVED
                and current.mints == 0
                and len(failed) >= MAX_MINT_FAILURES
            ):
                fail_task(
                    conn,
                    current,
                    now,
                    reason=f"no credential was issued: {len(failed)} mints failed "
                    f"(the limit), the last with {exc.code}",
                )

    def _pause_for_crash_test(self, credential_id: str) -> None:
        """Test hook (dev mode only): announce the pause in a file, then wait to be killed."""
        folder = self.settings.data_dir / "faults"
        folder.mkdir(parents=True, exist_ok=True)
        marker = folder / f"{credential_id}.paused"
        marker.write_text(str(os.getpid()))
        log.warning("dev_fault: paused after minting %s", credential_id)
        threading.Event().wait()

    # --- step 3 ---------------------------------------------------------------------------

    def _record_issue(
        self,
        session: Session,
        task: Task,
        cred: Credential,
        request: MintRequest,
        backend: Backend,
        minted: Minted,
        started: float,
    ) -> Issued:
        issued_at = self.clock()
        details = {**cred.details, **minted.details}
        try:
            with self.db.write() as conn:
                if not repo.update_credential(
                    conn,
                    cred.id,
                    expect=[CredentialState.MINTING],
                    state=CredentialState.ACTIVE,
                    handle=minted.handle,
                    issued_at=issued_at,
                    expires_at=minted.expires_at,
                    details=details,
                    sealed=minted.sealed,
                ) or not repo.update_task(
                    conn,
                    task.id,
                    expect=TaskState.APPROVED,
                    state=TaskState.ACTIVE,
                    updated_at=issued_at,
                    # A credential the backend cannot shorten (a GitHub token lives an hour)
                    # still ends with the task's TTL: the reaper revokes it then.
                    ends_at=min(minted.expires_at, started + request.ttl),
                ):
                    raise _TaskEnded
                record(
                    conn,
                    AuditEvent(
                        name=EventName.CREDENTIAL_ISSUE,
                        outcome=Outcome.SUCCESS,
                        time=started,
                        end_time=issued_at,
                        trace_id=task.trace_id,
                        parent_span_id=task.span_id,
                        session_id=session.id,
                        task_id=task.id,
                        credential_id=cred.id,
                        actor_issuer=task.issuer,
                        actor_subject=task.subject,
                        attributes={
                            **task_attributes(replace(task, state=TaskState.ACTIVE)),
                            "broker.credential.id": cred.id,
                            "broker.backend": backend.name,
                            "broker.credential.kind": minted.kind,
                            "broker.credential.handle": minted.handle,
                            "broker.credential.expires_at": minted.expires_at,
                            "broker.credential.ttl": request.ttl,
                            **{
                                f"broker.credential.{k}": v
                                for k, v in minted.details.items()
                                if k in _SPAN_DETAILS and v is not None
                            },
                        },
                    ),
                )
        except _TaskEnded:
            self._take_back(task, cred, minted, details, reason="task ended while minting")
            raise Conflict(
                "the task ended while its credential was being minted; it was revoked",
                code="task_ended",
            ) from None
        except BrokerError:
            self._take_back(task, cred, minted, details, reason="issuance record failed")
            raise
        cred = replace(
            cred,
            state=CredentialState.ACTIVE,
            handle=minted.handle,
            issued_at=issued_at,
            expires_at=minted.expires_at,
            details=details,
        )
        return Issued(cred, minted)

    def _take_back(
        self, task: Task, cred: Credential, minted: Minted, details: dict[str, Any], *, reason: str
    ) -> None:
        """Revoke what was minted but not recorded; if that fails too, the reaper will."""
        made = replace(
            cred,
            handle=minted.handle,
            expires_at=minted.expires_at,
            details=details,
            sealed=minted.sealed,
        )
        try:
            self.revoker.revoke(task, made, reason=reason)
        except BrokerError:
            log.error(
                "could not revoke %s after a failed issuance record; the reaper will", cred.id
            )
