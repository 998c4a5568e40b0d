"""Render a template's backend settings with validated parameters, as data, within its maximum.

:func:`render_backend` is the one way parameters reach a backend. It

1. validates the parameters again (``validate_params``), so no caller can skip it;
2. substitutes ``{{params.NAME}}`` placeholders inside individual string *values* of the parsed
   settings (an AWS session policy is a JSON document assembled from values and serialised once,
   by ``json.dumps``, never by concatenating JSON text);
3. checks each substituted value against the alphabet of the place it lands in (a Vault name takes
   ``[A-Za-z0-9_.-]``; an IAM policy value takes no glob, ``$``, quote, comma, space or brace);
4. checks the result: Vault names well-formed and never ``root`` or a policy the admin forbade
   (compared as Vault normalises names, :mod:`broker.domain.vault_policies`); the session policy's shape
   (no ``NotAction``/``NotResource``/``Principal`` in an ``Allow``) and size (2,048 characters);
   GitHub permission names and levels against GitHub's published schema, at most 500
   repositories; and every policy, role, action, resource, owner, repository and permission
   level covered by the backend's declared ``maximum``.

Anything else is refused with ``ValidationFailed`` (422), before approval and again before minting.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

from broker.domain import github
from broker.domain.scope import (
    PLACEHOLDER,
    RESERVED_JWT_CLAIMS,
    STS_POLICY_MAX_CHARS,
    AnyBackend,
    AwsPolicyMaximum,
    AwsStsBackend,
    BrokerJwtBackend,
    GitHubAppBackend,
    ScopeTemplate,
    VaultDatabaseBackend,
    VaultTokenBackend,
    glob_covers,
)
from broker.domain.vault_policies import ROOT_ONLY, ForbiddenPolicies, vault_policy_name
from broker.errors import ValidationFailed
from broker.scopes.params import validate_params

VAULT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_VAULT_VALUE = re.compile(r"[A-Za-z0-9_.-]+")
_AWS_VALUE = re.compile(r"[A-Za-z0-9_./:=+@-]+")
_TAG_EXTRA = set("_.:/=+-@")
#: Keys of a policy statement whose values never take a parameter.
_FIXED_POLICY_KEYS = frozenset({"Version", "Effect", "Sid"})


def _refuse(message: str, code: str = "render_refused", **extra: Any) -> ValidationFailed:
    return ValidationFailed(message, code=code, extra=extra)


def compact_json(value: Any) -> str:
    """The JSON text sent to a backend: compact, key order kept, non-ASCII escaped."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


def _vault_ok(value: str) -> bool:
    return _VAULT_VALUE.fullmatch(value) is not None and value not in (".",)


def _aws_ok(value: str) -> bool:
    return _AWS_VALUE.fullmatch(value) is not None


def _tag_ok(value: str) -> bool:
    return all(unicodedata.category(c)[0] in "LZN" or c in _TAG_EXTRA for c in value)


def _claim_ok(value: str) -> bool:
    return all(unicodedata.category(c)[0] != "C" for c in value)


