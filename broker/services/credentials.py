"""Minting: intent recorded first, backend call, then the issuance record (fail closed)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace

from broker.backends.base import Backend, Minted, MintRequest
from broker.domain.audit import AuditEvent, EventName, Outcome
from broker.domain.ids import new_id
from broker.domain.records import Credential, Session, Task
from broker.domain.task import CredentialState, TaskState
from broker.errors import (
    BrokerError,
    Conflict,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
)
from broker.scopes.loader import ScopeCatalog
from broker.services.common import Clock, record
from broker.services.tasks import task_attributes
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: Which broker backend serves each template backend type.
BACKEND_FOR_TYPE = {
    "vault_token": "vault",
    "vault_database": "vault",
    "aws_sts": "aws_sts",
    "broker_jwt": "broker_jwt",
}


@dataclass(frozen=True, slots=True)
class Issued:
    credential: Credential
    minted: Minted


class CredentialService:
    """Mints the credential of an approved task."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: ScopeCatalog,
        backends: Mapping[str, Backend],
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.backends = backends
        self.clock = clock

    def mint(self, session: Session, task_id: str, idempotency_key: str | None = None) -> Issued:
        now = self.clock()
        loaded = None
        # 1. Check the task and record the intent, in one transaction.
        with self.db.write() as conn:
            task = repo.get_task(conn, task_id, for_update=True)
            if task is None or task.requester != session.principal.key:
                raise NotFound("no such task", code="unknown_task")
            if idempotency_key:
                previous = repo.credential_by_idempotency_key(conn, task.id, idempotency_key)
                if previous is not None and previous.state is not CredentialState.FAILED:
                    raise Conflict(
                        "a credential was already issued for this Idempotency-Key; secrets are shown once",
                        code="already_issued",
                        extra={"credential_id": previous.id},
                    )
            if task.state is not TaskState.APPROVED:
                if task.state is TaskState.ACTIVE:
                    raise Conflict(
                        "this task's credential was already issued; request a new task",
                        code="already_issued",
                    )
                raise Conflict(
                    f"the task is {task.state.value}, not approved",
                    code="task_not_approved",
                    extra={"state": task.state.value},
                )
            if task.approval_expires_at is not None and now >= task.approval_expires_at:
                raise Conflict(
                    "the approval has expired; request the task again", code="approval_expired"
                )
            loaded = self.catalog.get(task.scope)
            if loaded.content_hash != task.template_hash:
                raise PreconditionFailed(
                    "the scope template changed after this task was decided; request it again",
                    code="template_changed",
                )
            template = loaded.template
            backend_name = BACKEND_FOR_TYPE[template.backend.type]
            backend = self.backends.get(backend_name)
            if backend is None:
                raise ServiceUnavailable(
                    f"the {backend_name} backend is not configured", code="backend_not_configured"
                )
            ttl = int(
                min(
                    task.ttl,
                    template.ttl.max,
                    self.settings.credential_max_ttl,
                    session.expires_at - now,
                )
            )
            if ttl < 1:
                raise Conflict(
                    "the session ends too soon to issue a credential", code="session_ending"
                )
            cred = Credential(
                id=new_id("crd"),
                task_id=task.id,
                backend=backend_name,
                kind=template.backend.type,
                state=CredentialState.MINTING,
                created_at=now,
                details={},
                idempotency_key=idempotency_key,
            )
            repo.insert_credential(conn, cred)
            repo.update_task(conn, task.id, mints=task.mints + 1, updated_at=now)
        # 2. The backend call, outside any transaction.
        request = MintRequest(
            task_id=task.id,
            credential_id=cred.id,
            scope=task.scope,
            issuer=task.issuer,
            subject=task.subject,
            ttl=ttl,
            spec=template.backend,
            params=task.params,
            max_uses=template.max_uses,
        )
        try:
            minted = backend.mint(request)
        except BrokerError as exc:
            self._record_failure(task, cred, exc)
            raise
        # 3. The issuance record; if it cannot be written, revoke and fail closed.
        issued_at = self.clock()
        try:
            with self.db.write() as conn:
                repo.update_credential(
                    conn,
                    cred.id,
                    expect=[CredentialState.MINTING],
                    state=CredentialState.ACTIVE,
                    handle=minted.handle,
                    issued_at=issued_at,
                    expires_at=minted.expires_at,
                    details=minted.details,
                )
                repo.update_task(
                    conn,
                    task.id,
                    expect=TaskState.APPROVED,
                    state=TaskState.ACTIVE,
                    updated_at=issued_at,
                    ends_at=minted.expires_at,
                )
                record(
                    conn,
                    AuditEvent(
                        name=EventName.CREDENTIAL_ISSUE,
                        outcome=Outcome.SUCCESS,
                        time=now,
                        end_time=issued_at,
                        trace_id=task.trace_id,
                        parent_span_id=task.span_id,
                        session_id=session.id,
                        task_id=task.id,
                        credential_id=cred.id,
                        actor_issuer=task.issuer,
                        actor_subject=task.subject,
                        attributes={
                            **task_attributes(task),
                            "broker.credential.id": cred.id,
                            "broker.backend": backend_name,
                            "broker.credential.kind": minted.kind,
                            "broker.credential.handle": minted.handle,
                            "broker.credential.expires_at": minted.expires_at,
                            "broker.credential.ttl": ttl,
                            **{
                                f"broker.credential.{k}": v
                                for k, v in minted.details.items()
                                if k in ("policies", "num_uses", "role", "username")
                            },
                        },
                    ),
                )
        except BrokerError:
            try:
                backend.revoke(minted.kind, minted.handle, minted.details)
            except BrokerError:
                log.error(
                    "could not revoke %s after a failed issuance record; the reaper will", cred.id
                )
            raise
        cred = replace(
            cred,
            state=CredentialState.ACTIVE,
            handle=minted.handle,
            issued_at=issued_at,
            expires_at=minted.expires_at,
            details=minted.details,
        )
        return Issued(cred, minted)

    def _record_failure(self, task: Task, cred: Credential, exc: BrokerError) -> None:
        now = self.clock()
        with self.db.write() as conn:
            repo.update_credential(
                conn,
                cred.id,
                state=CredentialState.FAILED,
                last_error=(exc.internal or exc.detail)[:500],
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
                    attributes={
                        **task_attributes(task),
                        "broker.credential.id": cred.id,
                        "broker.error.code": exc.code,
                    },
                ),
            )
