"""The caller's own session: who am I, and end it."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, SessionDep
from broker.api.models import SessionOut
from broker.domain.records import Session
from broker.domain.task import TaskState
from broker.errors import BrokerError
from broker.wiring import Broker

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])
log = logging.getLogger(__name__)

#: States in which a task still holds something (a pending request, a grant, credentials).
_OPEN = [TaskState.PENDING, TaskState.APPROVED, TaskState.ACTIVE]


@router.get("/current", response_model=SessionOut)
def current(session: SessionDep) -> SessionOut:
    """Who the caller is: issuer and subject (the identity), display name, groups and roles."""
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
        via=session.via,
        run_bound=session.run_identity is not None,
    )


@router.delete("/current", status_code=204)
async def end(session: SessionDep, broker: BrokerDep) -> Response:
    """End the session and everything it holds: its open tasks end, their credentials are revoked.

    The session ends first, so its token stops working before anything else happens and no new
    task can start meanwhile; then each of its open tasks is completed (or cancelled, if still
    pending), which revokes what it holds.
    """
    await run_in_threadpool(broker.sessions.end, session)
    await run_in_threadpool(_end_tasks, broker, session)
    return Response(status_code=204)


def _end_tasks(broker: Broker, session: Session) -> None:
    while True:
        open_tasks = [
            t
            for t in broker.tasks.list_own(session, states=_OPEN, limit=1000)
            if t.session_id == session.id
        ]
        ended = 0
        for task in open_tasks:
            try:
                broker.tasks.complete(session, task.id)
                ended += 1
            except BrokerError as exc:  # ended meanwhile by its owner or the reaper
                log.info("task %s of ended session %s: %s", task.id, session.id, exc.code)
        if ended == 0:
            return