def substitute(
    text: str, values: Mapping[str, Any], *, allowed: Callable[[str], bool], where: str
) -> str:
    """Replace each placeholder in ``text`` once (no re-expansion) with a checked value."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise _refuse(f"parameter {name!r} is needed by {where} but has no value")
        raw = values[name]
        value = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if not value or not allowed(value):
            raise _refuse(
                f"parameter {name!r} carries characters {where} cannot take",
                code="invalid_parameter",
                parameter=name,
            )
        return value

    return PLACEHOLDER.sub(replace, text)


def _render_tree(
    value: Any,
    values: Mapping[str, Any],
    *,
    allowed: Callable[[str], bool],
    where: str,
    key: str | None = None,
) -> Any:
    """Copy a JSON-like tree, substituting placeholders in string values only."""
    if isinstance(value, str):
        if key in _FIXED_POLICY_KEYS and PLACEHOLDER.search(value):
            raise _refuse(f"{where}: {key} cannot take a parameter")
        return substitute(value, values, allowed=allowed, where=where)
    if isinstance(value, dict):
        return {
            k: _render_tree(v, values, allowed=allowed, where=where, key=str(k))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_render_tree(v, values, allowed=allowed, where=where, key=key) for v in value]
    return value


# --- checks on rendered results -------------------------------------------------------------


def check_vault_name(value: str, what: str) -> None:
    if not VAULT_NAME.fullmatch(value) or value.strip(".") != value:
        raise _refuse(f"the rendered {what} {value!r} is not a valid Vault name")


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def check_session_policy(  # noqa: PLR0912  # one branch per IAM rule, kept in one readable place
    policy: Any,
    maximum: AwsPolicyMaximum | None,
    *,
    unchecked: Callable[[str], bool] | None = None,
    check_size: bool = True,
) -> None:
    """Shape, size and maximum of a (rendered) session policy.

    ``unchecked`` exempts values from the maximum (lint uses it for the not yet rendered ones).
    """
    exempt = unchecked or (lambda _: False)
    if not isinstance(policy, dict):
        raise _refuse("the session policy must be a JSON object")
    if policy.get("Version") != "2012-10-17":
        raise _refuse("the session policy needs Version 2012-10-17")
    statements = policy.get("Statement")
    if not isinstance(statements, (list, dict)) or not statements:
        raise _refuse("the session policy needs at least one Statement")
    for i, st in enumerate(_as_list(statements)):
        if not isinstance(st, dict):
            raise _refuse(f"statement {i} must be an object")
        effect = st.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise _refuse(f"statement {i} needs Effect Allow or Deny")
        if "Principal" in st or "NotPrincipal" in st:
            raise _refuse(f"statement {i}: a session policy names no Principal")
        if effect == "Deny":
            continue  # a Deny only narrows
        if "NotAction" in st or "NotResource" in st:
            raise _refuse(f"statement {i}: NotAction/NotResource would widen an Allow")
        actions, resources = st.get("Action"), st.get("Resource")
        if not actions or not resources:
            raise _refuse(f"statement {i}: an Allow needs Action and Resource")
        for action in _as_list(actions):
            if not isinstance(action, str) or (
                maximum is not None
                and not exempt(action)
                and not any(glob_covers(m, action, ignore_case=True) for m in maximum.actions)
            ):
                raise _refuse(
                    f"statement {i}: action {action!r} is outside what the scope allows",
                    code="scope_maximum_exceeded",
                )
        for resource in _as_list(resources):
            if not isinstance(resource, str) or (
                maximum is not None
                and not exempt(resource)
                and not any(glob_covers(m, resource) for m in maximum.resources)
            ):
                raise _refuse(
                    f"statement {i}: a resource is outside what the scope allows",
                    code="scope_maximum_exceeded",
                )
    size = len(compact_json(policy))
    if check_size and size > STS_POLICY_MAX_CHARS:
        raise _refuse(
            f"the session policy would be {size} characters; STS takes at most {STS_POLICY_MAX_CHARS}",
            code="policy_too_large",
        )


# --- per backend ------------------------------------------------------------------------------


def _render_vault_token(
    spec: VaultTokenBackend, values: Mapping[str, Any], forbidden: ForbiddenPolicies
) -> VaultTokenBackend:
    policies: list[str] = []
    for i, raw in enumerate(spec.policies):
        written = substitute(raw, values, allowed=_vault_ok, where=f"policy {i}")
        check_vault_name(written, "policy name")
        if written in forbidden:
            raise _refuse(
                "this policy can never be granted (root, or forbidden by the administrator)",
                code="forbidden_policy",
            )
        # What is sent, shown and compared is the name Vault will use.
        name = vault_policy_name(written)
        if spec.maximum is not None and not any(
            glob_covers(vault_policy_name(m), name) for m in spec.maximum.policies
        ):
            raise _refuse(
                f"policy {name!r} is outside what the scope allows", code="scope_maximum_exceeded"
            )
        if name not in policies:
            policies.append(name)
    return spec.model_copy(update={"policies": policies})


def _render_vault_database(
    spec: VaultDatabaseBackend, values: Mapping[str, Any]
) -> VaultDatabaseBackend:
    role = substitute(spec.role, values, allowed=_vault_ok, where="the database role")
    check_vault_name(role, "database role")
    if spec.maximum is not None and not any(glob_covers(m, role) for m in spec.maximum.roles):
        raise _refuse(
            f"database role {role!r} is outside what the scope allows",
            code="scope_maximum_exceeded",
        )
    return spec.model_copy(update={"role": role})


def _render_aws(spec: AwsStsBackend, values: Mapping[str, Any]) -> AwsStsBackend:
    policy = None
    if spec.session_policy is not None:
        policy = _render_tree(
            spec.session_policy, values, allowed=_aws_ok, where="the session policy"
        )
        check_session_policy(policy, spec.maximum)
    tags: dict[str, str] = {}
    for key, raw in spec.tags.items():
        value = substitute(raw, values, allowed=_tag_ok, where=f"tag {key}")
        if len(value) > 256 or not _tag_ok(value):
            raise _refuse(f"tag {key!r} would not be a valid session tag value")
        tags[key] = value
    return spec.model_copy(update={"session_policy": policy, "tags": tags})


def _render_jwt(spec: BrokerJwtBackend, values: Mapping[str, Any]) -> BrokerJwtBackend:
    if RESERVED_JWT_CLAIMS.intersection(spec.claims):
        raise _refuse("a template cannot set the token's registered claims")
    claims = _render_tree(spec.claims, values, allowed=_claim_ok, where="the token's claims")
    return spec.model_copy(update={"claims": claims})


def check_github_permissions(permissions: Mapping[str, str]) -> None:
    """Names and levels as GitHub's published schema has them (refused before any call)."""
    problems = github.permission_catalog().problems(permissions)
    if problems:
        raise _refuse(
            "GitHub does not accept these permissions: " + "; ".join(problems[:5]),
            code="github_permission_invalid",
        )


