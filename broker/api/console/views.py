"""What the console's pages show, built from the services and the store (read only).

Nothing here decides anything: who may see or decide a task is the approval service's business
(:class:`~broker.services.approvals.ApprovalService`), the audit record is the store's. These
functions arrange what those say for people: a template version and what changed since the last
approved one, a task's events on one time axis, the audit chain's verification status.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from broker.audit.trace import credential_warnings, describe, is_refusal

__all__ = ["credential_warnings", "describe"]
from broker.domain.audit import EventName
from broker.domain.records import Credential, Task
from broker.store import Tx, repo

#: ``broker.use.source`` values, as people name them.
USE_SOURCES: dict[str, str] = {
    "openbao": "OpenBao audit stream",
    "cloudtrail": "CloudTrail",
    "introspection": "introspection",
    "exec": "exec (reported by the agent)",
}

#: How each event is drawn on the time axis.
KINDS: dict[str, str] = {
    EventName.TASK_REQUEST: "request",
    EventName.TASK_APPROVAL: "approval",
    EventName.TASK_DECISION: "decision",
    EventName.CREDENTIAL_ISSUE: "issue",
    EventName.CREDENTIAL_USE: "use",
    EventName.CREDENTIAL_REVOKE: "revoke",
    EventName.CREDENTIAL_EXPIRE: "expire",
    EventName.TASK_COMPLETE: "end",
    EventName.TASK_EXPIRE: "expire",
    EventName.REQUEST_DENIED: "refusal",
}
KIND_LABELS: dict[str, str] = {
    "request": "Request",
    "approval": "Approver's decision",
    "decision": "Decision",
    "issue": "Issuance",
    "use": "Use",
    "revoke": "Revocation",
    "expire": "Expiry",
    "end": "End",
    "refusal": "Refused attempt",
    "other": "Event",
}


def kind_of(event: Mapping[str, Any]) -> str:
    """How an event is drawn: every refused attempt as a refusal, never as a decision."""
    if is_refusal(event):
        return "refusal"
    return KINDS.get(str(event["name"]), "other")


def when(ts: float | None) -> str:
    """A time as ``2024-05-01 12:34:56 UTC``."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(ts: float | None) -> str:
    """A time as RFC 3339, for ``<time datetime=...>``."""
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float | None) -> str:
    """``15 min``, ``1 h 30 min``, ``45 s``."""
    if seconds is None:
        return "-"
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.3g} s"
    s = round(seconds)
    if s < 120:
        return f"{s} s"
    hours, rest = divmod(s, 3600)
    minutes = rest // 60
    if hours and minutes:
        return f"{hours} h {minutes} min"
    return f"{hours} h" if hours else f"{minutes} min"


