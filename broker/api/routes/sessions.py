"""The caller's own session."""

from __future__ import annotations

from fastapi import APIRouter, Response

from broker.api.deps import BrokerDep, SessionDep
from broker.api.models import SessionOut
from broker.domain.task import TaskState

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


@router.get("/current", response_model=SessionOut)
def current(session: SessionDep) -> SessionOut:
    """Who the caller is."""
    p = session.principal
    return SessionOut(
        session_id=session.id,
        issuer=p.issuer,
        subject=p.subject,
        display_name=p.display_name,
        groups=list(p.groups),
        roles=sorted(p.roles),
        created_at=session.created_at,
        expires_at=session.expires_at,
    )


@router.delete("/current", status_code=204)
def end(session: SessionDep, broker: BrokerDep) -> Response:
    """End the session and everything it holds: its open tasks end and their credentials are revoked."""
    for task in broker.tasks.list_own(
        session, states=[TaskState.PENDING, TaskState.APPROVED, TaskState.ACTIVE], limit=1000
    ):
        if task.session_id == session.id:
            broker.tasks.complete(session, task.id)
    broker.sessions.end(session)
    return Response(status_code=204)