def _render_github(spec: GitHubAppBackend, values: Mapping[str, Any]) -> GitHubAppBackend:
    maximum = spec.maximum
    owner = substitute(spec.owner, values, allowed=github.owner_ok, where="the owner")
    if not github.owner_ok(owner):
        raise _refuse(f"the rendered owner {owner!r} is not a GitHub login")
    owners = maximum.owners if maximum is not None else None
    if owners is not None and not any(glob_covers(m, owner, ignore_case=True) for m in owners):
        raise _refuse(
            f"owner {owner!r} is outside what the scope allows", code="scope_maximum_exceeded"
        )
    allowed = maximum.repositories if maximum is not None else None
    repositories: list[str] = []
    for i, raw in enumerate(spec.repositories):
        name = substitute(raw, values, allowed=github.repository_ok, where=f"repository {i}")
        if not github.repository_ok(name):
            raise _refuse(f"the rendered repository {name!r} is not a GitHub repository name")
        if allowed is not None and not any(glob_covers(m, name, ignore_case=True) for m in allowed):
            raise _refuse(
                f"repository {name!r} is outside what the scope allows",
                code="scope_maximum_exceeded",
            )
        if name.lower() not in (r.lower() for r in repositories):
            repositories.append(name)
    if len(repositories) > github.MAX_REPOSITORIES:
        raise _refuse(
            f"a GitHub token names at most {github.MAX_REPOSITORIES} repositories",
            code="github_too_many_repositories",
        )
    permissions: dict[str, str] = {}
    for name, raw in spec.permissions.items():
        permissions[name] = substitute(
            raw, values, allowed=lambda v: v in github.LEVELS, where=f"permission {name}"
        )
    check_github_permissions(permissions)
    if maximum is not None and maximum.permissions is not None:
        over = github.exceeding(permissions, maximum.permissions)
        if over:
            raise _refuse(
                f"permissions {', '.join(over)} are above what the scope allows",
                code="scope_maximum_exceeded",
            )
    return spec.model_copy(
        update={"owner": owner, "repositories": repositories, "permissions": permissions}
    )


def render_backend(
    template: ScopeTemplate,
    params: Mapping[str, Any],
    *,
    forbidden: ForbiddenPolicies = ROOT_ONLY,
) -> AnyBackend:
    """The template's backend settings with ``params`` substituted, checked against its maximum.

    ``params`` may be raw (from a request) or already validated (a task's frozen parameters);
    they are validated again either way. ``forbidden``: the Vault policies never granted (the
    catalog's, from ``vault.forbidden_policies``). Raises ``ValidationFailed`` on any refusal.
    """
    values = validate_params(template, params)
    spec = template.backend
    if isinstance(spec, VaultTokenBackend):
        return _render_vault_token(spec, values, forbidden)
    if isinstance(spec, VaultDatabaseBackend):
        return _render_vault_database(spec, values)
    if isinstance(spec, AwsStsBackend):
        return _render_aws(spec, values)
    if isinstance(spec, GitHubAppBackend):
        return _render_github(spec, values)
    return _render_jwt(spec, values)
