"""The kill-switch policy of one IAM role: every ended STS session denied, at any volume.

STS sessions cannot be revoked. The broker denies an ended session with an inline policy on its
role; IAM caps a role's inline policies at 10,240 characters together, so one ``Deny`` entry per
ended session (what the broker wrote before) fills up after about 140 sessions. This module
renders the policy from what the broker knows instead, so its size follows the number of
sessions still *live* on the role, not the number that ended:

- **Time segments** (``BrokerKillEnded<n>``): ``Deny *`` to this cluster's sessions
  (``aws:PrincipalTag/broker:cluster``) issued within ``[A, B)`` (``aws:TokenIssueTime``), except
  the live sessions issued in that span (``StringNotEquals aws:SourceIdentity``). This is the
  IAM console's "revoke older sessions" with exceptions: a thousand ended sessions cost one
  statement.
- **Explicit denies** (``BrokerKillTasks``): ``Deny *`` by ``aws:SourceIdentity`` for ended
  sessions no segment can cover yet: issued too recently (a segment may only end before the
  *horizon*, below) or whose issue time is unknown (a mint lost in a crash).
- **Role-wide kill** (``BrokerKillIssuedBefore``): an operator's ``Deny *`` for every session issued
  before a moment, exceptions or not.

Every SourceIdentity names one credential, so a live session is never denied by an explicit
entry, and an ended one is never among a segment's exceptions.

**The horizon.** A segment must not reach sessions the broker does not know yet: a mint that
starts after the policy was computed must not fall inside a segment (it has no exception). Its
STS call starts after every recorded mint's call finished, so AWS issues it no earlier than the
newest recorded issue time; the horizon is that time minus :data:`ISSUE_TIME_MARGIN` (AWS's own
clock on both sides, so the broker's clock does not matter). Mints under way when the policy is
computed are live sessions of unknown issue time and are excepted from every segment.

Segments are chosen by a linear dynamic programme over the runs of ended sessions between live
ones: a run joins the previous segment (paying for the live sessions in the gap as exceptions),
starts a new segment (paying a statement), or is denied explicitly (paying each SourceIdentity),
whichever is cheapest. Pure: no I/O, time comes in as numbers (Unix seconds, AWS's clock).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from broker.backends.sts_rules import iso_utc

#: IAM: a role's inline policies together, in characters, whitespace excluded.
ROLE_INLINE_POLICY_MAX_CHARS = 10_240
#: Kept free of the inline budget, in case IAM counts a few characters differently.
INLINE_SAFETY_MARGIN = 240
#: How far a session's issue time may be from the one derived from STS's answer
#: (``Expiration - DurationSeconds``), and how far apart two STS hosts' clocks may be.
ISSUE_TIME_MARGIN = 2.0
#: The session tag every session of a broker cluster carries (set by ``AwsStsBackend``).
CLUSTER_TAG = "broker:cluster"

SID_EXPLICIT = "BrokerKillTasks"
SID_ISSUED_BEFORE = "BrokerKillIssuedBefore"
SID_SEGMENT = "BrokerKillEnded"


@dataclass(frozen=True, slots=True)
class SessionWindow:
    """One session the broker minted on the role: its SourceIdentity and the bounds of its
    issue time on AWS's clock (``-inf``/``inf`` when unknown)."""

    source_identity: str
    issued_from: float = -math.inf
    issued_until: float = math.inf

    @property
    def known(self) -> bool:
        return math.isfinite(self.issued_from) and math.isfinite(self.issued_until)


@dataclass(frozen=True, slots=True)
class RoleDenyState:
    """What the role's kill-switch policy must say, as the store knows it."""

    cluster: str
    #: Sessions that must be denied (ended tasks, lost mints).
    ended: Sequence[SessionWindow] = ()
    #: Sessions that must keep working (active credentials, mints under way).
    live: Sequence[SessionWindow] = ()
    #: No segment may reach this issue time (see the module docstring); ``-inf``: no segment.
    horizon: float = -math.inf
    #: The role-wide kill switch: deny every session issued before this (None: none).
    issued_before: float | None = None


