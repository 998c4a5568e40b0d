"""Revoking credentials: at task end, session end, admin kill, expiry, and by the reaper.

Whatever asks, a credential is taken back the way its backend allows (``Backend.revocation``):

- ``revoke``: the backend deletes it (Vault token by accessor, database lease by lease id);
- ``deny_list``: the backend cannot (AWS STS), so a kill-switch entry denies the task's sessions
  until the credential expires;
- ``record``: nothing to delete (broker-signed JWTs); the record's state makes introspection
  answer inactive.

A backend that fails leaves the credential ``revoke_pending`` with a growing backoff; the reaper
retries until it succeeds. Every attempt is audited with its outcome.

"Revoked" is recorded only when nothing of the credential is known to live. A database lease
whose id was never seen (a mint whose answer was lost, or that the broker died in) is confirmed
gone by listing the role's live leases: one that no record accounts for, issued while the mint
may have run, may be it, so the credential stays ``revoke_pending`` (``revocation_unconfirmed``:
an error in the log, a failure event in the audit trail, a count in ``/readyz``) and is retried.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from broker.backends.base import (
    Backend,
    CredentialExpired,
    Leases,
    RevocationUnconfirmed,
    RevokeRef,
)
from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.domain.principal import Principal
from broker.domain.records import Credential, Task
from broker.domain.task import CredentialState, TaskState, can_transition
from broker.errors import BrokerError, Conflict, NotFound, ServiceUnavailable
from broker.services.common import Clock, record
from broker.services.kill_switch import KillSwitches
from broker.store import Database, repo

log = logging.getLogger(__name__)

LIVE_CREDENTIAL_STATES = (
    CredentialState.MINTING,
    CredentialState.ACTIVE,
    CredentialState.REVOKE_PENDING,
)
DONE_CREDENTIAL_STATES = (
    CredentialState.REVOKED,
    CredentialState.EXPIRED,
    CredentialState.FAILED,
)
#: A credential counts as expired this long after its recorded expiry (backend clocks differ).
EXPIRY_SKEW = 60.0
#: Retries back off exponentially (2, 4, 8, ... seconds) up to this.
MAX_BACKOFF = 300.0
#: The distance between the broker's clock and the backend's, when a lease's issue time is
#: compared with the moments the broker recorded around a mint.
CLOCK_MARGIN = 30.0
#: Kinds of dynamic database credentials (the intent records the template's type, the
#: issuance record the minted kind).
DATABASE_KINDS = ("vault_database", "vault_lease")


def backoff(attempts: int) -> float:
    """Seconds until the next revocation attempt after ``attempts`` failed ones."""
    return float(min(MAX_BACKOFF, 2.0 ** max(1, attempts)))


def revoke_ref(cred: Credential) -> RevokeRef:
    upper = cred.expires_at or cred.details.get("max_expires_at")
    return RevokeRef(
        credential_id=cred.id,
        task_id=cred.task_id,
        kind=cred.kind,
        handle=cred.handle,
        details=dict(cred.details),
        expires_at=float(upper) if upper is not None else None,
        sealed=cred.sealed,
    )


class Revoker:
    """Revokes what a task holds; failures become ``revoke_pending`` for the reaper to retry."""

    def __init__(
        self,
        db: Database,
        backends: Mapping[str, Backend],
        clock: Clock,
        kill_switches: KillSwitches | None = None,
    ) -> None:
        self.db = db
        self.backends = backends
        self.clock = clock
        self.kill_switches = kill_switches or KillSwitches(db, None, clock)

    def revoke_task(
        self, task: Task, *, reason: str, actor: Principal | None = None
    ) -> list[Credential]:
        """Revoke every credential of ``task`` that may be alive.

        A mint still under way (``minting``) is left to finish: it sees the task has ended and
        revokes what it made itself, or the reaper repairs it once it is stale.
        """
        with self.db.read() as conn:
            creds = repo.credentials_for(conn, task.id)
        return [
            self.revoke(task, cred, reason=reason, actor=actor)
            for cred in creds
            if cred.state in (CredentialState.ACTIVE, CredentialState.REVOKE_PENDING)
        ]

    def revoke(
        self, task: Task | None, cred: Credential, *, reason: str, actor: Principal | None = None
    ) -> Credential:
        """Revoke one credential and record the outcome; never raises for backend trouble."""
        error: BrokerError | None = None
        try:
            self._take_back(cred, reason=reason, actor=actor)
        except CredentialExpired:
            return self._expired(task, cred, reason=reason)
        except RevocationUnconfirmed as exc:
            error = exc
            log.error(
                "revocation of %s (%s) unconfirmed: something of it may still live; it stays "
                "revoke_pending and is retried (%s)",
                cred.id,
                cred.kind,
                exc.internal,
            )
        except BrokerError as exc:
            error = exc
            log.warning("revocation of %s failed: %s", cred.id, exc.code)
        except Exception as exc:  # a backend library's own failure must not stop the reaper
            error = ServiceUnavailable("the backend failed", internal=repr(exc)[:500])
            log.warning("revocation of %s failed: %s", cred.id, type(exc).__name__)
        return self._record(task, cred, error=error, reason=reason, actor=actor)

    def _take_back(self, cred: Credential, *, reason: str, actor: Principal | None) -> None:
        backend = self.backends.get(cred.backend)
        if backend is None:
            raise ServiceUnavailable(
                f"backend {cred.backend!r} is not configured", code="backend_not_configured"
            )
        if backend.revocation == "deny_list":
            if cred.expires_at is not None and self.clock() > cred.expires_at + EXPIRY_SKEW:
                return  # expired at the backend already: nothing left to deny
            self.kill_switches.deny_credential(cred, reason=reason, actor=actor)
        else:
            backend.revoke(revoke_ref(cred))
            if cred.handle is None and cred.kind in DATABASE_KINDS:
                self._confirm_no_lease(cred, backend)

    def _confirm_no_lease(self, cred: Credential, backend: Backend) -> None:
        """A lost database mint is gone only if no unaccounted lease of its role was issued
        while the mint may have run (from its intent until the call ended, or until now when
        the broker died in the middle). Vault's lease lookup names no owner, so a lease is
        accounted for when a credential's record holds its id."""
        mount, role = cred.details.get("mount"), cred.details.get("role")
        if not isinstance(backend, Leases) or not mount or not role:
            raise RevocationUnconfirmed(
                internal=f"{cred.id}: the intent names no mount and role to look for its lease"
            )
        leases = backend.leases(str(mount), str(role))
        with self.db.read() as conn:
            known = repo.credentials_by_handles(conn, cred.backend, [x.lease_id for x in leases])
        ended = cred.details.get("mint_call_ended_at")
        start = cred.created_at - CLOCK_MARGIN
        end = float(ended) + CLOCK_MARGIN if ended is not None else float("inf")
        suspects = sorted(
            lease.lease_id
            for lease in leases
            if lease.lease_id not in known
            and (lease.issued_at is None or start <= lease.issued_at <= end)
        )
        if suspects:
            raise RevocationUnconfirmed(
                internal=f"{cred.id}: {len(suspects)} lease(s) no record accounts for, issued "
                f"while the mint may have run: {', '.join(suspects)[:400]}"
            )

    def _record(
        self,
        task: Task | None,
        cred: Credential,
        *,
        error: BrokerError | None,
        reason: str,
        actor: Principal | None,
    ) -> Credential:
        now = self.clock()
        attempts = cred.revoke_attempts + 1
        with self.db.write() as conn:
            current = repo.get_credential(conn, cred.id, for_update=True)
            if current is not None and current.state in (
                CredentialState.REVOKED,
                CredentialState.EXPIRED,
            ):
                return current  # someone else finished it meanwhile
            # A handle learnt after the intent (a mint taken back before its record) is kept.
            handle: dict[str, Any] = (
                {"handle": cred.handle} if cred.handle and current and not current.handle else {}
            )
            if error is None:
                repo.update_credential(
                    conn,
                    cred.id,
                    **handle,
                    state=CredentialState.REVOKED,
                    revoked_at=now,
                    revoke_attempts=attempts,
                    last_error=None,
                    next_attempt_at=None,
                    sealed=None,
                )
            else:
                repo.update_credential(
                    conn,
                    cred.id,
                    **handle,
                    state=CredentialState.REVOKE_PENDING,
                    revoke_attempts=attempts,
                    last_error=f"{error.code}: {error.internal or error.detail}"[:500],
                    next_attempt_at=now + backoff(attempts),
                )
            attributes: dict[str, object] = {
                "broker.task.id": cred.task_id,
                "broker.credential.id": cred.id,
                "broker.backend": cred.backend,
                "broker.credential.kind": cred.kind,
                "broker.revoke.reason": reason,
                "broker.revoke.attempt": attempts,
            }
            backend = self.backends.get(cred.backend)
            if backend is not None:
                attributes["broker.revoke.method"] = backend.revocation
            if error is not None:
                attributes["broker.revoke.error"] = error.code
                attributes["broker.revoke.next_attempt_at"] = now + backoff(attempts)
            record(
                conn,
                AuditEvent(
                    name=EventName.CREDENTIAL_REVOKE,
                    outcome=Outcome.SUCCESS if error is None else Outcome.FAILURE,
                    time=now,
                    trace_id=task.trace_id if task else new_trace_id(),
                    parent_span_id=task.span_id if task else None,
                    task_id=cred.task_id,
                    credential_id=cred.id,
                    actor_issuer=actor.issuer if actor else None,
                    actor_subject=actor.subject if actor else None,
                    attributes=attributes,
                ),
            )
            updated = repo.get_credential(conn, cred.id)
        assert updated is not None
        return updated

    def _expired(self, task: Task | None, cred: Credential, *, reason: str) -> Credential:
        """The backend says the credential expired by itself: record ``expired``, not revoked."""
        now = self.clock()
        with self.db.write() as conn:
            current = repo.get_credential(conn, cred.id, for_update=True)
            if current is not None and current.state in (
                CredentialState.REVOKED,
                CredentialState.EXPIRED,
            ):
                return current
            repo.update_credential(
                conn,
                cred.id,
                state=CredentialState.EXPIRED,
                next_attempt_at=None,
                last_error=None,
                sealed=None,
            )
            record(
                conn,
                AuditEvent(
                    name=EventName.CREDENTIAL_EXPIRE,
                    outcome=Outcome.SUCCESS,
                    time=now,
                    trace_id=task.trace_id if task else new_trace_id(),
                    parent_span_id=task.span_id if task else None,
                    task_id=cred.task_id,
                    credential_id=cred.id,
                    attributes={
                        "broker.task.id": cred.task_id,
                        "broker.credential.id": cred.id,
                        "broker.backend": cred.backend,
                        "broker.credential.kind": cred.kind,
                        "broker.credential.expires_at": cred.expires_at,
                        "broker.revoke.reason": reason,
                    },
                ),
            )
            updated = repo.get_credential(conn, cred.id)
        assert updated is not None
        return updated

    def credentials(
        self,
        *,
        states: list[CredentialState] | None = None,
        backend: str | None = None,
        limit: int = 100,
    ) -> list[Credential]:
        """Credentials for operators, newest first (``revoke_pending`` ones are being retried)."""
        with self.db.read() as conn:
            return repo.list_credentials(conn, states=states, backend=backend, limit=limit)

    # --- admin kill -----------------------------------------------------------------------

    def kill_task(
        self, actor: Principal, task_id: str, *, reason: str
    ) -> tuple[Task, list[Credential]]:
        """An administrator ends a task at once: it becomes ``revoked`` (``cancelled`` while
        still pending) and everything it holds is taken back."""
        now = self.clock()
        with self.db.write() as conn:
            task = repo.get_task(conn, task_id, for_update=True)
            if task is None:
                raise NotFound("no such task", code="unknown_task")
            target = next(
                (
                    s
                    for s in (TaskState.REVOKED, TaskState.CANCELLED)
                    if can_transition(task.state, s)
                ),
                None,
            )
            if target is None and task.state.terminal:
                target = task.state  # already over: still revoke whatever may remain
            if target is None:
                raise Conflict(
                    f"a {task.state.value} task cannot be revoked", code="invalid_task_state"
                )
            if target is not task.state:
                repo.update_task(
                    conn,
                    task.id,
                    expect=task.state,
                    state=target,
                    updated_at=now,
                    ends_at=now,
                    reason=reason[:500],
                )
                task = replace(task, state=target, updated_at=now, ends_at=now, reason=reason)
            record(
                conn,
                AuditEvent(
                    name=EventName.TASK_COMPLETE,
                    outcome=Outcome.SUCCESS,
                    time=now,
                    trace_id=task.trace_id,
                    parent_span_id=task.span_id,
                    task_id=task.id,
                    actor_issuer=actor.issuer,
                    actor_subject=actor.subject,
                    attributes={
                        "broker.task.id": task.id,
                        "broker.scope": task.scope,
                        "broker.task.state": task.state.value,
                        "broker.revoke.reason": reason,
                        "broker.admin.action": "kill",
                    },
                ),
            )
        creds = self.revoke_task(task, reason=f"admin kill: {reason}", actor=actor)
        return task, creds

    # --- repair ---------------------------------------------------------------------------

    def repair(self, cred: Credential) -> Credential:
        """A mint that never completed (the broker died, or the backend's answer was lost):
        take back whatever it may have made, found by the metadata recorded with its intent."""
        with self.db.read() as conn:
            task = repo.get_task(conn, cred.task_id)
        return self.revoke(task, cred, reason="repair: unfinished mint")
