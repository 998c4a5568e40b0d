"""The kill-switch policy of a role, proven by evaluation: every ended session denied, every live
one let through, whatever the volume, within IAM's inline size limit.

moto evaluates no IAM condition, so these tests decide each session's fate with the evaluator in
``tests/support/iam_policy.py`` (IAM's documented rules for the operators the policy uses)."""

from __future__ import annotations

import math
import random

from broker.backends import sts_deny as d
from tests.support.iam_policy import denied_by, session_context

CLUSTER = "prod-eu"
T0 = 1_800_000_000.0


def sid(i: int) -> str:
    return f"crd_{i:016d}.repo-org-app-{'x' * 30}"[:64]


def window(at: float) -> tuple[float, float]:
    return at - d.ISSUE_TIME_MARGIN, at + d.ISSUE_TIME_MARGIN


def check(state: d.RoleDenyState, issued: dict[str, float]) -> dict[str, object] | None:
    """Render, then evaluate every session at its true issue time and at the edges of its
    window: ended ones denied, live ones not, sessions of other principals never."""
    document = d.document(d.plan(state), state.cluster)
    ended = {s.source_identity for s in state.ended}
    for session in [*state.ended, *state.live]:
        at = issued[session.source_identity]
        points = [at]
        if session.known:
            points += [session.issued_from, session.issued_until]
        for point in points:
            verdict = denied_by(document, session_context(session.source_identity, point, CLUSTER))
            if session.source_identity in ended:
                assert verdict, f"ended {session.source_identity} issued {point} is not denied"
            else:
                assert verdict == [], f"live {session.source_identity} denied by {verdict}"
    # Someone else's session on the role (no broker tag, no SourceIdentity) is never denied
    # unless an operator killed the whole role.
    if state.issued_before is None:
        for at in issued.values():
            assert denied_by(document, session_context(None, at, None)) == []
    # A session minted after the policy was computed (issued at or after the horizon) works.
    if math.isfinite(state.horizon):
        later = session_context("crd_new.agent", state.horizon, CLUSTER)
        assert denied_by(document, later) == [] or state.issued_before is not None
    if document is not None:
        assert d.policy_chars(document) <= d.inline_budget(0)
    return document


def test_a_thousand_ended_sessions_in_an_hour_cost_one_statement() -> None:
    """1,000 sessions ended within one hour on one role, five live ones among them: one time
    segment with five exceptions denies them all; the policy stays far below IAM's limit."""
    issued = {sid(i): T0 + i * 3.6 for i in range(1000)}
    live_ids = {sid(i) for i in (10, 250, 500, 750, 999)}
    state = d.RoleDenyState(
        cluster=CLUSTER,
        ended=[d.SessionWindow(s, *window(t)) for s, t in issued.items() if s not in live_ids],
        live=[d.SessionWindow(s, *window(issued[s])) for s in live_ids],
        horizon=max(issued.values()) - d.ISSUE_TIME_MARGIN,
    )
    document = check(state, issued)
    assert document is not None
    plan = d.plan(state)
    assert len(plan.segments) <= 2
    assert len(plan.explicit) <= 2  # only what the horizon keeps out of the segments
    assert d.policy_chars(document) < 2_000


def test_recent_and_unknown_sessions_are_denied_by_source_identity() -> None:
    """Ended sessions issued at the horizon, and a lost mint whose issue time is unknown, are
    denied explicitly; nothing else is."""
    issued = {sid(1): T0, sid(2): T0 + 100, sid(3): T0 + 50}
    state = d.RoleDenyState(
        cluster=CLUSTER,
        ended=[
            d.SessionWindow(sid(1), *window(T0)),
            d.SessionWindow(sid(2), *window(T0 + 100)),
            d.SessionWindow(sid(3)),  # a crash: no bounds
        ],
        horizon=T0 + 100 - d.ISSUE_TIME_MARGIN,
    )
    check(state, issued)
    plan = d.plan(state)
    assert set(plan.explicit) >= {sid(2), sid(3)}


