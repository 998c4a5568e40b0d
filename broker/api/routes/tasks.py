"""Tasks: request, list, read (with long-poll), mint, complete, cancel."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from broker.api.deps import AgentDep, BrokerDep, TraceDep
from broker.api.json_bodies import OffLoopJsonRoute
from broker.api.models import ApprovalOut, CredentialOut, TaskCreate, TaskOut
from broker.domain.task import TaskState
from broker.services.tasks import TaskRequest

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=OffLoopJsonRoute)

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)]
ConversationId = Annotated[str | None, Header(alias="X-Conversation-Id", max_length=256)]
#: How often a long-poll re-reads the task (the store is shared, so replicas see each other).
POLL_INTERVAL = 0.25


@router.post(
    "",
    status_code=201,
    response_model=TaskOut,
    responses={
        200: {"description": "A replay: the task this Idempotency-Key created before."},
        403: {"description": "Denied: the requester's conditions are not met (with the reason)."},
        409: {"description": "The Idempotency-Key was used for another request."},
        422: {"description": "Invalid parameters, purpose or TTL."},
        429: {"description": "A rate limit or quota was reached; see Retry-After."},
    },
)
def create_task(
    body: TaskCreate,
    session: AgentDep,
    broker: BrokerDep,
    trace: TraceDep,
    idempotency_key: IdempotencyKey = None,
    conversation_id: ConversationId = None,
) -> JSONResponse:
    """Ask for a scope for one task: approved at once, pending approvers, or a 403 denial.

    Send an ``Idempotency-Key`` to retry safely: the same key and body return the same task
    (200, ``Idempotent-Replayed: true``); the same key with another body is a 409.
    """
    submitted = broker.tasks.submit(
        session,
        TaskRequest(
            scope=body.scope,
            params=body.params,
            purpose=body.purpose,
            ttl=body.ttl,
            idempotency_key=idempotency_key,
            trace=trace,
            conversation_id=body.conversation_id or conversation_id,
        ),
    )
    out = TaskOut.of(submitted.task)
    headers = {"Location": f"/v1/tasks/{submitted.task.id}"}
    if submitted.replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(
        out.model_dump(mode="json"), status_code=200 if submitted.replayed else 201, headers=headers
    )


@router.get("", response_model=list[TaskOut])
def list_tasks(
    session: AgentDep,
    broker: BrokerDep,
    state: Annotated[list[TaskState] | None, Query(description="Only these states.")] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[TaskOut]:
    """The caller's own tasks, newest first."""
    return [TaskOut.of(t) for t in broker.tasks.list_own(session, states=state, limit=limit)]


@router.get("/{task_id}", response_model=TaskOut)
async def get_task(
    task_id: str,
    session: AgentDep,
    broker: BrokerDep,
    wait: Annotated[
        int,
        Query(ge=0, le=300, description="Seconds to wait while the task is pending (long-poll)."),
    ] = 0,
) -> TaskOut:
    """One of the caller's tasks, with its approvals so far.

    With ``?wait=N`` the answer waits up to N seconds (capped by ``task_wait_max``) for a pending
    task to be decided or to expire, so an agent learns the decision without polling fast.
    """
    deadline = time.monotonic() + min(wait, broker.settings.task_wait_max)
    task = await run_in_threadpool(broker.tasks.get_own, session, task_id)
    while task.state is TaskState.PENDING and time.monotonic() < deadline:
        await asyncio.sleep(min(POLL_INTERVAL, max(0.0, deadline - time.monotonic())))
        task = await run_in_threadpool(broker.tasks.get_own, session, task_id)
    credentials = await run_in_threadpool(broker.tasks.credentials_of, task)
    out = TaskOut.of(task, credentials)
    if task.approvals_required:
        decisions = await run_in_threadpool(broker.tasks.approvals_of, task)
        out.approvals = [ApprovalOut.of(a, counts=c) for a, c in decisions]
    return out


@router.post("/{task_id}/credentials", status_code=201, response_model=CredentialOut)
def mint(
    task_id: str, session: AgentDep, broker: BrokerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Mint the task's credential (once per approval). The secret is in this response only."""
    issued = broker.credentials.mint(session, task_id, idempotency_key)
    body = CredentialOut.of(issued.credential, secret=issued.minted.secret, env=issued.minted.env)
    return JSONResponse(
        body.model_dump(),
        status_code=201,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


@router.post("/{task_id}/complete", response_model=TaskOut)
def complete(task_id: str, session: AgentDep, broker: BrokerDep) -> TaskOut:
    """End the task and revoke everything it holds. ``credentials`` says what could not be
    revoked yet (``revoke_pending``); a task whose mints all failed ends ``failed``."""
    task = broker.tasks.complete(session, task_id)
    return TaskOut.of(task, broker.tasks.credentials_of(task))


@router.post("/{task_id}/cancel", response_model=TaskOut)
def cancel(task_id: str, session: AgentDep, broker: BrokerDep) -> TaskOut:
    """Withdraw a request (or give up an unused approval); anything minted is revoked."""
    task = broker.tasks.complete(session, task_id, cancel=True)
    return TaskOut.of(task, broker.tasks.credentials_of(task))
