"""Admins: would each scope the broker serves mint now? (``broker scopes check --live``)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from broker.api.deps import BrokerDep
from broker.api.routes.admin_lifecycle import AdminDep
from broker.errors import NotFound
from broker.scopes.prerequisites import Names
from broker.services.scope_checks import check_scopes

router = APIRouter(prefix="/v1/admin/scopes", tags=["admin"])


@router.get("/check")
def check(
    session: AdminDep,
    broker: BrokerDep,
    scope: Annotated[str | None, Query(max_length=128, description="Only this scope.")] = None,
) -> dict[str, Any]:
    """Each served template's backend prerequisites, checked against the backends now (with the
    broker's own backend identity), the templates the broker refused to load, and the scopes
    whose last mint on this replica found them misconfigured."""
    templates = broker.catalog.all()
    if scope is not None:
        templates = [t for t in templates if t.template.name == scope]
        if not templates:
            raise NotFound(f"the broker serves no scope named {scope!r}", code="unknown_scope")
    vault = broker.settings.vault
    names = Names(vault.token_role if vault else None, vault.lease_token_role if vault else None)
    return {
        "checks": [c.as_dict() for c in check_scopes(templates, broker.backends, names)],
        "refused": [p.as_dict() for p in broker.catalog.problems if p.severity == "error"],
        "misconfigured": broker.scope_health.snapshot(),
    }
