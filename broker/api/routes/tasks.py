"""Tasks: request, read, mint, complete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep, SessionDep, TraceDep
from broker.api.models import CredentialOut, TaskCreate, TaskOut
from broker.services.tasks import TaskRequest

router = APIRouter(prefix="/v1/tasks", tags=["tasks"])

IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)]
ConversationId = Annotated[str | None, Header(alias="X-Conversation-Id", max_length=256)]


@router.post("", status_code=201, response_model=TaskOut)
def create_task(
    body: TaskCreate,
    session: SessionDep,
    broker: BrokerDep,
    trace: TraceDep,
    idempotency_key: IdempotencyKey = None,
    conversation_id: ConversationId = None,
) -> TaskOut:
    """Ask for a scope for one task; the answer is approved, pending, or a 403 denial."""
    task = broker.tasks.request(
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
    return TaskOut.of(task)


@router.get("", response_model=list[TaskOut])
def list_tasks(session: SessionDep, broker: BrokerDep) -> list[TaskOut]:
    """The caller's own tasks, newest first."""
    return [TaskOut.of(t) for t in broker.tasks.list_own(session)]


@router.get("/{task_id}", response_model=TaskOut)
def get_task(task_id: str, session: SessionDep, broker: BrokerDep) -> TaskOut:
    return TaskOut.of(broker.tasks.get_own(session, task_id))


@router.post("/{task_id}/credentials", status_code=201, response_model=CredentialOut)
def mint(
    task_id: str, session: SessionDep, broker: BrokerDep, idempotency_key: IdempotencyKey = None
) -> JSONResponse:
    """Mint the task's credential. The secret is in this response only."""
    issued = broker.credentials.mint(session, task_id, idempotency_key)
    body = CredentialOut.of(issued.credential, secret=issued.minted.secret, env=issued.minted.env)
    return JSONResponse(
        body.model_dump(),
        status_code=201,
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


@router.post("/{task_id}/complete", response_model=TaskOut)
def complete(task_id: str, session: SessionDep, broker: BrokerDep) -> TaskOut:
    """End the task and revoke everything it holds."""
    return TaskOut.of(broker.tasks.complete(session, task_id))


@router.post("/{task_id}/cancel", response_model=TaskOut)
def cancel(task_id: str, session: SessionDep, broker: BrokerDep) -> TaskOut:
    return TaskOut.of(broker.tasks.complete(session, task_id, cancel=True))
