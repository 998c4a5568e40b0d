"""The application factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

import broker as broker_pkg
from broker.api import console, problems
from broker.api.auth_work import AuthWork, request_address, trusted_networks
from broker.api.request_limits import RequestLimits, Scope
from broker.api.routes import (
    admin_lifecycle,
    admin_scopes,
    health,
    oauth,
    scopes,
    sessions,
    tasks,
    tokens,
)
from broker.api.routes import approvals as approvals_routes
from broker.api.routes import audit as audit_routes
from broker.api.routes import runs as runs_routes
from broker.settings import Settings
from broker.wiring import Broker, build_broker


def create_app(
    settings: Settings, *, broker: Broker | None = None, start_background: bool = True
) -> FastAPI:
    """Build the broker's HTTP application. Nothing is constructed at import time."""
    the_broker = broker or build_broker(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if start_background:
            the_broker.start()
        try:
            yield
        finally:
            the_broker.stop()

    # The API's description is for developers; outside dev mode it is served only when asked.
    docs = settings.dev_mode or settings.http.public_docs
    app = FastAPI(
        title="broker",
        version=broker_pkg.__version__,
        summary="Ephemeral credentials for AI coding agents",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.broker = the_broker
    app.state.auth_work = AuthWork(settings.http.auth_concurrency, settings.http.auth_queue)
    app.state.trusted_proxies = trusted_networks(settings.http)
    problems.install(app)
    for router in (health.router, oauth.router, sessions.router, tasks.router, scopes.router):
        app.include_router(router)
    app.include_router(runs_routes.router)
    app.include_router(approvals_routes.router)
    app.include_router(audit_routes.router)
    app.include_router(audit_routes.keys_router)
    app.include_router(tokens.router)
    app.include_router(admin_lifecycle.router)
    app.include_router(admin_scopes.router)
    console.install(app)
    app.add_middleware(RequestLimits, settings=settings.http, report=_report_oversized(app))
    return app


def _report_oversized(app: FastAPI) -> Callable[[Scope, str], Awaitable[None]]:
    """Count and audit a request refused for its size like any failed authentication."""
    from starlette.requests import HTTPConnection

    from broker.errors import BrokerError, InvalidRequest

    async def report(scope: Scope, code: str) -> None:
        broker: Broker = app.state.broker
        address = request_address(HTTPConnection(scope), app.state.trusted_proxies)
        error = InvalidRequest("the request is too large", code=code)
        # When the pool is busy (503) the refusal stands; its record is what a flood gives up.
        with contextlib.suppress(BrokerError):
            await app.state.auth_work.run(
                lambda: broker.sessions.audit_failure(
                    error, presented=None, what="request", address=address
                )
            )

    return report
