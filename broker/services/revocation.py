"""Revoking credentials: at task end, session end, admin kill, and by the reaper."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from broker.backends.base import Backend
from broker.domain.audit import AuditEvent, EventName, Outcome
from broker.domain.records import Credential, Task
from broker.domain.task import CredentialState
from broker.errors import BrokerError
from broker.services.common import Clock, record
from broker.store import Database, repo

log = logging.getLogger(__name__)

LIVE_CREDENTIAL_STATES = (
    CredentialState.MINTING,
    CredentialState.ACTIVE,
    CredentialState.REVOKE_PENDING,
)
MAX_BACKOFF = 300.0


class Revoker:
    """Revokes what a task holds; failures become ``revoke_pending`` for the reaper to retry."""

    def __init__(self, db: Database, backends: Mapping[str, Backend], clock: Clock) -> None:
        self.db = db
        self.backends = backends
        self.clock = clock

    def revoke_task(self, task: Task, *, reason: str) -> list[Credential]:
        with self.db.read() as conn:
            creds = [
                c for c in repo.credentials_for(conn, task.id) if c.state in LIVE_CREDENTIAL_STATES
            ]
        return [self.revoke(task, cred, reason=reason) for cred in creds if cred.handle]

    def revoke(self, task: Task, cred: Credential, *, reason: str) -> Credential:
        """Revoke one credential at its backend and record the outcome; never raises for backend trouble."""
        backend = self.backends.get(cred.backend)
        error: str | None = None
        try:
            if backend is None:
                raise BrokerError(f"backend {cred.backend!r} is not configured")
            assert cred.handle is not None
            backend.revoke(cred.kind, cred.handle, cred.details)
        except BrokerError as exc:
            error = exc.internal or exc.detail
            log.warning("revocation of %s failed: %s", cred.id, exc.code)
        now = self.clock()
        attempts = cred.revoke_attempts + 1
        with self.db.write() as conn:
            if error is None:
                repo.update_credential(
                    conn,
                    cred.id,
                    state=CredentialState.REVOKED,
                    revoked_at=now,
                    revoke_attempts=attempts,
                    last_error=None,
                    next_attempt_at=None,
                )
            else:
                repo.update_credential(
                    conn,
                    cred.id,
                    state=CredentialState.REVOKE_PENDING,
                    revoke_attempts=attempts,
                    last_error=error[:500],
                    next_attempt_at=now + min(MAX_BACKOFF, 2.0**attempts),
                )
            record(
                conn,
                AuditEvent(
                    name=EventName.CREDENTIAL_REVOKE,
                    outcome=Outcome.SUCCESS if error is None else Outcome.FAILURE,
                    time=now,
                    trace_id=task.trace_id,
                    parent_span_id=task.span_id,
                    task_id=task.id,
                    credential_id=cred.id,
                    attributes={
                        "broker.task.id": task.id,
                        "broker.credential.id": cred.id,
                        "broker.backend": cred.backend,
                        "broker.credential.kind": cred.kind,
                        "broker.revoke.reason": reason,
                        "broker.revoke.attempt": attempts,
                        **(
                            {"broker.revoke.error": "backend refused or unreachable"}
                            if error
                            else {}
                        ),
                    },
                ),
            )
            updated = repo.get_credential(conn, cred.id)
        assert updated is not None
        return updated
