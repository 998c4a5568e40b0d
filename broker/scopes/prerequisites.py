"""What each scope template needs its backend to have, said as things an admin can create.

A template can be valid and still fail at its first mint: the OpenBao policy it names does not
exist, the broker's token role does not allow it, the database role or the IAM role is missing, or
the role does not trust the broker. :func:`requirements` lists those prerequisites for one
template, offline, each with exactly what to create; ``broker scopes check`` prints them and
``broker scopes check --live`` asks each backend (``Backend.check``, see
:class:`broker.backends.base.Checkable`) whether they hold.

Backends register their offline list in :data:`REQUIREMENTS` by template type; a new backend (for
example a GitHub App backend) adds one function there and a ``check`` method on its class.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from broker.domain.scope import (
    PLACEHOLDER,
    AwsStsBackend,
    BrokerJwtBackend,
    GitHubAppBackend,
    ParamType,
    ScopeTemplate,
    VaultDatabaseBackend,
    VaultTokenBackend,
)

Status = Literal["unchecked", "ok", "missing", "unknown"]
#: Most values one parameterised setting is expanded to; beyond that it counts as unbounded.
MAX_RENDERINGS = 64
#: What the broker asks STS to do with a role (the trust policy must allow all three).
STS_ACTIONS = ("sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity")


@dataclass(frozen=True, slots=True)
class Requirement:
    """One thing a scope needs at its backend.

    ``what`` is a sentence that is true when all is well ("OpenBao has the policy 'kv-read'"),
    ``fix`` says exactly what to create or change; ``status`` is ``unchecked`` offline, and
    ``ok``, ``missing`` or ``unknown`` (the broker may not look) once checked, with ``found``
    saying what the backend answered.
    """

    scope: str
    what: str
    fix: str
    status: Status = "unchecked"
    found: str | None = None
    #: What it is about, for the backend that checks it: ``("policy", "kv-read")``, ...
    key: tuple[str, ...] = ()

    def checked(
        self, status: Status, found: str | None = None, fix: str | None = None
    ) -> Requirement:
        return replace(self, status=status, found=found, fix=fix or self.fix)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "what": self.what,
            "status": self.status,
            "found": self.found,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class Names:
    """The broker's own backend settings that prerequisites name (when known)."""

    token_role: str | None = None
    lease_token_role: str | None = None


def _values(template: ScopeTemplate, name: str) -> list[str] | None:
    """Every value a parameter can take, when that is a short list (an enum, a boolean)."""
    spec = template.parameters.get(name)
    if spec is None:
        return None
    if spec.enum is not None:
        return [str(v) for v in spec.enum]
    if spec.type is ParamType.BOOLEAN:
        return ["true", "false"]
    return None


def renderable(template: ScopeTemplate, text: str) -> list[str] | None:
    """Every string ``text`` can render to, or None when a placeholder's parameter is free (a
    string with a pattern, a number): then only the template's ``maximum`` bounds it."""
    names = list(dict.fromkeys(PLACEHOLDER.findall(text)))
    if not names:
        return [text]
    choices: list[list[str]] = []
    for name in names:
        values = _values(template, name)
        if values is None:
            return None
        choices.append(values)
    out: list[str] = []
    for combo in itertools.product(*choices):
        chosen = dict(zip(names, combo, strict=True))
        out.append(PLACEHOLDER.sub(lambda m, c=chosen: c[m.group(1)], text))  # type: ignore[misc]
        if len(out) > MAX_RENDERINGS:
            return None
    return list(dict.fromkeys(out))


def vault_policies(template: ScopeTemplate, spec: VaultTokenBackend) -> tuple[list[str], list[str]]:
    """The policies a ``vault_token`` template can render, and the ones it cannot enumerate
    (kept as written, with their placeholders)."""
    known: list[str] = []
    open_ended: list[str] = []
    for policy in spec.policies:
        values = renderable(template, policy)
        if values is None:
            open_ended.append(policy)
        else:
            known.extend(v for v in values if v not in known)
    return known, open_ended


def _vault_token(t: ScopeTemplate, names: Names) -> list[Requirement]:
    assert isinstance(t.backend, VaultTokenBackend)
    role = names.token_role or "<vault.token_role>"
    known, open_ended = vault_policies(t, t.backend)
    out: list[Requirement] = []
    for policy in known:
        out.append(
            Requirement(
                t.name,
                f"OpenBao/Vault has the ACL policy {policy!r}, granting no sudo",
                f"bao policy write {policy} {policy}.hcl   (the paths this scope may use)",
                key=("policy", policy),
            )
        )
        out.append(
            Requirement(
                t.name,
                f"the broker's token role {role!r} allows the policy {policy!r}",
                f"bao write auth/token/roles/{role} allowed_policies=<the ones it has>,{policy}",
                key=("role_allows", policy),
            )
        )
    for policy in open_ended:
        bound = ", ".join(t.backend.maximum.policies) if t.backend.maximum else "nothing"
        out.append(
            Requirement(
                t.name,
                f"every policy {policy!r} can render (bounded by {bound}) exists in OpenBao/Vault "
                f"and is allowed by the token role {role!r}",
                f"create each one the parameter may name, and allow them on the role: "
                f"bao write auth/token/roles/{role} allowed_policies_glob={bound}",
                key=("open_policy", policy),
            )
        )
    return out


