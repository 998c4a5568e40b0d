"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import broker as broker_pkg
from broker.api import console, problems
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

    app = FastAPI(
        title="broker",
        version=broker_pkg.__version__,
        summary="Ephemeral credentials for AI coding agents",
        lifespan=lifespan,
    )
    app.state.broker = the_broker
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
    return app
