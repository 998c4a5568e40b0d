"""Presets: the claim conventions of the identities agents actually carry.

A preset fills in what an issuer entry leaves out (issuer URL, algorithms, claim mapping, claims
that must be present). For issuers that sign tokens for many tenants - every repository on
github.com, every project on gitlab.com, every service account of a cluster - the preset also
insists that the trust rules pin the tenant: trusting ``https://token.actions.githubusercontent.com``
without saying *whose* workflows would hand sessions to anyone with a GitHub account.

A trust rule pins the tenant when one of its ``all`` conditions does (or every one of its
``any`` conditions does), and a condition pins it when it is an ``equals`` or ``one_of`` on a
tenant claim, or a ``glob``/``regex`` on a tenant claim whose literal beginning already names
the tenant (``my-org/*`` for ``repository``; ``.*`` or ``my-org*`` do not). CEL conditions may
refine a trust rule but never count as pinning: their meaning cannot be checked at load time.

The pinning conditions are also *enforced on their own* (:func:`tenant_pin`): ``trust_mode:
audit`` relaxes the rules on top of the pin, never the pin itself, so rolling out a new rule can
never let another tenant's token in. And an issuer entry naming a multi-tenant issuer's URL
without its preset (:func:`preset_problem`) is refused, so the pin cannot be skipped by
leaving the preset out.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from broker.domain.conditions import Condition, ConditionSet, Verdict


@dataclass(frozen=True, slots=True)
class TenantClaim:
    """A claim that names a tenant; ``prefix`` is what a glob/regex must start with to pin it."""

    claim: str
    prefix: str | None = None  # None: only a fully literal value pins (ids, owner names)


@dataclass(frozen=True, slots=True)
class Preset:
    """Defaults and load-time checks for one kind of issuer."""

    name: str
    issuer: str | None
    algorithms: tuple[str, ...]
    claims: Mapping[str, Any]
    required_claims: tuple[str, ...] = ()
    tenant_claims: tuple[TenantClaim, ...] = ()
    roles: tuple[str, ...] = ("agent",)
    notes: str = ""


GENERIC_CLAIMS: Mapping[str, Any] = {
    "subject": "sub",
    "display_name": "name",
    "groups": "groups",
    "roles": None,
}

PRESETS: dict[str, Preset] = {
    "generic": Preset(
        name="generic",
        issuer=None,
        algorithms=("RS256", "ES256", "EdDSA"),
        claims=GENERIC_CLAIMS,
        notes="any OpenID Connect provider: sub, name, groups",
    ),
    "dev": Preset(
        name="dev",
        issuer=None,
        algorithms=("ES256",),
        claims=GENERIC_CLAIMS,
        notes="the issuer `broker dev` starts; refused outside dev mode",
    ),
    "github-actions": Preset(
        name="github-actions",
        issuer="https://token.actions.githubusercontent.com",
        algorithms=("RS256",),
        claims={
            "subject": "sub",
            "display_name": "job_workflow_ref",
            "groups": None,
            "roles": None,
            # One workflow run (a re-run is another attempt, so another run).
            "run_identity": ["run_id", "run_attempt"],
            # The person who triggered the run never approves its requests.
            "person": ["actor"],
        },
        required_claims=(
            "repository",
            "repository_id",
            "repository_owner",
            "repository_owner_id",
            "ref",
            "event_name",
            "job_workflow_ref",
        ),
        tenant_claims=(
            TenantClaim("repository_owner"),
            TenantClaim("repository_owner_id"),
            TenantClaim("repository_id"),
            TenantClaim("repository", prefix=r"[^/]+/"),
            # Not job_workflow_ref: it names where a reusable workflow is defined, and any
            # repository may call a public reusable workflow of yours.
            TenantClaim("sub", prefix=r"repo:[^/:]+/"),
        ),
    ),
    "gitlab-ci": Preset(
        name="gitlab-ci",
        issuer="https://gitlab.com",
        algorithms=("RS256",),
        claims={
            "subject": "sub",
            "display_name": "project_path",
            "groups": None,
            "roles": None,
            "run_identity": ["pipeline_id", "job_id"],
            "person": ["user_login"],
        },
        required_claims=(
            "namespace_id",
            "namespace_path",
            "project_id",
            "project_path",
            "ref",
            "ref_type",
        ),
        tenant_claims=(
            TenantClaim("namespace_id"),
            TenantClaim("project_id"),
            TenantClaim("namespace_path", prefix=r"[^/]+/"),
            TenantClaim("project_path", prefix=r"[^/]+/"),
            TenantClaim("sub", prefix=r"project_path:[^/:]+/"),
        ),
    ),
    "kubernetes": Preset(
        name="kubernetes",
        issuer=None,
        algorithms=("RS256", "ES256"),
        claims={
            "subject": "sub",
            "display_name": None,
            "groups": None,
            "roles": None,
            # A pod-bound token names its pod; `kubectl create token` tokens name none.
            "run_identity": ["kubernetes.io.pod.uid"],
        },
        required_claims=("kubernetes.io.namespace", "kubernetes.io.serviceaccount.name"),
        tenant_claims=(
            TenantClaim("kubernetes.io.namespace"),
            TenantClaim("sub", prefix=r"system:serviceaccount:[^:]+:"),
        ),
    ),
}


def apply_defaults(data: Any) -> Any:
    """Fill an issuer entry's missing fields from its preset (the entry's own values win)."""
    if not isinstance(data, dict):
        return data
    preset = PRESETS.get(str(data.get("preset", "generic")))
    if preset is None:
        return data  # the field validator reports the unknown preset
    out = dict(data)
    if preset.issuer is not None:
        out.setdefault("issuer", preset.issuer)
    out.setdefault("algorithms", list(preset.algorithms))
    out.setdefault("required_claims", list(preset.required_claims))
    out.setdefault("roles", list(preset.roles))
    claims = out.get("claims")
    if claims is None:
        out["claims"] = dict(preset.claims)
    elif isinstance(claims, dict):
        out["claims"] = {**preset.claims, **claims}
    return out


_REGEX_META = set(".^$*+?{}[]\\|()")


def _literal_prefix(kind: str, pattern: str) -> str:
    """The beginning of a glob or regex that can only match itself."""
    stops = set("*?") if kind == "glob" else _REGEX_META
    for i, ch in enumerate(pattern):
        if ch in stops:
            return pattern[:i]
    return pattern


def _top_level_alternation(regex: str) -> bool:
    """True when ``|`` splits the whole regex (``a/.*|.*`` matches anything)."""
    depth, in_class, escaped = 0, False, False
    for ch in regex:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif in_class:
            in_class = ch != "]"
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            return True
    return False


def pins(condition: Condition, tenant: TenantClaim) -> bool:
    """Whether ``condition`` on its own restricts ``tenant.claim`` to named tenants."""
    if condition.claim != tenant.claim:
        return False
    if condition.equals is not None or condition.one_of is not None:
        return True
    if condition.glob is not None:
        kind, pattern = "glob", condition.glob
    elif condition.regex is not None:
        kind, pattern = "regex", condition.regex
        if _top_level_alternation(pattern):
            return False
    else:
        return False
    prefix = _literal_prefix(kind, pattern)
    if tenant.prefix is None:
        return prefix == pattern  # no wildcard at all
    return re.match(tenant.prefix, prefix) is not None


def tenant_problem(preset_name: str, trust: ConditionSet | None) -> str | None:
    """Why ``trust`` does not pin the tenant for this preset, or None when it does."""
    preset = PRESETS.get(preset_name)
    if preset is None or not preset.tenant_claims:
        return None
    names = ", ".join(t.claim for t in preset.tenant_claims)

    def pinned(cond: Condition) -> bool:
        return any(pins(cond, t) for t in preset.tenant_claims)

    if trust is not None and (
        any(pinned(c) for c in trust.all) or (trust.any and all(pinned(c) for c in trust.any))
    ):
        return None
    return (
        f"the {preset_name} preset trusts tokens of many tenants: its trust rules must pin one "
        f"with an equals, one_of, or a glob/regex with a literal tenant prefix on one of: {names}"
    )


@dataclass(frozen=True, slots=True)
class TenantPin:
    """The conditions of a trust rule that pin the tenant, enforced whatever ``trust_mode`` says."""

    all: tuple[Condition, ...]
    any: tuple[Condition, ...]

    def evaluate(self, claims: Mapping[str, Any]) -> Verdict:
        for cond in self.all:
            verdict = cond.evaluate(claims)
            if not verdict:
                return Verdict(False, f"tenant pin: {verdict.reason}")
        if self.any and not any(c.evaluate(claims) for c in self.any):
            return Verdict(False, "tenant pin: none of the pinning 'any' conditions was met")
        return Verdict(True, "tenant pinned")


def tenant_pin(preset_name: str, trust: ConditionSet | None) -> TenantPin | None:
    """The pinning part of ``trust`` for a multi-tenant preset (None: nothing to pin)."""
    preset = PRESETS.get(preset_name)
    if preset is None or not preset.tenant_claims or trust is None:
        return None

    def pinned(cond: Condition) -> bool:
        return any(pins(cond, t) for t in preset.tenant_claims)

    every = tuple(c for c in trust.all if pinned(c))
    some = tuple(trust.any) if trust.any and all(pinned(c) for c in trust.any) else ()
    if not every and not some:
        return None  # tenant_problem refuses such a configuration at load
    return TenantPin(every, some)


#: Issuers that sign tokens for every tenant of a shared platform, by host, and the preset
#: whose tenant pin they need.
MULTI_TENANT_HOSTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"token\.actions\.githubusercontent\.com"), "github-actions"),
    (re.compile(r"gitlab\.com"), "gitlab-ci"),
    (re.compile(r"oidc\.eks\.[a-z0-9-]+\.amazonaws\.com"), "kubernetes"),
    (re.compile(r"container\.googleapis\.com"), "kubernetes"),
    (re.compile(r"[a-z0-9-]+\.oic\.prod-aks\.azure\.com"), "kubernetes"),
)


def preset_problem(preset_name: str, issuer_url: str) -> str | None:
    """Why an entry for a known multi-tenant issuer must use its preset, or None."""
    host = (urlsplit(issuer_url).hostname or "").lower()
    for pattern, wanted in MULTI_TENANT_HOSTS:
        if pattern.fullmatch(host) and preset_name != wanted:
            return (
                f"{issuer_url} issues tokens to many tenants: configure it with "
                f"preset: {wanted}, whose trust rules must pin your tenant (with preset "
                f"{preset_name!r}, any tenant's token would open a session)"
            )
    return None
