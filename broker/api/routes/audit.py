"""The audit record for auditors: events with filters, a task's trace, verification, status.

Every endpoint needs a session whose principal holds the ``auditor`` role. Reading is itself
audited (``broker.audit.access``), and so is a refusal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from broker.api.deps import BrokerDep, SessionDep
from broker.api.models import CredentialStateOut
from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.domain.principal import role_refusal
from broker.domain.records import Session
from broker.errors import NotFound, ValidationFailed
from broker.services.common import record
from broker.store import repo
from broker.wiring import Broker

router = APIRouter(prefix="/v1/audit", tags=["audit"])
#: Public: the keys anyone needs to verify an export offline (``broker audit verify --keys-url``).
keys_router = APIRouter(tags=["audit"])
KEYS_PATH = "/.well-known/audit-keys.json"

MAX_PAGE = 1000


def _audit_access(broker: Broker, session: Session, what: str, outcome: str, **attrs: Any) -> None:
    with broker.db.write() as conn:
        record(
            conn,
            AuditEvent(
                name=EventName.AUDIT_ACCESS
                if outcome == Outcome.SUCCESS
                else EventName.REQUEST_DENIED,
                outcome=outcome,
                time=broker.clock(),
                trace_id=new_trace_id(),
                parent_span_id=None,
                session_id=session.id,
                actor_issuer=session.principal.issuer,
                actor_subject=session.principal.subject,
                links=[
                    {"trace_id": session.trace_id, "span_id": session.span_id, "type": "session"}
                ],
                attributes={
                    "broker.audit.access": what,
                    "broker.principal.sub": session.principal.subject,
                    "broker.issuer": session.principal.issuer,
                    **{f"broker.audit.filter.{k}": v for k, v in attrs.items() if v is not None},
                },
            ),
        )


def require_auditor(session: SessionDep, broker: BrokerDep) -> Session:
    """The caller's session, if its principal is an auditor; a refusal is audited."""
    if not session.principal.has_role("auditor"):
        _audit_access(broker, session, "refused", Outcome.DENIED, code="auditor_role_required")
        raise role_refusal(session.principal, "auditor", doing="reading the audit record")
    return session


AuditorDep = Annotated[Session, Depends(require_auditor)]


class EventOut(BaseModel):
    """One audit event as stored: its span identity, its facts and its place in the chain."""

    seq: int
    id: str
    name: str
    outcome: str
    time: float
    end_time: float
    trace_id: str
    span_id: str
    parent_span_id: str | None
    session_id: str | None
    task_id: str | None
    credential_id: str | None
    actor_issuer: str | None
    actor_subject: str | None
    attributes: dict[str, Any]
    links: list[dict[str, Any]]
    prev_hash: str
    hash: str
    exported: bool

    @classmethod
    def of(cls, row: dict[str, Any]) -> EventOut:
        return cls(**{name: row.get(name) for name in cls.model_fields})


class EventPage(BaseModel):
    events: list[EventOut]
    #: Pass as ``after`` (oldest first) or ``before`` (newest first) for the next page.
    next: int | None


def parse_time(value: str | None, name: str) -> float | None:
    """Epoch seconds or an RFC 3339 date-time."""
    if value is None or value == "":
        return None
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed(
            f"{name} must be epoch seconds or an RFC 3339 date-time", code="invalid_time"
        ) from None
    if moment.tzinfo is None:
        raise ValidationFailed(f"{name} needs a time zone (for example Z)", code="invalid_time")
    return moment.timestamp()


IdFilter = Annotated[str | None, Query(max_length=256)]