@dataclass(frozen=True, slots=True)
class Segment:
    """A span of issue times ``[start, end)`` denied to the cluster, with its exceptions."""

    start: int
    end: int
    exceptions: tuple[str, ...]
    covers: tuple[str, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class DenyPlan:
    """The statements, before they become a document (for operators and tests)."""

    segments: tuple[Segment, ...]
    explicit: tuple[str, ...]
    issued_before: float | None

    @property
    def empty(self) -> bool:
        return not self.segments and not self.explicit and self.issued_before is None


def policy_chars(document: Mapping[str, Any] | str) -> int:
    """Characters IAM counts against the inline budget: the JSON text without whitespace."""
    text = document if isinstance(document, str) else compact(document)
    return sum(1 for ch in text if not ch.isspace())


def compact(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"))


def _entry_cost(source_identity: str) -> int:
    return len(source_identity) + 3  # the quotes and a comma


def _segment_statement(index: int, cluster: str, segment: Segment) -> dict[str, Any]:
    condition: dict[str, Any] = {
        "StringEquals": {f"aws:PrincipalTag/{CLUSTER_TAG}": cluster},
        "DateGreaterThanEquals": {"aws:TokenIssueTime": iso_utc(segment.start)},
        "DateLessThan": {"aws:TokenIssueTime": iso_utc(segment.end)},
    }
    if segment.exceptions:
        condition["StringNotEquals"] = {"aws:SourceIdentity": list(segment.exceptions)}
    return {
        "Sid": f"{SID_SEGMENT}{index}",
        "Effect": "Deny",
        "Action": "*",
        "Resource": "*",
        "Condition": condition,
    }


def _segment_overhead(cluster: str) -> int:
    sample = Segment(0, 0, ("x",))
    return policy_chars(_segment_statement(99, cluster, sample)) - _entry_cost("x") + 1


@dataclass
class _Run:
    """Consecutive ended sessions (in issue order) with no live session between them."""

    ended: list[SessionWindow] = field(default_factory=list)
    #: Exception cost of the live sessions between the previous run and this one.
    gap_cost: int = 0

    @property
    def explicit_cost(self) -> int:
        return sum(_entry_cost(s.source_identity) for s in self.ended)


def _runs(coverable: list[SessionWindow], live: list[SessionWindow]) -> list[_Run]:
    timed_live = [s for s in live if math.isfinite(s.issued_from)]
    items = sorted(
        [(s.issued_from, 0, s) for s in coverable] + [(s.issued_from, 1, s) for s in timed_live],
        key=lambda item: (item[0], item[1], item[2].source_identity),
    )
    runs: list[_Run] = []
    gap = 0
    for _, is_live, session in items:
        if is_live:
            gap += _entry_cost(session.source_identity)
            continue
        if not runs or gap:
            runs.append(_Run(gap_cost=gap if runs else 0))
            gap = 0
        runs[-1].ended.append(session)
    return runs


def _choose(runs: list[_Run], overhead: int) -> list[tuple[int, int]]:
    """Runs grouped into segments ``(first, last)``, the rest denied explicitly: the cheapest
    choice, in one pass (a segment over runs k..i costs ``overhead`` plus the gaps inside it)."""
    n = len(runs)
    cost = [0] * (n + 1)  # cost[i]: the cheapest plan for runs[:i]
    choice: list[tuple[str, int]] = [("none", 0)] * (n + 1)
    best_open = math.inf  # min over k of cost[k] - prefix[k] (a segment starting at run k)
    best_start = 0
    prefix = 0  # the gap costs inside runs[:i] (gap before run t counted from t = 1)
    for i, run in enumerate(runs):
        if i > 0:
            prefix += run.gap_cost
        if cost[i] - prefix < best_open:
            best_open, best_start = cost[i] - prefix, i
        explicit = cost[i] + run.explicit_cost
        segment = best_open + prefix + overhead
        if segment < explicit:
            cost[i + 1], choice[i + 1] = int(segment), ("segment", best_start)
        else:
            cost[i + 1], choice[i + 1] = explicit, ("explicit", i)
    groups: list[tuple[int, int]] = []
    i = n
    while i > 0:
        kind, start = choice[i]
        if kind == "segment":
            groups.append((start, i - 1))
            i = start
        else:
            i -= 1
    return groups[::-1]


def plan(state: RoleDenyState) -> DenyPlan:
    """The statements that deny every ended session and no live one (see the module docstring)."""
    # A SourceIdentity both ended and live (only possible with records from broker versions that
    # named sessions per task) is denied: fail closed.
    ended_ids = {e.source_identity for e in state.ended}
    live = [s for s in state.live if s.source_identity not in ended_ids]
    horizon = math.floor(state.horizon) if math.isfinite(state.horizon) else None
    coverable: list[SessionWindow] = []
    explicit: set[str] = set()
    for session in state.ended:
        if horizon is not None and session.known and session.issued_until < horizon:
            coverable.append(session)
        else:
            explicit.add(session.source_identity)
    segments: list[Segment] = []
    if coverable:
        runs = _runs(coverable, live)
        for first, last in _choose(runs, _segment_overhead(state.cluster)):
            members = [s for run in runs[first : last + 1] for s in run.ended]
            start = math.floor(min(s.issued_from for s in members))
            assert horizon is not None
            end = min(math.floor(max(s.issued_until for s in members)) + 1, horizon)
            exceptions = sorted(
                {s.source_identity for s in live if s.issued_from < end and s.issued_until >= start}
            )
            segments.append(
                Segment(start, end, tuple(exceptions), tuple(s.source_identity for s in members))
            )
        covered = {sid for seg in segments for sid in seg.covers}
        explicit.update(s.source_identity for s in coverable if s.source_identity not in covered)
    return DenyPlan(tuple(segments), tuple(sorted(explicit)), state.issued_before)


def document(deny: DenyPlan, cluster: str) -> dict[str, Any] | None:
    """The policy document for a plan; ``None`` when it denies nothing (the policy is deleted)."""
    if deny.empty:
        return None
    statements: list[dict[str, Any]] = []
    if deny.explicit:
        statements.append(
            {
                "Sid": SID_EXPLICIT,
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"StringEquals": {"aws:SourceIdentity": list(deny.explicit)}},
            }
        )
    for index, segment in enumerate(deny.segments, start=1):
        statements.append(_segment_statement(index, cluster, segment))
    if deny.issued_before is not None:
        statements.append(
            {
                "Sid": SID_ISSUED_BEFORE,
                "Effect": "Deny",
                "Action": "*",
                "Resource": "*",
                "Condition": {"DateLessThan": {"aws:TokenIssueTime": iso_utc(deny.issued_before)}},
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def inline_budget(other_policies_chars: int) -> int:
    """Characters left for the kill switch next to the role's other inline policies."""
    return ROLE_INLINE_POLICY_MAX_CHARS - INLINE_SAFETY_MARGIN - other_policies_chars
