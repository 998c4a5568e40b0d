"""Scope discovery for agents."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from broker.api.deps import BrokerDep, SessionDep

router = APIRouter(prefix="/v1/scopes", tags=["scopes"])


@router.get("")
def list_scopes(session: SessionDep, broker: BrokerDep) -> list[dict[str, Any]]:
    """The templates the caller may request, with parameters, limits and approval rule."""
    out = []
    for loaded in broker.catalog.all():
        t = loaded.template
        if not t.requester.evaluate(session.principal.claims):
            continue
        out.append(
            {
                "name": t.name,
                "description": t.description,
                "owner": t.owner,
                "backend": t.backend.type,
                "risk": t.risk.value,
                "parameters": {k: v.model_dump(exclude_none=True) for k, v in t.parameters.items()},
                "ttl": t.ttl.model_dump(),
                "max_uses": t.max_uses,
                "max_active_tasks": t.max_active_tasks,
                "approval": {
                    "mode": t.approval.mode,
                    "count": t.approval.count,
                    "request_ttl": t.approval.request_ttl,
                    "approval_ttl": t.approval.approval_ttl,
                },
                "labels": t.labels,
                "template_hash": loaded.content_hash,
            }
        )
    return out
