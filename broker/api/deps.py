"""Request-scoped dependencies: the broker, the caller's session, trace context."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from broker.domain.records import Session
from broker.errors import AuthenticationFailed
from broker.services.common import TraceContext, parse_traceparent
from broker.wiring import Broker

MAX_BEARER = 512


async def get_broker(request: Request) -> Broker:
    # async: FastAPI runs a plain def dependency in the thread pool, one hop per request for
    # nothing; this only reads app state.
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


def current_session(
    broker: BrokerDep, authorization: Annotated[str | None, Header()] = None
) -> Session:
    """The caller's live session; every refusal is audited (with the token's hash, not the token)."""
    if not authorization:
        error = AuthenticationFailed(
            "send your session token as 'Authorization: Bearer ...'", code="missing_token"
        )
        broker.sessions.audit_failure(error, presented=None, what="session")
        raise error
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_BEARER:
        error = AuthenticationFailed(
            "the Authorization header must be 'Bearer <session token>'", code="invalid_session"
        )
        broker.sessions.audit_failure(
            error, presented=authorization, what="session", reason="malformed_authorization"
        )
        raise error
    return broker.sessions.resolve(token)


SessionDep = Annotated[Session, Depends(current_session)]


async def trace_context(
    traceparent: Annotated[str | None, Header()] = None,
) -> TraceContext | None:
    return parse_traceparent(traceparent)


TraceDep = Annotated[TraceContext | None, Depends(trace_context)]