@router.get("/events", response_model=EventPage)
def events(
    session: AuditorDep,
    broker: BrokerDep,
    task: IdFilter = None,
    credential: IdFilter = None,
    session_id: Annotated[str | None, Query(alias="session", max_length=64)] = None,
    principal: Annotated[str | None, Query(max_length=1024)] = None,
    issuer: Annotated[str | None, Query(max_length=2048)] = None,
    scope: Annotated[str | None, Query(max_length=128)] = None,
    name: Annotated[str | None, Query(max_length=64)] = None,
    outcome: Annotated[str | None, Query(max_length=16)] = None,
    trace: Annotated[str | None, Query(max_length=32, pattern=r"^[0-9a-f]{32}$")] = None,
    since: Annotated[str | None, Query(max_length=64)] = None,
    until: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[int, Query(ge=0)] = 0,
    before: Annotated[int | None, Query(ge=1)] = None,
    order: Literal["asc", "desc"] = "asc",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 100,
) -> EventPage:
    """Audit events, filtered (every filter given must match), in chain order, paginated."""
    since_t = parse_time(since, "since")
    until_t = parse_time(until, "until")
    with broker.db.read() as conn:
        rows = repo.audit_events(
            conn,
            task_id=task,
            credential_id=credential,
            session_id=session_id,
            subject=principal,
            issuer=issuer,
            scope=scope,
            name=name,
            outcome=outcome,
            trace_id=trace,
            since=since_t,
            until=until_t,
            after_seq=after,
            before_seq=before,
            limit=limit,
            newest_first=order == "desc",
        )
    _audit_access(
        broker,
        session,
        "events",
        Outcome.SUCCESS,
        task=task,
        credential=credential,
        principal=principal,
        scope=scope,
        name=name,
        since=since_t,
        until=until_t,
        returned=len(rows),
    )
    nxt = int(rows[-1]["seq"]) if len(rows) == limit else None
    return EventPage(events=[EventOut.of(r) for r in rows], next=nxt)


class TraceOut(BaseModel):
    task_id: str
    trace_id: str
    #: The task's state now (``failed``: approved, but minting failed and nothing was issued).
    state: str
    events: list[EventOut]
    #: The task's credentials now; a ``revoke_pending`` one has not been taken back yet.
    credentials: list[CredentialStateOut]


@router.get("/tasks/{task_id}/trace", response_model=TraceOut)
def task_trace(task_id: str, session: AuditorDep, broker: BrokerDep) -> TraceOut:
    """Every event of one task (request, decision, approvals, issuance, uses, end), in order."""
    with broker.db.read() as conn:
        task = repo.get_task(conn, task_id)
        if task is None:
            raise NotFound("no such task", code="unknown_task")
        credentials = repo.credentials_for(conn, task_id)
        rows: list[dict[str, Any]] = []
        after = 0
        while True:
            page = repo.audit_events(conn, task_id=task_id, after_seq=after, limit=MAX_PAGE)
            rows.extend(page)
            if len(page) < MAX_PAGE:
                break
            after = int(page[-1]["seq"])
    _audit_access(broker, session, "trace", Outcome.SUCCESS, task=task_id)
    return TraceOut(
        task_id=task.id,
        trace_id=task.trace_id,
        state=task.state.value,
        events=[EventOut.of(r) for r in rows],
        credentials=[CredentialStateOut.of(c) for c in credentials],
    )


@router.get("/verify")
def verify(session: AuditorDep, broker: BrokerDep) -> dict[str, Any]:
    """Verify the whole chain and every signed checkpoint now."""
    from broker.audit.runtime import checkpoint_verifier
    from broker.audit.verify import verify_store

    report = verify_store(
        broker.db, checkpoint_verifier(broker.settings, broker.keyring, broker.db)
    )
    _audit_access(broker, session, "verify", Outcome.SUCCESS, ok=report.ok)
    return report.as_dict()


@router.get("/status")
def status(session: AuditorDep, broker: BrokerDep) -> dict[str, Any]:
    """The chain's head, the last checkpoint, the export backlog and the ingest counters."""
    with broker.db.read() as conn:
        seq, head = repo.audit_head(conn)
        checkpoint = repo.latest_checkpoint(conn)
        backlog = repo.count_unexported(conn)
    runtime = broker.audit.health() if broker.audit is not None else {}
    return {
        "head": {"seq": seq, "hash": head},
        "last_checkpoint": checkpoint,
        "export_backlog": backlog,
        "uses": broker.uses.counters.as_dict(),
        **runtime,
    }


@keys_router.get(KEYS_PATH)
def audit_keys(broker: BrokerDep) -> JSONResponse:
    """Every public key the broker ever signed audit checkpoints with (a JWK Set). Public keys
    only: an auditor fetches them once and verifies exports offline against them."""
    from broker.audit.checkpoints import StoreKeys

    return JSONResponse(
        StoreKeys(broker.db).jwks(),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": "public, max-age=300"},
    )
