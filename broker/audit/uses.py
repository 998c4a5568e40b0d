"""Join each observed use of a credential back to its issuance: one span in the task's trace.

A use record (an OpenBao audit entry, a CloudTrail event, an introspection of a broker-signed
token) is turned into an :class:`ObservedUse` by its source's parser, then :class:`UseRecorder`
finds the credential it concerns (by accessor, lease id, access key id, SourceIdentity, RoleSessionName
or jti) and writes a ``broker.credential.use`` event whose parent is the credential's
``broker.credential.issue`` span, in the same trace as the task's request, decision and revocation.

Each record is ingested once: its ``(source, record id)`` is remembered in the same transaction as
the event, so the same entry arriving from OpenBao's socket and file devices, from two replicas or
after a restart is written once. A record that claims to concern a broker credential (Vault token
metadata naming one, a session name with the broker's prefix) but matches none becomes a
``broker.use.unmatched`` event: reported, never dropped. Records that concern other clients are
counted and ignored.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.domain.audit import AuditEvent, EventName, Outcome, UseSource, new_trace_id
from broker.domain.records import Credential, Task
from broker.services.common import record
from broker.store import Database, Tx, repo

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Match:
    """One way a record may name a credential: its handle, or a value in its details."""

    kind: str  # accessor | lease_id | access_key_id | source_identity | role_session_name | jti
    backend: str
    value: str
    detail_key: str | None = None  # match ``details[detail_key]`` instead of the handle


@dataclass(frozen=True, slots=True)
class ObservedUse:
    """A source's record of one use of (perhaps) a broker credential. Never holds a secret."""

    source: UseSource
    record_id: str
    time: float
    matches: tuple[Match, ...]
    operation: str
    target: str
    outcome: str = Outcome.SUCCESS
    end_time: float | None = None
    error: str | None = None
    client_address: str | None = None
    #: The record says it concerns a broker credential (so matching none is reported).
    ours: bool = False
    #: The credential id the record itself names (Vault token metadata), cross-checked.
    claimed_credential: str | None = None
    #: Source-specific attributes (``vault.*``, ``aws.*``, ``user_agent.original``).
    attributes: dict[str, Any] = field(default_factory=dict)


class Ingested(StrEnum):
    """What became of one observed use."""

    RECORDED = "recorded"
    UNMATCHED = "unmatched"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


@dataclass
class UseCounters:
    recorded: int = 0
    unmatched: int = 0
    duplicate: int = 0
    ignored: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "recorded": self.recorded,
            "unmatched": self.unmatched,
            "duplicate": self.duplicate,
            "ignored": self.ignored,
        }


