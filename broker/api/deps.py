"""Request-scoped dependencies: the broker, the caller's session, trace context."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from broker.domain.records import Session
from broker.errors import AuthenticationFailed
from broker.services.common import TraceContext, parse_traceparent
from broker.wiring import Broker

MAX_BEARER = 512


def get_broker(request: Request) -> Broker:
    broker: Broker = request.app.state.broker
    return broker


BrokerDep = Annotated[Broker, Depends(get_broker)]


def current_session(
    broker: BrokerDep, authorization: Annotated[str | None, Header()] = None
) -> Session:
    if not authorization:
        raise AuthenticationFailed(
            "send your session token as 'Authorization: Bearer ...'", code="missing_token"
        )
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_BEARER:
        raise AuthenticationFailed(
            "the Authorization header must be 'Bearer <session token>'", code="invalid_session"
        )
    return broker.sessions.resolve(token)


SessionDep = Annotated[Session, Depends(current_session)]


def trace_context(traceparent: Annotated[str | None, Header()] = None) -> TraceContext | None:
    return parse_traceparent(traceparent)


TraceDep = Annotated[TraceContext | None, Depends(trace_context)]
