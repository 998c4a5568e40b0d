"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(broker: BrokerDep) -> JSONResponse:
    """The store and every configured backend answer.

    ``scopes`` lists the scopes whose last mint on this replica found them misconfigured at their
    backend, with the cause; it is detail for the admin and does not affect readiness.
    """
    checks = broker.readiness()
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "scopes": broker.scope_health.snapshot(),
        },
        status_code=200 if ready else 503,
    )
