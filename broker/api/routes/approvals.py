"""Approvers: the pending tasks they may decide, one task's detail, approve and deny."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from broker.api.deps import ApproverDep, BrokerDep, SessionDep
from broker.api.json_bodies import OffLoopJsonRoute
from broker.api.models import ApprovalOut, TaskOut
from broker.services.approvals import MAX_REASON, ApprovalView

router = APIRouter(prefix="/v1/approvals", tags=["approvals"], route_class=OffLoopJsonRoute)


class Decision(BaseModel):
    """An approver's reason, recorded with the decision and shown to the requester."""

    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=MAX_REASON)


class ApprovalTaskOut(BaseModel):
    """A task as an approver sees it."""

    task: TaskOut
    requester_display_name: str | None
    risk: str | None
    description: str | None
    approvals_required: int
    approvals_counted: int
    approvals: list[ApprovalOut]
    approvers_rule: dict[str, list[str]] | None
    #: The template the task was requested under no longer exists in that version.
    template_changed: bool
    may_decide: bool
    why_not: str | None
    #: What the credential will grant: the template rendered for the task's exact parameters
    #: (policies, database role, AWS role with session policy and tags, JWT claims, TTL, uses).
    grant: dict[str, Any] | None = None
    #: The template's backend settings as written (placeholders and all), beside the grant.
    template_backend: dict[str, Any] | None = None

    @classmethod
    def of(cls, view: ApprovalView) -> ApprovalTaskOut:
        template = view.template.template if view.template else None
        counted_ids = {a.id for a in view.counted.counted} if view.counted else set()
        rule: Any = template.approval.approvers if template else None
        return cls(
            task=TaskOut.of(view.task),
            requester_display_name=view.requester_name,
            risk=template.risk.value if template else None,
            description=template.description if template else None,
            approvals_required=view.task.approvals_required,
            approvals_counted=len(counted_ids),
            approvals=[ApprovalOut.of(a, counts=a.id in counted_ids) for a in view.approvals],
            approvers_rule=rule.describe() if rule is not None else None,
            template_changed=view.template_changed,
            may_decide=view.may_decide,
            why_not=view.why_not,
            grant=view.grant.grant if view.grant else None,
            template_backend=view.grant.template_backend if view.grant else None,
        )


@router.get("", response_model=list[ApprovalTaskOut])
def pending(
    session: ApproverDep, broker: BrokerDep, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> list[ApprovalTaskOut]:
    """Pending tasks the caller may decide now (approver role, the scope's rule, not their own)."""
    return [ApprovalTaskOut.of(v) for v in broker.approvals.pending_for(session, limit=limit)]


@router.get("/{task_id}", response_model=ApprovalTaskOut)
def detail(task_id: str, session: ApproverDep, broker: BrokerDep) -> ApprovalTaskOut:
    """One task that needs approvers, in any state, with every decision so far."""
    return ApprovalTaskOut.of(broker.approvals.view(session, task_id))


@router.post("/{task_id}/approve", response_model=TaskOut)
def approve(task_id: str, body: Decision, session: SessionDep, broker: BrokerDep) -> TaskOut:
    """Approve; the task is approved once enough distinct approvers have."""
    return TaskOut.of(broker.approvals.approve(session, task_id, body.reason))


@router.post("/{task_id}/deny", response_model=TaskOut)
def deny(task_id: str, body: Decision, session: SessionDep, broker: BrokerDep) -> TaskOut:
    """Deny; one denial ends the request."""
    return TaskOut.of(broker.approvals.deny(session, task_id, body.reason))
