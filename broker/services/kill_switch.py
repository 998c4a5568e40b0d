"""Kill switches for credentials a backend cannot revoke one by one (AWS STS).

The store holds the desired deny entries (table ``kill_switches``); each role's inline policy is
rendered from them and written to IAM. Entries expire when every credential they could concern
has expired, and the policy shrinks again. Several replicas may write the same role's policy at
once; each write renders *all* live entries from the store, and the reaper re-reads IAM and
re-writes any role whose policy differs, so a lost update lasts one reconcile interval at most.

Kinds:

- ``source_identity``: deny the sessions of one task (their ``aws:SourceIdentity``);
- ``issued_before``: deny every session of a role issued before a moment (``aws:TokenIssueTime``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.backends.sts_rules import MAX_DURATION
from broker.domain.audit import AuditEvent, Outcome, new_trace_id
from broker.domain.ids import new_id
from broker.domain.principal import Principal
from broker.domain.records import Credential
from broker.errors import InvalidRequest, NotFound, ServiceUnavailable
from broker.services.common import Clock, record
from broker.store import Database, repo

log = logging.getLogger(__name__)

SOURCE_IDENTITY = "source_identity"
ISSUED_BEFORE = "issued_before"
#: A role-wide kill switch denies sessions issued up to this many seconds after it was set, so
#: that a clock running behind AWS's cannot let a just-issued session through.
CLOCK_MARGIN = 30.0
#: How long after an entry's expiry the reaper still checks its role (to delete the policy).
RECONCILE_TAIL = 3600.0
#: Audit event names of kill-switch actions by operators.
EVENT_SET = "broker.kill_switch.set"
EVENT_LIFT = "broker.kill_switch.lift"


@runtime_checkable
class KillSwitchBackend(Protocol):
    """What a deny-list backend offers: read and write one role's kill-switch policy."""

    name: str

    def read_kill_switch(self, role_arn: str) -> dict[str, Any] | None: ...

    def write_kill_switch(
        self, role_arn: str, source_identities: Iterable[str], issued_before: float | None
    ) -> dict[str, Any] | None: ...


@dataclass(frozen=True, slots=True)
class KillSwitch:
    """One deny entry."""

    id: str
    backend: str
    target: str
    kind: str
    value: str
    reason: str
    created_by: str
    created_at: float
    expires_at: float
    task_id: str | None = None
    credential_id: str | None = None
    lifted_at: float | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> KillSwitch:
        return cls(**{k: row[k] for k in cls.__slots__})


def _actor(actor: Principal | None) -> str:
    return f"{actor.issuer}#{actor.subject}" if actor else "broker"


