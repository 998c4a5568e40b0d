"""Kill switches for credentials a backend cannot revoke one by one (AWS STS).

The store holds the desired deny entries (table ``kill_switches``); each role's inline policy is
rendered from them *and* from the role's live sessions (``broker.backends.sts_deny``): ended
sessions are denied by time segments with exceptions for the live ones, so the policy's size
follows the live sessions, not how many ended. Entries expire when every credential they could
concern has expired, and the policy shrinks again. Several replicas may write the same role's
policy at once; each write renders *all* live entries from the store, and the reaper re-reads
IAM and re-writes any role whose policy differs, so a lost update lasts one reconcile interval
at most.

Kinds:

- ``source_identity``: deny one session (its ``aws:SourceIdentity``, one per credential), with
  the bounds of its issue time when known (``issued_from``/``issued_until``);
- ``issued_before``: deny every session of a role issued before a moment (``aws:TokenIssueTime``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from broker.backends import sts_deny
from broker.backends.sts_rules import MAX_DURATION
from broker.domain.audit import AuditEvent, Outcome, new_trace_id
from broker.domain.ids import new_id
from broker.domain.principal import Principal
from broker.domain.records import Credential
from broker.domain.task import CredentialState
from broker.errors import InvalidRequest, NotFound, ServiceUnavailable
from broker.services.common import Clock, record
from broker.store import Database, repo

log = logging.getLogger(__name__)

SOURCE_IDENTITY = "source_identity"
ISSUED_BEFORE = "issued_before"
#: A role-wide kill switch denies sessions issued up to this many seconds after it was set, so
#: that a clock running behind AWS's cannot let a just-issued session through. Also the slack
#: between the broker's clock and AWS's when a lost mint's issue time is bounded by the former.
CLOCK_MARGIN = 30.0
#: How long after an entry's expiry the reaper still checks its role (to delete the policy).
RECONCILE_TAIL = 3600.0
#: A credential counts as possibly valid this long past its recorded expiry.
EXPIRY_SKEW = 60.0
#: Audit event names of kill-switch actions by operators.
EVENT_SET = "broker.kill_switch.set"
EVENT_LIFT = "broker.kill_switch.lift"


@runtime_checkable
class KillSwitchBackend(Protocol):
    """What a deny-list backend offers: read, size and write one role's kill-switch policy."""

    name: str

    def read_kill_switch(self, role_arn: str) -> dict[str, Any] | None: ...

    def kill_switch_budget(self, role_arn: str) -> int:
        """Characters the kill-switch policy may use on this role (IAM's inline limit minus
        the role's other inline policies)."""
        ...

    def write_kill_switch(
        self, role_arn: str, document: dict[str, Any] | None
    ) -> dict[str, Any] | None: ...


def issue_window(cred: Credential) -> tuple[float, float] | None:
    """Bounds of the session's issue time on AWS's clock, or None when nothing bounds it.

    - issued and recorded: STS's own ``Expiration - DurationSeconds``, give or take
      :data:`~broker.backends.sts_deny.ISSUE_TIME_MARGIN`;
    - a mint whose answer was lost: between the intent and the end of the call (the broker's
      clock, with :data:`CLOCK_MARGIN` for its distance from AWS's);
    - a mint the broker died in the middle of: unknown (denied by SourceIdentity only).
    """
    details = cred.details
    duration = details.get("duration")
    if cred.handle and cred.expires_at is not None and duration:
        issued = float(cred.expires_at) - float(duration)
        margin = sts_deny.ISSUE_TIME_MARGIN
        return issued - margin, issued + margin
    ended = details.get("mint_call_ended_at")
    if ended is not None:
        return cred.created_at - CLOCK_MARGIN, float(ended) + CLOCK_MARGIN
    return None


def _exact_issue_time(entry: KillSwitch) -> float | None:
    """The issue time STS reported for an ended session, when its entry was made from it
    (a window of ``2 * ISSUE_TIME_MARGIN`` around it; a lost mint's window is wider)."""
    if entry.issued_from is None or entry.issued_until is None:
        return None
    if entry.issued_until - entry.issued_from > 2 * sts_deny.ISSUE_TIME_MARGIN + 1e-6:
        return None
    return (entry.issued_from + entry.issued_until) / 2


def _aws_issue_time(cred: Credential) -> float | None:
    duration = cred.details.get("duration")
    if cred.handle and cred.expires_at is not None and duration:
        return float(cred.expires_at) - float(duration)
    return None


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
    issued_from: float | None = None
    issued_until: float | None = None

    @classmethod
    def of(cls, row: dict[str, Any]) -> KillSwitch:
        return cls(**{k: row[k] for k in cls.__slots__})


def _actor(actor: Principal | None) -> str:
    return f"{actor.issuer}#{actor.subject}" if actor else "broker"


