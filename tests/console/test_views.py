"""The console's view helpers: template differences, the time axis, durations."""

from __future__ import annotations

from typing import Any

from broker.api.console.views import (
    build_timeline,
    duration,
    flatten,
    template_changes,
)
from broker.domain.records import Credential, Task
from broker.domain.task import CredentialState, TaskState


def test_template_changes_name_each_setting_that_differs() -> None:
    """Nested settings compare as dotted paths; added, removed and changed ones are told apart;
    equal ones are not listed."""
    before = {"backend": {"type": "vault_token", "policies": ["kv-read"]}, "risk": "low"}
    after = {
        "backend": {"type": "vault_token", "policies": ["kv-read", "kv-write"], "ttl": 60},
        "risk": "low",
    }
    changes = {c.path: c for c in template_changes(before, after)}
    assert set(changes) == {"backend.policies", "backend.ttl"}
    assert changes["backend.policies"].kind == "changed"
    assert changes["backend.policies"].after == ["kv-read", "kv-write"]
    assert changes["backend.ttl"].kind == "added"
    assert template_changes(after, before)[1].kind == "removed"
    assert template_changes(before, before) == []
    assert flatten({"a": {}}) == {"a": {}}


def _task(**kw: Any) -> Task:
    values: dict[str, Any] = {
        "id": "tsk_1",
        "session_id": "ses_1",
        "issuer": "https://idp",
        "subject": "agent",
        "scope": "kv",
        "template_hash": "h" * 64,
        "params": {},
        "purpose": "p",
        "ttl": 600,
        "state": TaskState.COMPLETED,
        "created_at": 1000.0,
        "updated_at": 1000.0,
        "trace_id": "t" * 32,
        "span_id": "s" * 16,
    }
    values.update(kw)
    return Task(**values)


def _event(seq: int, name: str, t: float, **kw: Any) -> dict[str, Any]:
    return {
        "seq": seq,
        "name": name,
        "time": t,
        "outcome": "success",
        "hash": f"{seq:064d}",
        "attributes": kw.pop("attributes", {}),
        **kw,
    }


def test_the_time_axis_places_events_by_time_in_lanes() -> None:
    """The axis runs from the request to the last event; the task's events share one lane and
    each credential gets its own, with a bar from issuance to revocation; marks sit at their
    times' share of the axis; rows are in time order with the offset from the request."""
    cred = Credential(
        id="crd_1",
        task_id="tsk_1",
        backend="vault",
        kind="vault_token",
        state=CredentialState.REVOKED,
        created_at=1010.0,
        issued_at=1010.0,
        expires_at=1600.0,
        revoked_at=1100.0,
    )
    events = [
        _event(1, "broker.task.request", 1000.0),
        _event(2, "broker.credential.issue", 1010.0, credential_id="crd_1"),
        _event(
            4,
            "broker.credential.use",
            1050.0,
            credential_id="crd_1",
            attributes={"broker.use.source": "cloudtrail"},
        ),
        _event(3, "broker.credential.use", 1030.0, credential_id="crd_1", outcome="failure"),
        _event(5, "broker.credential.revoke", 1100.0, credential_id="crd_1"),
    ]
    timeline = build_timeline(_task(), [cred], events, now=5000.0)
    assert (timeline.start, timeline.end) == (1000.0, 1100.0)
    assert timeline.now_x is None  # a completed task has no "now"
    task_lane, cred_lane = timeline.lanes
    assert [m.kind for m in task_lane.marks] == ["request"]
    assert task_lane.marks[0].x == 1.0
    assert cred_lane.bar == (10.8, 99.0)
    assert [m.x for m in cred_lane.marks] == [10.8, 50.0, 30.4, 99.0]
    assert [r.seq for r in timeline.rows] == [1, 2, 3, 4, 5]
    assert timeline.rows[3].source == "CloudTrail"
    assert timeline.rows[3].offset == "+50.000 s"
    assert timeline.counts == {"request": 1, "issue": 1, "use": 2, "revoke": 1}


def test_an_open_task_runs_to_now_and_a_live_credential_runs_off_the_edge() -> None:
    """While the task is active the axis ends now (marked), and a credential that expires later
    has an open-ended bar."""
    cred = Credential(
        id="crd_1",
        task_id="tsk_1",
        backend="vault",
        kind="vault_token",
        state=CredentialState.ACTIVE,
        created_at=1000.0,
        issued_at=1000.0,
        expires_at=9000.0,
    )
    timeline = build_timeline(
        _task(state=TaskState.ACTIVE),
        [cred],
        [_event(1, "broker.task.request", 1000.0)],
        now=1200.0,
    )
    assert timeline.end == 1200.0
    assert timeline.now_x == 99.0
    assert timeline.lanes[1].open_end
    assert timeline.lanes[1].bar == (1.0, 99.0)


def test_durations_read_like_people_write_them() -> None:
    """Seconds below two minutes, then minutes, then hours and minutes."""
    assert duration(45) == "45 s"
    assert duration(600) == "10 min"
    assert duration(5400) == "1 h 30 min"
    assert duration(7200) == "2 h"
    assert duration(0.1234) == "0.123 s"
    assert duration(None) == "-"


def test_a_refused_attempt_is_drawn_as_a_refusal_never_as_a_decision() -> None:
    """A refused approval attempt (and one recorded before broker.approval.refused existed, as a
    broker.task.approval with a refusal code) is a refusal on the timeline; a real decision is an
    approval."""
    from broker.api.console.views import kind_of

    refused = {"name": "broker.approval.refused", "attributes": {"broker.refusal.code": "x"}}
    legacy = {"name": "broker.task.approval", "attributes": {"broker.refusal.code": "x"}}
    decision = {"name": "broker.task.approval", "attributes": {"broker.approval.decision": "deny"}}
    assert [kind_of(e) for e in (refused, legacy, decision)] == ["refusal", "refusal", "approval"]