class KillSwitches:
    """Sets, lifts and reconciles kill switches."""

    def __init__(self, db: Database, backend: KillSwitchBackend | None, clock: Clock) -> None:
        self.db = db
        self.backend = backend
        self.clock = clock

    def _require_backend(self) -> KillSwitchBackend:
        if self.backend is None:
            raise ServiceUnavailable(
                "the aws_sts backend is not configured", code="backend_not_configured"
            )
        return self.backend

    # --- setting ----------------------------------------------------------------------------

    def deny_credential(
        self, cred: Credential, *, reason: str, actor: Principal | None = None
    ) -> KillSwitch:
        """Deny a task's STS sessions until the credential expires; applied to IAM at once."""
        backend = self._require_backend()
        role_arn = cred.details.get("role_arn")
        source_identity = cred.details.get("source_identity")
        if not role_arn or not source_identity:
            raise ServiceUnavailable(
                "the credential's record lacks its role or source identity",
                code="kill_switch_impossible",
                internal=f"credential {cred.id} details {sorted(cred.details)}",
            )
        now = self.clock()
        until = (
            float(cred.expires_at or cred.details.get("max_expires_at") or now + MAX_DURATION)
            + CLOCK_MARGIN
        )
        with self.db.write() as conn:
            existing = [
                KillSwitch.of(r)
                for r in repo.kill_switches(conn, target=str(role_arn), live_at=now)
                if r["kind"] == SOURCE_IDENTITY and r["value"] == source_identity
            ]
            if existing and existing[0].expires_at >= until:
                entry = existing[0]
            else:
                entry = KillSwitch(
                    id=new_id("kill"),
                    backend=backend.name,
                    target=str(role_arn),
                    kind=SOURCE_IDENTITY,
                    value=str(source_identity),
                    reason=reason[:500],
                    created_by=_actor(actor),
                    created_at=now,
                    expires_at=until,
                    task_id=cred.task_id,
                    credential_id=cred.id,
                )
                repo.insert_kill_switch(conn, **_row(entry))
        self.apply(str(role_arn))
        return entry

    def kill_role(self, role_arn: str, *, actor: Principal, reason: str) -> KillSwitch:
        """Deny every session of ``role_arn`` issued until now (plus a clock margin)."""
        backend = self._require_backend()
        if not role_arn.startswith("arn:aws") or ":role/" not in role_arn:
            raise InvalidRequest("role_arn must be an IAM role ARN", code="invalid_role_arn")
        now = self.clock()
        entry = KillSwitch(
            id=new_id("kill"),
            backend=backend.name,
            target=role_arn,
            kind=ISSUED_BEFORE,
            value=f"{now + CLOCK_MARGIN:.3f}",
            reason=reason[:500],
            created_by=_actor(actor),
            created_at=now,
            # Sessions last 12 hours at most: after that nothing issued before is alive.
            expires_at=now + CLOCK_MARGIN + MAX_DURATION,
        )
        with self.db.write() as conn:
            repo.insert_kill_switch(conn, **_row(entry))
            self._audit(conn, EVENT_SET, entry, actor)
        self.apply(role_arn)
        return entry

    def lift(self, switch_id: str, *, actor: Principal, reason: str) -> KillSwitch:
        """Lift an entry early (the sessions it denied work again if still unexpired)."""
        self._require_backend()
        now = self.clock()
        with self.db.write() as conn:
            row = repo.lift_kill_switch(conn, switch_id, now)
            if row is None:
                raise NotFound("no such live kill switch", code="unknown_kill_switch")
            entry = KillSwitch.of(row)
            self._audit(conn, EVENT_LIFT, entry, actor, reason=reason)
        self.apply(entry.target)
        return entry

    def _audit(
        self,
        conn: Any,
        name: str,
        entry: KillSwitch,
        actor: Principal | None,
        reason: str | None = None,
    ) -> None:
        record(
            conn,
            AuditEvent(
                name=name,
                outcome=Outcome.SUCCESS,
                time=self.clock(),
                trace_id=new_trace_id(),
                task_id=entry.task_id,
                credential_id=entry.credential_id,
                actor_issuer=actor.issuer if actor else None,
                actor_subject=actor.subject if actor else None,
                attributes={
                    "broker.kill_switch.id": entry.id,
                    "broker.kill_switch.kind": entry.kind,
                    "broker.kill_switch.target": entry.target,
                    "broker.kill_switch.value": entry.value,
                    "broker.kill_switch.expires_at": entry.expires_at,
                    "broker.kill_switch.reason": reason or entry.reason,
                    "broker.backend": entry.backend,
                },
            ),
        )

    # --- applying -----------------------------------------------------------------------------

    def live(self, role_arn: str | None = None) -> list[KillSwitch]:
        with self.db.read() as conn:
            rows = repo.kill_switches(conn, target=role_arn, live_at=self.clock())
        return [KillSwitch.of(r) for r in rows]

    def all(self, limit: int = 1000) -> list[KillSwitch]:
        with self.db.read() as conn:
            return [KillSwitch.of(r) for r in repo.kill_switches(conn, limit=limit)]

    def _desired(self, role_arn: str) -> tuple[list[str], float | None]:
        entries = self.live(role_arn)
        identities = [e.value for e in entries if e.kind == SOURCE_IDENTITY]
        moments = [float(e.value) for e in entries if e.kind == ISSUED_BEFORE]
        return identities, (max(moments) if moments else None)

    def apply(self, role_arn: str) -> dict[str, Any] | None:
        """Write the role's policy from the store's live entries (raises ``ServiceUnavailable``)."""
        backend = self._require_backend()
        identities, issued_before = self._desired(role_arn)
        return backend.write_kill_switch(role_arn, identities, issued_before)

    def reconcile(self) -> int:
        """Re-write every role whose IAM policy differs from the store; returns how many."""
        if self.backend is None:
            return 0
        backend = self.backend
        from broker.backends.sts_rules import kill_switch_document

        now = self.clock()
        with self.db.read() as conn:
            targets = repo.kill_switch_targets(conn, now - RECONCILE_TAIL)
        fixed = 0
        for backend_name, role_arn in targets:
            if backend_name != backend.name:
                continue
            identities, issued_before = self._desired(role_arn)
            desired = kill_switch_document(identities, issued_before)
            try:
                actual = backend.read_kill_switch(role_arn)
                if _normalise(actual) != _normalise(desired):
                    backend.write_kill_switch(role_arn, identities, issued_before)
                    fixed += 1
            except ServiceUnavailable as exc:
                log.warning("kill switch of %s not reconciled: %s", role_arn, exc.code)
        return fixed


def _row(entry: KillSwitch) -> dict[str, Any]:
    return {k: getattr(entry, k) for k in KillSwitch.__slots__}


def _normalise(document: dict[str, Any] | None) -> Any:
    """Compare policies regardless of list order and single-value lists."""
    if document is None:
        return None

    def norm(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: norm(v) for k, v in sorted(value.items())}
        if isinstance(value, list):
            items = [norm(v) for v in value]
            if len(items) == 1:
                return items[0]
            return sorted(items, key=repr)
        return value

    return norm(document)