class KillSwitches:
    """Sets, lifts and reconciles kill switches."""

    def __init__(
        self,
        db: Database,
        backend: KillSwitchBackend | None,
        clock: Clock,
        *,
        cluster: str = "broker",
    ) -> None:
        self.db = db
        self.backend = backend
        self.clock = clock
        #: ``cluster_name``: the ``broker:cluster`` session tag every session minted carries.
        self.cluster = cluster

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
        """Deny a credential's STS session until it expires; applied to IAM at once."""
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
        window = issue_window(cred)
        issued_from, issued_until = window if window is not None else (None, None)
        with self.db.write() as conn:
            existing = [
                KillSwitch.of(r)
                for r in repo.kill_switches(
                    conn, target=str(role_arn), value=str(source_identity), live_at=now, limit=None
                )
                if r["kind"] == SOURCE_IDENTITY
            ]
            same = [
                e
                for e in existing
                if e.expires_at >= until
                and (e.issued_from, e.issued_until) == (issued_from, issued_until)
            ]
            if same:
                entry = same[0]
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
                    issued_from=issued_from,
                    issued_until=issued_until,
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
            rows = repo.kill_switches(conn, target=role_arn, live_at=self.clock(), limit=None)
        return [KillSwitch.of(r) for r in rows]

    def all(self, limit: int = 1000) -> list[KillSwitch]:
        with self.db.read() as conn:
            return [KillSwitch.of(r) for r in repo.kill_switches(conn, limit=limit)]

    def desired(self, role_arn: str) -> sts_deny.RoleDenyState:
        """What the role's policy must deny and let through, from one read of the store: the
        role's unexpired entries (light rows) and its live credentials (few)."""
        backend = self._require_backend()
        now = self.clock()
        with self.db.read() as conn:
            entries = [
                KillSwitch.of(r)
                for r in repo.kill_switches(conn, target=role_arn, unexpired_at=now, limit=None)
            ]
            lifted = {
                e.credential_id: e.value
                for e in entries
                if e.kind == SOURCE_IDENTITY and e.lifted_at is not None and e.credential_id
            }
            creds = [
                c
                for c in repo.unexpired_credentials(
                    conn,
                    backend.name,
                    now - EXPIRY_SKEW,
                    states=(CredentialState.MINTING, CredentialState.ACTIVE),
                    or_ids=sorted(lifted),
                )
                if c.details.get("role_arn") == role_arn
            ]
        live_entries = [e for e in entries if e.lifted_at is None]
        moments = [float(e.value) for e in live_entries if e.kind == ISSUED_BEFORE]
        ended: dict[str, list[KillSwitch]] = {}
        for e in live_entries:
            if e.kind == SOURCE_IDENTITY:
                ended.setdefault(e.value, []).append(e)
        issue_times = [t for e in live_entries if (t := _exact_issue_time(e)) is not None]
        live: list[sts_deny.SessionWindow] = []
        for cred in creds:
            issued = _aws_issue_time(cred)
            if issued is not None:
                issue_times.append(issued)
            sid = str(cred.details.get("source_identity") or "")
            if not sid or sid in ended:
                continue
            if cred.state is CredentialState.MINTING:
                # Under way: it may be issued at any moment, so no segment may reach it.
                live.append(sts_deny.SessionWindow(sid))
            elif cred.state is CredentialState.ACTIVE or lifted.get(cred.id) == sid:
                window = issue_window(cred)
                live.append(
                    sts_deny.SessionWindow(sid, *window)
                    if window is not None
                    else sts_deny.SessionWindow(sid)
                )
        return sts_deny.RoleDenyState(
            cluster=self.cluster,
            ended=[_ended_window(sid, group) for sid, group in sorted(ended.items())],
            live=live,
            # A mint starting after this read is issued after every recorded one (AWS's clock);
            # fewer known issue times only make the horizon earlier, which is always safe.
            horizon=max(issue_times) - sts_deny.ISSUE_TIME_MARGIN if issue_times else -math.inf,
            issued_before=max(moments) if moments else None,
        )

    def render(self, role_arn: str) -> dict[str, Any] | None:
        """The role's policy document as it must be now (``None``: nothing to deny)."""
        state = self.desired(role_arn)
        return sts_deny.document(sts_deny.plan(state), state.cluster)

    def apply(self, role_arn: str) -> dict[str, Any] | None:
        """Write the role's policy from the store (raises ``ServiceUnavailable``, e.g.
        ``kill_switch_full`` when it cannot fit IAM's limit: nothing is written then, and the
        previous policy, which denies everything it denied before, stays in force)."""
        backend = self._require_backend()
        document = self.render(role_arn)
        self._check_size(backend, role_arn, document)
        return backend.write_kill_switch(role_arn, document)

    @staticmethod
    def _check_size(
        backend: KillSwitchBackend, role_arn: str, document: dict[str, Any] | None
    ) -> None:
        if document is None:
            return
        size = sts_deny.policy_chars(document)
        budget = backend.kill_switch_budget(role_arn)
        if size > budget:
            raise ServiceUnavailable(
                "the role's kill-switch policy would exceed IAM's inline policy limit; "
                "use the role-wide kill switch",
                code="kill_switch_full",
                internal=f"{role_arn}: {size} characters, {budget} available",
            )

    def reconcile(self) -> int:
        """Re-write every role whose IAM policy differs from the store; returns how many."""
        if self.backend is None:
            return 0
        backend = self.backend
        now = self.clock()
        with self.db.read() as conn:
            targets = repo.kill_switch_targets(conn, now - RECONCILE_TAIL)
        fixed = 0
        for backend_name, role_arn in targets:
            if backend_name != backend.name:
                continue
            try:
                desired = self.render(role_arn)
                actual = backend.read_kill_switch(role_arn)
                if _normalise(actual) != _normalise(desired):
                    self._check_size(backend, role_arn, desired)
                    backend.write_kill_switch(role_arn, desired)
                    fixed += 1
            except ServiceUnavailable as exc:
                log.warning("kill switch of %s not reconciled: %s", role_arn, exc.code)
        return fixed


def _ended_window(sid: str, entries: list[KillSwitch]) -> sts_deny.SessionWindow:
    """One ended session from its entries: the hull of their windows, unknown if any is."""
    if any(e.issued_from is None or e.issued_until is None for e in entries):
        return sts_deny.SessionWindow(sid)
    return sts_deny.SessionWindow(
        sid,
        min(float(e.issued_from) for e in entries if e.issued_from is not None),
        max(float(e.issued_until) for e in entries if e.issued_until is not None),
    )


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