# --- template versions ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Change:
    """One setting of a template that differs between two versions."""

    path: str
    before: Any
    after: Any

    @property
    def kind(self) -> str:
        if self.before is _ABSENT:
            return "added"
        if self.after is _ABSENT:
            return "removed"
        return "changed"


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT: Any = _Absent()


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as dotted paths; lists and scalars are leaves."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key in sorted(value):
            out.update(flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def template_changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[Change]:
    """What differs between two template bodies, setting by setting."""
    old, new = flatten(before), flatten(after)
    return [
        Change(path, old.get(path, _ABSENT), new.get(path, _ABSENT))
        for path in sorted(set(old) | set(new))
        if old.get(path, _ABSENT) != new.get(path, _ABSENT)
    ]


@dataclass
class VersionView:
    """The template version a task was requested under, and how it compares."""

    hash: str
    first_seen_at: float | None
    body: dict[str, Any] | None
    #: The backend settings: what the credential will grant.
    grants: dict[str, Any]
    #: The last approved task of the scope under another or the same version (None: none yet).
    last_approved: dict[str, Any] | None
    #: Changes from the last approved version to this one (empty: the same version).
    changes: list[Change]
    #: The version in force now differs from this one (an approval would be refused).
    superseded: bool


def version_view(conn: Tx, task: Task, current_hash: str | None) -> VersionView:
    """The task's template version, what it grants, and what changed since the last approval."""
    row = repo.get_template_version(conn, task.template_hash)
    body: dict[str, Any] | None = dict(row["body"]) if row else None
    last = repo.last_approved_version(conn, task.scope, exclude_task=task.id)
    changes: list[Change] = []
    if last is not None and last["template_hash"] != task.template_hash and body is not None:
        before = repo.get_template_version(conn, last["template_hash"])
        if before is not None:
            changes = template_changes(before["body"], body)
    return VersionView(
        hash=task.template_hash,
        first_seen_at=float(row["first_seen_at"]) if row else None,
        body=body,
        grants=flatten((body or {}).get("backend") or {}),
        last_approved=last,
        changes=changes,
        superseded=current_hash != task.template_hash,
    )


# --- the timeline ------------------------------------------------------------------------


@dataclass
class Mark:
    """One event on a lane."""

    x: float
    kind: str
    title: str
    outcome: str


@dataclass
class Lane:
    """A row of the time axis: the task itself, or one credential from issuance to its end."""

    key: str
    title: str
    detail: str
    marks: list[Mark] = field(default_factory=list)
    #: The credential's lifetime on the axis, as (start, end) percentages.
    bar: tuple[float, float] | None = None
    #: The bar runs past the right edge (the credential is still valid).
    open_end: bool = False


@dataclass
class Row:
    """One event in the list under the axis."""

    seq: int
    time: float
    offset: str
    kind: str
    lane: str
    text: str
    source: str | None
    outcome: str
    actor: str | None
    name: str
    hash: str
    attributes: dict[str, Any]


@dataclass
class Timeline:
    """A task's events on one time axis."""

    start: float
    end: float
    lanes: list[Lane]
    rows: list[Row]
    ticks: list[tuple[float, str, str]]
    #: Where "now" is on the axis, when the task is still open.
    now_x: float | None
    counts: dict[str, int]


def _offset(seconds: float) -> str:
    if seconds < 60:
        return f"+{seconds:.3f} s"
    return f"+{duration(seconds)}"


def build_timeline(
    task: Task, credentials: Sequence[Credential], events: Sequence[Mapping[str, Any]], now: float
) -> Timeline:
    """Lay the task's events out on one axis: a lane for the task, one per credential."""
    times = [float(e["time"]) for e in events] or [task.created_at]
    start = min([task.created_at, *times])
    end = max(times)
    still_open = not task.state.terminal
    if still_open:
        end = max(end, now)
    span = max(end - start, 1e-3)

    def x(t: float) -> float:
        return round(1 + 98 * min(max((t - start) / span, 0.0), 1.0), 3)

    lanes: dict[str, Lane] = {
        "task": Lane("task", "Task", f"{task.scope} requested by {task.subject}")
    }
    for cred in credentials:
        # From the intent (recorded before the backend call) to revocation or expiry.
        begin = min(cred.created_at, cred.issued_at or cred.created_at)
        finish = cred.revoked_at
        open_end = False
        if finish is None and cred.expires_at is not None:
            finish = cred.expires_at if cred.expires_at <= end else end
            open_end = cred.expires_at > end
        lanes[cred.id] = Lane(
            cred.id,
            cred.id,
            f"{cred.kind} via {cred.backend}, {cred.state.value}",
            bar=(x(begin), x(finish if finish is not None else end)),
            open_end=open_end,
        )
    rows: list[Row] = []
    counts: dict[str, int] = {}
    for event in events:
        name = str(event["name"])
        kind = kind_of(event)
        attrs: dict[str, Any] = dict(event.get("attributes") or {})
        source = attrs.get("broker.use.source") if kind == "use" else None
        lane_key = str(event.get("credential_id") or "task")
        if lane_key not in lanes:
            lanes[lane_key] = Lane(lane_key, lane_key, "credential")
        text = describe(event)
        label = KIND_LABELS[kind] + (f" ({USE_SOURCES.get(str(source), source)})" if source else "")
        t = float(event["time"])
        lanes[lane_key].marks.append(
            Mark(x(t), kind, f"{label} at {when(t)}: {text}", str(event["outcome"]))
        )
        counts[kind] = counts.get(kind, 0) + 1
        actor = event.get("actor_subject")
        rows.append(
            Row(
                seq=int(event["seq"]),
                time=t,
                offset=_offset(t - start),
                kind=kind,
                lane=lane_key,
                text=text,
                source=USE_SOURCES.get(str(source), str(source)) if source else None,
                outcome=str(event["outcome"]),
                actor=str(actor) if actor else None,
                name=name,
                hash=str(event["hash"]),
                attributes=attrs,
            )
        )
    rows.sort(key=lambda r: (r.time, r.seq))
    ticks = []
    for i in range(5):
        t = start + span * i / 4
        ticks.append(
            (
                x(t),
                datetime.fromtimestamp(t, UTC).strftime("%H:%M:%S"),
                _offset(t - start) if i else "",
            )
        )
    return Timeline(
        start=start,
        end=end,
        lanes=list(lanes.values()),
        rows=rows,
        ticks=ticks,
        now_x=x(now) if still_open else None,
        counts=counts,
    )


# --- the audit chain -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainStatus:
    """The outcome of the last full verification of the audit chain."""

    checked_at: float
    report: dict[str, Any]

    @property
    def ok(self) -> bool:
        return bool(self.report.get("ok"))


class ChainStatusCache:
    """Keeps the last (streaming, full) verification; runs it again after ``interval`` seconds."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last: ChainStatus | None = None

    def get(
        self, interval: float, verify: Callable[[], dict[str, Any]], *, force: bool = False
    ) -> ChainStatus:
        """The latest status, from ``verify()`` when the last one is older than ``interval``."""
        with self._lock:
            last = self._last
            if not force and last is not None and self._clock() - last.checked_at < interval:
                return last
            report = verify()
            self._last = ChainStatus(self._clock(), report)
            return self._last
