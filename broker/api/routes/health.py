"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive (answered on the event loop: no thread, however busy the pools)."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(broker: BrokerDep) -> JSONResponse:
    """The store and every configured backend answer.

    ``revocations`` counts credentials still being revoked (``unconfirmed``: something of them
    may still live); ``scopes`` lists the scopes whose last mint on this replica found them
    misconfigured at their backend, with the cause. Both are detail for alerting and for the
    admin, not a reason to take this replica out of service.
    """
    checks = broker.readiness()
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {
            "status": "ready" if ready else "unavailable",
            "checks": checks,
            "revocations": broker.revocations(),
            "scopes": broker.scope_health.snapshot(),
        },
        status_code=200 if ready else 503,
    )
