"""Pure task rules: the request decision, the binding hash, the approval tally, the TTL."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from broker.domain.principal import Principal
from broker.domain.records import Approval, Task
from broker.domain.scope import ScopeTemplate
from broker.domain.task import (
    TaskState,
    condition_claims,
    decide_request,
    resolve_ttl,
    tally,
    task_binding,
)
from broker.errors import ValidationFailed

MANUAL: dict[str, Any] = {
    "name": "demo",
    "description": "d",
    "owner": "o",
    "backend": {"type": "vault_token", "policies": ["kv-read"]},
    "requester": {"all": [{"claim": "groups", "equals": "dev"}]},
    "ttl": {"default": 600, "max": 1200},
    "approval": {
        "mode": "manual",
        "count": 2,
        "approvers": {"all": [{"claim": "sub", "regex": ".+"}]},
    },
}
TASK = Task(
    id="tsk_1",
    session_id="ses_1",
    issuer="https://idp",
    subject="agent",
    scope="demo",
    template_hash="h1",
    params={"a": "b"},
    purpose="p",
    ttl=600,
    state=TaskState.PENDING,
    created_at=0,
    updated_at=0,
    trace_id="0" * 32,
    span_id="0" * 16,
    approvals_required=2,
)


def approval(sub: str, at: float = 100, decision: str = "approve", **kw: Any) -> Approval:
    values: dict[str, Any] = {
        "id": f"apr_{sub}_{at}",
        "task_id": TASK.id,
        "issuer": "https://idp",
        "subject": sub,
        "decision": decision,
        "template_hash": "h1",
        "created_at": at,
        "binding_hash": task_binding(TASK),
    }
    values.update(kw)
    return Approval(**values)


def test_decisions() -> None:
    """Unmet requester conditions deny with the reason; manual rules pend; auto approves."""
    manual = ScopeTemplate.model_validate(MANUAL)
    assert decide_request(manual, {"groups": ["dev"]}).state is TaskState.PENDING
    denied = decide_request(manual, {"groups": ["ops"]})
    assert denied.state is TaskState.DENIED and "groups equals 'dev'" in (denied.reason or "")
    auto = ScopeTemplate.model_validate({**MANUAL, "approval": {"mode": "auto"}})
    approved = decide_request(auto, {"groups": "dev"})
    assert approved.state is TaskState.APPROVED and approved.rule.startswith("auto: scope demo")


@pytest.mark.parametrize(
    "change",
    [
        {"params": {"a": "c"}},
        {"ttl": 601},
        {"purpose": "q"},
        {"template_hash": "h2"},
        {"scope": "other"},
        {"subject": "someone-else"},
        {"issuer": "https://other"},
        {"id": "tsk_2"},
    ],
)
def test_binding_hash_covers_every_frozen_field(change: dict[str, Any]) -> None:
    """Changing any frozen field changes the binding hash, so approvals made before are void."""
    assert task_binding(replace(TASK, **change)) != task_binding(TASK)


def test_the_binding_ignores_state_and_times() -> None:
    assert task_binding(replace(TASK, state=TaskState.APPROVED, updated_at=5)) == task_binding(TASK)


def test_tally_counts_distinct_fresh_bound_approvals() -> None:
    """Only approvals by distinct non-requesters, on this binding and template, not stale."""
    now = 200.0
    kw = {"task": TASK, "required": 2, "approval_ttl": 300, "now": now}
    assert tally([approval("a"), approval("b")], **kw).met
    assert not tally([approval("a"), approval("a", at=150)], **kw).met  # same person twice
    assert not tally([approval("a"), approval("agent")], **kw).met  # the requester
    assert not tally([approval("a"), approval("b", decision="deny")], **kw).met
    assert not tally([approval("a"), approval("b", binding_hash="other")], **kw).met
    assert not tally([approval("a"), approval("b", template_hash="h2")], **kw).met
    stale = tally([approval("a", at=-150), approval("b")], **kw)  # 350 s old > 300
    assert not stale.met and [x.subject for x in stale.counted] == ["b"]
    both = tally([approval("a", at=50), approval("b", at=150)], **kw)
    assert both.expires_at == 50 + 300  # the oldest approval bounds the grant


def test_tally_counts_people_not_identities() -> None:
    """Approvals sharing a person value count once, whichever identities they came from; one
    sharing a person with the requester (the actor who triggered its run) never counts; an
    approval without persons is told apart by its identity alone."""
    now = 200.0
    task = replace(TASK, requester_persons=("octocat",))
    kw = {"task": task, "required": 2, "approval_ttl": 300, "now": now}

    def by(sub: str, *persons: str, issuer: str = "https://idp", **more: Any) -> Approval:
        return approval(sub, issuer=issuer, persons=persons or None, **more)

    alice = by("alice", "alice@corp.example")
    alice_hr = by("emp-1", "alice@corp.example", issuer="https://hr", at=150)
    assert not tally([alice, alice_hr], **kw).met
    assert len(tally([alice, alice_hr], **kw).counted) == 1
    assert tally([alice, by("bob", "bob@corp.example")], **kw).met
    octo = by("oscar", "oscar@corp.example", "octocat")
    assert not tally([alice, octo], **kw).met  # the requester's person
    assert tally([alice, by("p-2")], **kw).met  # no persons: identity only
    assert tally([approval("a"), approval("b")], task=TASK, required=2, approval_ttl=300, now=now)


def test_ttl() -> None:
    """Default when not asked; what was asked within the template's and the global cap."""
    template = ScopeTemplate.model_validate(MANUAL)
    assert resolve_ttl(template, None, 3600) == 600
    assert resolve_ttl(template, None, 300) == 300
    assert resolve_ttl(template, 900, 3600) == 900
    for bad, code in ((1201, "ttl_too_long"), (59, "invalid_ttl"), (True, "invalid_ttl")):
        with pytest.raises(ValidationFailed) as err:
            resolve_ttl(template, bad, 3600)  # type: ignore[arg-type]
        assert err.value.code == code


def test_condition_claims_keep_groups() -> None:
    """Conditions see mapped groups even when the stored claims lost them."""
    p = Principal(issuer="i", subject="s", groups=("dba",), claims={"sub": "s"})
    assert condition_claims(p)["groups"] == ["dba"]
    q = Principal(issuer="i", subject="s", groups=("x",), claims={"groups": ["y"]})
    assert condition_claims(q)["groups"] == ["y"]
