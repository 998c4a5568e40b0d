"""What a task's credential will grant, rendered for its exact parameters, for the people who
approve it.

A template shows ``policies: [team-{{params.team}}]``; an approver must see ``team-payments``.
:func:`grant_preview` renders the template's backend with the task's parameters exactly as
minting will (:func:`broker.scopes.render.render_backend`, the same checks) and describes the
result: Vault policies, the database role, the AWS role with its session policy and session
tags, the JWT's audience and claims, the lifetime and use count. It holds no secret: nothing in
a template or in parameters is one, and values the broker fills in at mint time (the credential
id) are named, not invented.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from broker.domain.scope import (
    AwsStsBackend,
    BrokerJwtBackend,
    GitHubAppBackend,
    ScopeTemplate,
    VaultDatabaseBackend,
    VaultTokenBackend,
)
from broker.domain.vault_policies import ROOT_ONLY, ForbiddenPolicies
from broker.errors import ValidationFailed
from broker.scopes.render import render_backend

#: Shown where the broker fills a value in when it mints.
AT_MINT = "(assigned when minted)"
#: STS's longest session.
_STS_MAX = 43_200


def grant_preview(
    template: ScopeTemplate,
    params: Mapping[str, Any],
    *,
    ttl: int,
    ttl_cap: int,
    subject: str,
    task_id: str,
    cluster: str,
    forbidden: ForbiddenPolicies = ROOT_ONLY,
) -> dict[str, Any]:
    """The grant of a task: its backend rendered for ``params``, as minting will render it.

    ``ttl`` is the task's; the credential lives at most ``min(ttl, template max, ttl_cap)`` (and
    no longer than the requester's session). A template that no longer renders for these
    parameters gives ``{"type": ..., "error": ...}``: such a task cannot be minted either.
    """
    try:
        spec = render_backend(template, params, forbidden=forbidden)
    except ValidationFailed as exc:
        return {"type": template.backend.type, "error": exc.detail}
    out: dict[str, Any] = {
        "type": spec.type,
        "ttl_seconds": min(ttl, template.ttl.max, ttl_cap),
        "max_uses": template.max_uses,
    }
    if isinstance(spec, VaultTokenBackend):
        policies = list(spec.policies)
        if not spec.no_default_policy and "default" not in policies:
            policies = ["default", *policies]
        out.update({"policies": policies, "renewable": False})
    elif isinstance(spec, VaultDatabaseBackend):
        out.update({"mount": spec.mount, "role": spec.role})
    elif isinstance(spec, AwsStsBackend):
        out.update(
            {
                "role_arn": spec.role_arn,
                "duration_seconds": min(out["ttl_seconds"], spec.role_max_session, _STS_MAX),
                "session_policy": spec.session_policy,
                "session_tags": {
                    "broker:cluster": cluster,
                    "broker:task": task_id,
                    "broker:credential": AT_MINT,
                    "broker:scope": template.name,
                    "broker:subject": subject,
                    **spec.tags,
                },
                "external_id": "set" if spec.external_id else None,
            }
        )
    elif isinstance(spec, BrokerJwtBackend):
        out.update(
            {
                "audience": spec.audience,
                "claims": {
                    "sub": subject,
                    "aud": spec.audience,
                    "scope": template.name,
                    "broker_task": task_id,
                    "jti": AT_MINT,
                    **spec.claims,
                },
            }
        )
    elif isinstance(spec, GitHubAppBackend):
        out.update(
            {
                "owner": spec.owner,
                "repositories": (
                    "all of the installation's"
                    if spec.all_repositories
                    else list(spec.repositories)
                ),
                "repository_ids": list(spec.repository_ids),
                "permissions": dict(spec.permissions),
                # GitHub installation tokens live one hour at most.
                "ttl_seconds": min(out["ttl_seconds"], 3600),
            }
        )
    return out


def grant_summary(grant: Mapping[str, Any]) -> str:
    """One line for chat messages and terminal lists."""
    if grant.get("error"):
        return f"{grant.get('type')}: cannot be rendered ({grant['error']})"
    kind = grant.get("type")
    parts: list[str] = []
    if kind == "vault_token":
        parts.append("policies " + ", ".join(grant.get("policies") or []))
    elif kind == "vault_database":
        parts.append(f"database role {grant.get('mount')}/{grant.get('role')}")
    elif kind == "aws_sts":
        parts.append(f"role {grant.get('role_arn')}")
        policy = grant.get("session_policy") or {}
        statements = policy.get("Statement") or []
        for st in statements if isinstance(statements, list) else [statements]:
            actions = st.get("Action")
            resources = st.get("Resource")
            parts.append(f"{st.get('Effect')} {_joined(actions)} on {_joined(resources)}")
    elif kind == "broker_jwt":
        parts.append(f"audience {grant.get('audience')}")
    elif kind == "github_app":
        repos = grant.get("repositories") or grant.get("repository_ids")
        parts.append(f"GitHub {grant.get('owner')}: {_joined(repos)}")
        perms = grant.get("permissions") or {}
        parts.append(", ".join(f"{name}: {level}" for name, level in sorted(perms.items())))
    parts.append(f"{grant.get('ttl_seconds')} s")
    if grant.get("max_uses"):
        parts.append(f"{grant['max_uses']} uses")
    return f"{kind}: " + "; ".join(parts)


def _joined(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    return str(value)