def _vault_database(t: ScopeTemplate, names: Names) -> list[Requirement]:
    assert isinstance(t.backend, VaultDatabaseBackend)
    spec = t.backend
    roles = renderable(t, spec.role) or [spec.role]
    out = []
    for role in roles:
        out.append(
            Requirement(
                t.name,
                f"the database secrets engine at {spec.mount!r} has the role {role!r}",
                f"bao write {spec.mount}/roles/{role} db_name=<connection> "
                "creation_statements=@create.sql default_ttl=15m max_ttl=1h",
                key=("database_role", role),
            )
        )
    lease = names.lease_token_role or "<vault.lease_token_role>"
    out.append(
        Requirement(
            t.name,
            f"the broker may read {spec.mount}/creds/* (through its token and the lease token "
            f"role {lease!r})",
            f'a policy with path "{spec.mount}/creds/*" {{ capabilities = ["read"] }} on the '
            "broker's token and on the lease token role's allowed policy",
            key=("creds", spec.mount),
        )
    )
    return out


def trust_statement(principal: str) -> str:
    """The trust policy statement that lets ``principal`` (the broker) use a role as it does."""
    actions = ", ".join(f'"{a}"' for a in STS_ACTIONS)
    return f'{{"Effect": "Allow", "Principal": {{"AWS": "{principal}"}}, "Action": [{actions}]}}'


def _aws_sts(t: ScopeTemplate, names: Names) -> list[Requirement]:
    assert isinstance(t.backend, AwsStsBackend)
    arn = t.backend.role_arn
    name = arn.split(":role/", 1)[1].rsplit("/", 1)[-1]
    return [
        Requirement(
            t.name,
            f"the IAM role {arn} exists, with a maximum session of at least "
            f"{t.backend.role_max_session} s",
            f"aws iam create-role --role-name {name} --assume-role-policy-document file://trust.json "
            f"--max-session-duration {t.backend.role_max_session}",
            key=("iam_role", arn),
        ),
        Requirement(
            t.name,
            f"the IAM role {arn} trusts the broker to assume it, tag the session and set its "
            "source identity",
            "add to its trust policy: " + trust_statement("<the broker's AWS principal>"),
            key=("trust", arn),
        ),
    ]


def _broker_jwt(t: ScopeTemplate, names: Names) -> list[Requirement]:
    assert isinstance(t.backend, BrokerJwtBackend)
    return [
        Requirement(
            t.name,
            "the broker has a signing key (its JWKS is at /.well-known/jwks.json)",
            "set BROKER_SIGNING_KEY_FILE (production); the service for audience "
            f"{t.backend.audience!r} verifies tokens against the broker's JWKS",
            key=("signing_key",),
        )
    ]


def _github_app(t: ScopeTemplate, names: Names) -> list[Requirement]:
    assert isinstance(t.backend, GitHubAppBackend)
    spec = t.backend
    levels: dict[str, str] = dict(spec.maximum.permissions or {}) if spec.maximum else {}
    for name, level in spec.permissions.items():
        if not PLACEHOLDER.search(level):
            levels.setdefault(name, level)
    wanted = ", ".join(f"{name}: {level}" for name, level in sorted(levels.items()))
    return [
        Requirement(
            t.name,
            f"the broker's GitHub App is installed on {spec.owner!r} and holds {wanted}",
            f"install the App on {spec.owner} (Settings > GitHub Apps) and grant it {wanted} "
            "(the App's permissions page, then accept them on the installation)",
            key=("installation", spec.owner),
        )
    ]


#: The offline prerequisites of each template type (a new backend registers its own here).
REQUIREMENTS: dict[str, Callable[[ScopeTemplate, Names], list[Requirement]]] = {
    "vault_token": _vault_token,
    "vault_database": _vault_database,
    "aws_sts": _aws_sts,
    "broker_jwt": _broker_jwt,
    "github_app": _github_app,
}


def requirements(template: ScopeTemplate, names: Names | None = None) -> list[Requirement]:
    """What ``template`` needs at its backend, unchecked."""
    how = REQUIREMENTS.get(template.backend.type)
    if how is None:
        return [
            Requirement(
                template.name,
                f"the broker knows how to check {template.backend.type!r} templates",
                "register its prerequisites in broker.scopes.prerequisites.REQUIREMENTS",
                status="unknown",
            )
        ]
    return how(template, names or Names())
