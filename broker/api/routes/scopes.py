"""Scope discovery for agents: what they may ask for, with parameters, limits and approval rule."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from broker.api.deps import AgentDep, BrokerDep
from broker.domain.scope import Parameter, ParamType
from broker.domain.task import condition_claims
from broker.errors import NotFound
from broker.scopes.loader import LoadedTemplate

router = APIRouter(prefix="/v1/scopes", tags=["scopes"])


def param_schema(params: dict[str, Parameter]) -> dict[str, Any]:
    """A JSON Schema for a template's ``params`` object (what ``POST /v1/tasks`` validates)."""
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, p in params.items():
        prop: dict[str, Any] = {"type": p.type.value}
        if p.description:
            prop["description"] = p.description
        if p.type is ParamType.STRING:
            prop["maxLength"] = p.max_length
            if p.min_length is not None:
                prop["minLength"] = p.min_length
            if p.pattern is not None:
                # Anchored: the broker matches the whole value.
                prop["pattern"] = f"^(?:{p.pattern})$"
        if p.minimum is not None:
            prop["minimum"] = p.minimum
        if p.maximum is not None:
            prop["maximum"] = p.maximum
        if p.enum is not None:
            prop["enum"] = p.enum
        if p.default is not None:
            prop["default"] = p.default
        elif p.required:
            required.append(name)
        properties[name] = prop
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def describe(loaded: LoadedTemplate) -> dict[str, Any]:
    t = loaded.template
    return {
        "name": t.name,
        "description": t.description,
        "owner": t.owner,
        "backend": t.backend.type,
        "risk": t.risk.value,
        "parameters": param_schema(t.parameters),
        "ttl": t.ttl.model_dump(),
        "max_uses": t.max_uses,
        "max_active_tasks": t.max_active_tasks,
        #: Who may reach its tasks: the requesting session (or run), or any of your sessions.
        "share": t.share,
        "limits": t.limits.model_dump(),
        "approval": {
            "mode": t.approval.mode,
            "count": t.approval.required,
            "approvers": t.approval.approvers.describe() if t.approval.approvers else None,
            "request_ttl": t.approval.request_ttl,
            "approval_ttl": t.approval.approval_ttl,
        },
        "labels": t.labels,
        "template_hash": loaded.content_hash,
    }


@router.get("")
def list_scopes(session: AgentDep, broker: BrokerDep) -> list[dict[str, Any]]:
    """The templates the caller may request, with parameter schema, limits and approval rule."""
    claims = condition_claims(session.principal)
    return [describe(lt) for lt in broker.catalog.all() if lt.template.requester.evaluate(claims)]


@router.get("/{name}")
def get_scope(name: str, session: AgentDep, broker: BrokerDep) -> dict[str, Any]:
    """One template the caller may request (404 for one they may not: names are not disclosed)."""
    loaded = broker.catalog.get(name)
    if not loaded.template.requester.evaluate(condition_claims(session.principal)):
        raise NotFound(f"no scope template named {name!r}", code="unknown_scope")
    return describe(loaded)