class UseRecorder:
    """Matches observed uses to credentials and records them in the audit chain."""

    def __init__(self, db: Database, clock: Callable[[], float]) -> None:
        self.db = db
        self.clock = clock
        self.counters = UseCounters()
        self._lock = threading.Lock()

    # --- matching -------------------------------------------------------------------------

    @staticmethod
    def find(conn: Tx, use: ObservedUse) -> tuple[Credential, Match] | None:
        """The credential the record names, and how it was found."""
        for match in use.matches:
            if not match.value:
                continue
            if match.kind == "credential_id":
                cred = repo.get_credential(conn, match.value)
                if cred is not None and cred.backend != match.backend:
                    cred = None
            elif match.detail_key is None:
                cred = repo.credential_by_handle(conn, match.backend, match.value)
            else:
                cred = repo.credential_by_detail(conn, match.backend, match.detail_key, match.value)
            if cred is not None:
                return cred, match
        return None

    # --- recording ------------------------------------------------------------------------

    def ingest(self, use: ObservedUse) -> Ingested:
        """Record one observed use (idempotent per ``(source, record_id)``)."""
        with self.db.read() as conn:
            found = self.find(conn, use)
        if found is None and not use.ours:
            self._count(Ingested.IGNORED)
            return Ingested.IGNORED
        now = self.clock()
        with self.db.write() as conn:
            if not repo.remember_ingested(conn, use.source, use.record_id[:256], now):
                outcome = Ingested.DUPLICATE
            elif found is None:
                record(conn, self._unmatched_event(use))
                outcome = Ingested.UNMATCHED
            else:
                cred, match = found
                task = repo.get_task(conn, cred.task_id)
                parent = repo.issuance_span(conn, cred.id)
                if task is None:  # a credential always has its task; be safe anyway
                    record(conn, self._unmatched_event(use))
                    outcome = Ingested.UNMATCHED
                else:
                    record(conn, self._use_event(use, cred, match, task, parent))
                    outcome = Ingested.RECORDED
        if outcome is Ingested.UNMATCHED:
            log.warning(
                "a %s record (%s) names a broker credential that the broker does not know",
                use.source,
                use.record_id,
            )
        self._count(outcome)
        return outcome

    def record_introspection(
        self,
        jti: str,
        *,
        active: bool,
        client: str | None = None,
        remote_address: str | None = None,
        request_id: str | None = None,
        time: float | None = None,
    ) -> Ingested:
        """Record that a broker-signed token (by its ``jti``) was presented for introspection.

        For the ``/oauth2/introspect`` endpoint: call it for every token whose broker signature is
        valid, active or not. ``client`` names the introspecting service (never its secret).
        """
        when = self.clock() if time is None else time
        use = ObservedUse(
            source=UseSource.INTROSPECTION,
            record_id=request_id or uuid.uuid4().hex,
            time=when,
            matches=(Match("jti", "broker_jwt", jti),),
            operation="introspect",
            target=client or "unknown",
            outcome=Outcome.SUCCESS if active else Outcome.DENIED,
            error=None if active else "the token is no longer active",
            client_address=remote_address,
            ours=True,
            attributes={"broker.use.introspection.active": active},
        )
        return self.ingest(use)

    def _count(self, outcome: Ingested) -> None:
        with self._lock:
            setattr(self.counters, outcome.value, getattr(self.counters, outcome.value) + 1)

    # --- events ---------------------------------------------------------------------------

    @staticmethod
    def _common(use: ObservedUse) -> dict[str, Any]:
        return {
            **use.attributes,
            "broker.use.source": use.source.value,
            "broker.use.record_id": use.record_id,
            "broker.use.operation": use.operation,
            "broker.use.target": use.target,
            "broker.use.outcome": use.outcome,
            "broker.use.error": use.error,
            "client.address": use.client_address,
        }

    def _use_event(
        self,
        use: ObservedUse,
        cred: Credential,
        match: Match,
        task: Task,
        parent: tuple[str, str] | None,
    ) -> AuditEvent:
        attrs: dict[str, Any] = {
            **self._common(use),
            "broker.task.id": task.id,
            "broker.scope": task.scope,
            "broker.principal.sub": task.subject,
            "broker.issuer": task.issuer,
            "broker.credential.id": cred.id,
            "broker.backend": cred.backend,
            "broker.credential.kind": cred.kind,
            "broker.use.matched_by": match.kind,
            # A request made *with* the credential, or an operation *on* its lease by some other
            # token (renewal, revocation, lookup; the broker's own included).
            "broker.use.kind": "lease_operation" if match.kind == "lease_id" else "request",
        }
        if task.conversation_id:
            attrs["gen_ai.conversation.id"] = task.conversation_id
        if cred.revoked_at is not None and use.time > cred.revoked_at:
            attrs["broker.use.after_revocation"] = True
        if cred.expires_at is not None and use.time > cred.expires_at:
            attrs["broker.use.after_expiry"] = True
        if use.claimed_credential and use.claimed_credential != cred.id:
            attrs["broker.use.claimed_credential"] = use.claimed_credential
        return AuditEvent(
            name=EventName.CREDENTIAL_USE,
            outcome=use.outcome,
            time=use.time,
            end_time=use.end_time if use.end_time is not None else use.time,
            trace_id=task.trace_id,
            parent_span_id=parent[1] if parent and parent[0] == task.trace_id else task.span_id,
            session_id=task.session_id,
            task_id=task.id,
            credential_id=cred.id,
            actor_issuer=task.issuer,
            actor_subject=task.subject,
            attributes=attrs,
        )

    def _unmatched_event(self, use: ObservedUse) -> AuditEvent:
        attrs = self._common(use)
        attrs["broker.use.claimed_credential"] = use.claimed_credential
        attrs["broker.use.lookup"] = [f"{m.kind}={m.value}" for m in use.matches if m.value]
        return AuditEvent(
            name=EventName.USE_UNMATCHED,
            outcome=use.outcome,
            time=use.time,
            end_time=use.end_time if use.end_time is not None else use.time,
            trace_id=new_trace_id(),
            attributes=attrs,
        )