def test_mints_under_way_are_excepted_from_every_segment() -> None:
    """A mint whose intent exists but whose session is not recorded yet could be issued at any
    moment: it is an exception of every segment."""
    issued = {sid(i): T0 + i for i in range(0, 400, 4)}
    issued[sid(1000)] = T0 + 10.5
    state = d.RoleDenyState(
        cluster=CLUSTER,
        ended=[d.SessionWindow(s, *window(t)) for s, t in issued.items() if s != sid(1000)],
        live=[d.SessionWindow(sid(1000))],
        horizon=T0 + 500,
    )
    check(state, issued)
    for segment in d.plan(state).segments:
        assert sid(1000) in segment.exceptions


def test_long_runs_of_live_sessions_split_segments_instead_of_becoming_exceptions() -> None:
    """Sixty live sessions between two bursts of endings: two segments (a statement costs less
    than sixty exceptions), and no live session in either exception list."""
    issued: dict[str, float] = {}
    ended, live = [], []
    for i in range(300):
        at = T0 + i * 10
        issued[sid(i)] = at
        (live if 100 <= i < 160 else ended).append(d.SessionWindow(sid(i), *window(at)))
    state = d.RoleDenyState(CLUSTER, ended, live, horizon=T0 + 10_000)
    check(state, issued)
    plan = d.plan(state)
    assert len(plan.segments) == 2
    assert all(not seg.exceptions for seg in plan.segments)


def test_the_role_wide_kill_denies_everyone_issued_before_it() -> None:
    """The operator's switch stays a statement of its own: live sessions and other principals'
    sessions issued before it are denied, later ones are not."""
    state = d.RoleDenyState(
        cluster=CLUSTER,
        ended=[d.SessionWindow(sid(1), *window(T0))],
        live=[d.SessionWindow(sid(2), *window(T0 + 20))],
        horizon=T0 + 20 - d.ISSUE_TIME_MARGIN,
        issued_before=T0 + 10,
    )
    document = d.document(d.plan(state), CLUSTER)
    assert denied_by(document, session_context(sid(1), T0, CLUSTER))
    assert denied_by(document, session_context(None, T0 + 9, None)) == [d.SID_ISSUED_BEFORE]
    assert denied_by(document, session_context(sid(2), T0 + 20, CLUSTER)) == []


def test_nothing_to_deny_deletes_the_policy() -> None:
    assert d.document(d.plan(d.RoleDenyState(CLUSTER)), CLUSTER) is None


def test_random_histories_keep_every_ended_session_denied_and_every_live_one_working() -> None:
    """Seeded random histories (bursts, long-lived sessions, mints under way, lost mints, up to
    2,000 sessions): the evaluation of the rendered policy matches the store, every time."""
    rng = random.Random(20_26_12)
    for _ in range(60):
        issued: dict[str, float] = {}
        ended: list[d.SessionWindow] = []
        live: list[d.SessionWindow] = []
        at = T0
        for i in range(rng.randrange(1, 2000)):
            at += rng.expovariate(1 / rng.choice([0.2, 3.6, 60]))
            issued[sid(i)] = at
            roll = rng.random()
            if roll < 0.03:
                live.append(d.SessionWindow(sid(i)))  # under way
            elif roll < 0.08:
                live.append(d.SessionWindow(sid(i), *window(at)))
            elif roll < 0.09:
                ended.append(d.SessionWindow(sid(i)))  # lost in a crash
            elif roll < 0.12:
                ended.append(d.SessionWindow(sid(i), at - 40, at + 40))  # a lost answer
            else:
                ended.append(d.SessionWindow(sid(i), *window(at)))
        state = d.RoleDenyState(CLUSTER, ended, live, horizon=at - d.ISSUE_TIME_MARGIN)
        document = d.document(d.plan(state), CLUSTER)
        live_count = len(live)
        if document is not None and d.policy_chars(document) > d.inline_budget(0):
            # Only many live sessions interleaved with endings can fill the policy.
            assert live_count > 100
            continue
        check(state, issued)
