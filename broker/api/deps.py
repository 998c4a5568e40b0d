"""Request-scoped dependencies: the broker, the caller's session, trace context."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request

from broker.api.auth_work import AuthWork, request_address
from broker.domain.records import Session
from broker.errors import AuthenticationFailed
from broker.services.common import TraceContext, parse_traceparent
from broker.wiring import Broker

MAX_BEARER = 512
T = TypeVar("T")


async def get_broker(request: Request) -> Broker:
    # async: FastAPI runs a plain def dependency in the thread pool, one hop per request for
    # nothing; this only reads app state.
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


def client_address(request: Request) -> str | None:
    """The client's address for throttling (``http.trusted_proxies`` decide whom to believe)."""
    return request_address(request, request.app.state.trusted_proxies)


async def run_auth_work(request: Request, work: Callable[[], T]) -> T:
    """Run authentication work in its own bounded pool (:class:`~broker.api.auth_work.AuthWork`)."""
    auth_work: AuthWork = request.app.state.auth_work
    return await auth_work.run(work)


async def current_session(
    request: Request, broker: BrokerDep, authorization: Annotated[str | None, Header()] = None
) -> Session:
    """The caller's live session; every refusal is audited (with the token's hash, not the token)."""
    address = client_address(request)
    return await run_auth_work(request, lambda: _resolve(broker, authorization, address))


def _resolve(broker: Broker, authorization: str | None, address: str | None) -> Session:
    sessions = broker.sessions
    if not authorization:
        sessions.admit(address, what="session")
        error = AuthenticationFailed(
            "send your session token as 'Authorization: Bearer ...'", code="missing_token"
        )
        sessions.audit_failure(error, presented=None, what="session", address=address)
        raise error
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_BEARER:
        sessions.admit(address, what="session")
        error = AuthenticationFailed(
            "the Authorization header must be 'Bearer <session token>'", code="invalid_session"
        )
        sessions.audit_failure(
            error,
            presented=authorization,
            what="session",
            reason="malformed_authorization",
            address=address,
        )
        raise error
    return sessions.resolve(token, address=address)


SessionDep = Annotated[Session, Depends(current_session)]


async def trace_context(
    traceparent: Annotated[str | None, Header()] = None,
) -> TraceContext | None:
    return parse_traceparent(traceparent)


TraceDep = Annotated[TraceContext | None, Depends(trace_context)]


def require_role(role: str, doing: str) -> Callable[..., Session]:
    """A dependency: the caller's session, if its principal holds ``role`` (else 403, audited)."""

    def check(session: SessionDep, broker: BrokerDep, trace: TraceDep) -> Session:
        broker.sessions.require_role(session, role, doing=doing, trace=trace)
        return session

    return check


#: Agents' routes: discovering scopes, requesting, reading, minting, reporting and ending tasks.
AgentDep = Annotated[Session, Depends(require_role("agent", "requesting and using credentials"))]
#: Approvers' read routes (a decision is checked, and audited on the task, by the service).
ApproverDep = Annotated[Session, Depends(require_role("approver", "reading approvals"))]
