"""Checks beyond the schema: what a template asks for must be something the broker can enforce.

:func:`check_template` returns findings with the path of the field they concern; the loader maps
each path to a line of the YAML file. An ``error`` keeps the template out of the catalog (the
server never serves a template that lint refuses); a ``warning`` is reported only.

The rules, each with a stable ``rule`` id (documented in ``docs/scopes.md``):

- ``backend-cannot-count-uses``: ``max_uses`` on a backend that cannot count uses;
- ``ttl-unenforceable``: a TTL below STS's 900 s floor or above the role's maximum session;
- ``placeholder-*``: placeholders that name no parameter, sit where no parameter may go, are
  malformed, or name an optional parameter without a default;
- ``maximum-missing`` / ``maximum-exceeded`` / ``maximum-unbounded``: parameterised settings with
  no declared maximum, fixed settings outside it, or a maximum that bounds nothing;
- ``policy-shape`` / ``policy-size``: a session policy STS would reject or that would widen;
- ``forbidden-policy``, ``reserved-claim``, ``default-invalid``, ``param-unused``,
  ``param-unconstrained`` (no pattern, or one that matches almost anything), ``requester-open``;
- ``github-permission``: a GitHub permission name or level GitHub's published schema does not
  have; ``github-all-repositories``: a token covering every repository of the installation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from broker.domain import github
from broker.domain.scope import (
    PLACEHOLDER,
    RESERVED_JWT_CLAIMS,
    STS_MIN_DURATION,
    STS_POLICY_MAX_CHARS,
    AwsStsBackend,
    BrokerJwtBackend,
    GitHubAppBackend,
    ParamType,
    ScopeTemplate,
    VaultDatabaseBackend,
    VaultTokenBackend,
    glob_covers,
    has_stray_braces,
    walk_keys,
    walk_strings,
)
from broker.domain.vault_policies import ROOT_ONLY, ForbiddenPolicies, vault_policy_name
from broker.errors import ValidationFailed
from broker.scopes.params import check_value
from broker.scopes.render import check_session_policy, compact_json

Loc = tuple[str | int, ...]
Severity = Literal["error", "warning"]

#: Backends that can enforce a use count on the credential itself.
COUNTS_USES = frozenset({"vault_token"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a template: where (a field path), what, and how bad."""

    loc: Loc
    rule: str
    message: str
    severity: Severity = "error"


def _placeholder_findings(
    template: ScopeTemplate, text: str, loc: Loc, used: set[str]
) -> list[Finding]:
    out: list[Finding] = []
    if has_stray_braces(text):
        out.append(
            Finding(loc, "placeholder-malformed", "malformed placeholder; write {{params.NAME}}")
        )
    for name in PLACEHOLDER.findall(text):
        used.add(name)
        spec = template.parameters.get(name)
        if spec is None:
            out.append(Finding(loc, "placeholder-unknown", f"no parameter named {name!r}"))
        elif not spec.required and spec.default is None:
            out.append(
                Finding(
                    loc,
                    "placeholder-optional",
                    f"parameter {name!r} is optional with no default; a backend setting needs a value",
                )
            )
    return out


def _no_placeholder(text: str | None, loc: Loc, what: str) -> list[Finding]:
    if text is not None and ("{{" in text or "}}" in text):
        return [Finding(loc, "placeholder-forbidden", f"{what} cannot take a parameter")]
    return []


def _check_vault_token(
    t: ScopeTemplate, spec: VaultTokenBackend, used: set[str], forbidden: ForbiddenPolicies
) -> list[Finding]:
    out: list[Finding] = []
    parameterised = False
    for i, policy in enumerate(spec.policies):
        loc: Loc = ("backend", "policies", i)
        found = _placeholder_findings(t, policy, loc, used)
        out.extend(found)
        if PLACEHOLDER.search(policy):
            parameterised = True
            continue
        if policy in forbidden:
            out.append(
                Finding(
                    loc,
                    "forbidden-policy",
                    f"Vault reads {policy!r} as {vault_policy_name(policy)!r}, which is never "
                    "granted (root, or forbidden by the administrator)",
                )
            )
        elif spec.maximum is not None and not any(
            glob_covers(vault_policy_name(m), vault_policy_name(policy))
            for m in spec.maximum.policies
        ):
            out.append(
                Finding(loc, "maximum-exceeded", f"policy {policy!r} is outside backend.maximum")
            )
    if parameterised and spec.maximum is None:
        out.append(
            Finding(
                ("backend", "policies"),
                "maximum-missing",
                "parameterised policies need backend.maximum.policies to bound them",
            )
        )
    if spec.maximum is not None:
        for i, m in enumerate(spec.maximum.policies):
            if m.strip("*") == "":
                out.append(
                    Finding(
                        ("backend", "maximum", "policies", i),
                        "maximum-unbounded",
                        "a maximum of '*' allows any policy, including privileged ones",
                    )
                )
    return out


def _check_vault_database(
    t: ScopeTemplate, spec: VaultDatabaseBackend, used: set[str]
) -> list[Finding]:
    loc: Loc = ("backend", "role")
    out = _placeholder_findings(t, spec.role, loc, used)
    if PLACEHOLDER.search(spec.role):
        if spec.maximum is None:
            out.append(
                Finding(
                    loc,
                    "maximum-missing",
                    "a parameterised role needs backend.maximum.roles to bound it",
                )
            )
    elif spec.maximum is not None and not any(
        glob_covers(m, spec.role) for m in spec.maximum.roles
    ):
        out.append(
            Finding(loc, "maximum-exceeded", f"role {spec.role!r} is outside backend.maximum")
        )
    return out


def _worst_case(template: ScopeTemplate, text: str) -> str:
    """``text`` with each placeholder filled by the longest value its parameter admits."""

    def longest(name: str) -> str:
        spec = template.parameters.get(name)
        if spec is None:
            return ""
        if spec.enum is not None:
            return max((str(v) for v in spec.enum), key=len)
        if spec.type is ParamType.STRING:
            return "x" * spec.max_length
        if spec.type is ParamType.BOOLEAN:
            return "false"
        return "-" + "9" * 19

    return PLACEHOLDER.sub(lambda m: longest(m.group(1)), text)


def _check_aws(t: ScopeTemplate, spec: AwsStsBackend, used: set[str]) -> list[Finding]:  # noqa: PLR0912  # one branch per documented rule
    out: list[Finding] = []
    out.extend(_no_placeholder(spec.external_id, ("backend", "external_id"), "external_id"))
    if t.ttl.default < STS_MIN_DURATION or t.ttl.max < STS_MIN_DURATION:
        field = "default" if t.ttl.default < STS_MIN_DURATION else "max"
        out.append(
            Finding(
                ("ttl", field),
                "ttl-unenforceable",
                f"STS issues credentials for at least {STS_MIN_DURATION} s; a shorter TTL cannot be enforced",
            )
        )
    if t.ttl.max > spec.role_max_session:
        out.append(
            Finding(
                ("ttl", "max"),
                "ttl-unenforceable",
                f"ttl.max exceeds the role's maximum session ({spec.role_max_session} s)",
            )
        )
    for key, value in spec.tags.items():
        out.extend(_placeholder_findings(t, value, ("backend", "tags", key), used))
    policy = spec.session_policy
    if policy is None:
        return out
    parameterised = False
    for path, key in walk_keys(policy):
        if "{{" in key or "}}" in key:
            out.append(
                Finding(
                    ("backend", "session_policy", *path),
                    "placeholder-forbidden",
                    "a policy key cannot take a parameter",
                )
            )
    for path, text in walk_strings(policy):
        loc: Loc = ("backend", "session_policy", *path)
        out.extend(_placeholder_findings(t, text, loc, used))
        if PLACEHOLDER.search(text):
            parameterised = True
            fixed_key = next((p for p in reversed(path) if isinstance(p, str)), None)
            if fixed_key in ("Version", "Effect", "Sid"):
                out.append(
                    Finding(loc, "placeholder-forbidden", f"{fixed_key} cannot take a parameter")
                )
    if parameterised and spec.maximum is None:
        out.append(
            Finding(
                ("backend", "session_policy"),
                "maximum-missing",
                "a parameterised session policy needs backend.maximum (actions and resources)",
            )
        )
    if spec.maximum is not None:
        for field in ("actions", "resources"):
            for i, m in enumerate(getattr(spec.maximum, field)):
                if m.strip("*") == "" or m in ("arn:aws:s3:::*", "*:*"):
                    out.append(
                        Finding(
                            ("backend", "maximum", field, i),
                            "maximum-unbounded",
                            f"{m!r} bounds nothing",
                            "warning",
                        )
                    )
    # The fixed parts must already be a valid policy within the maximum; parameterised values
    # are checked when a request renders them.
    try:
        check_session_policy(
            policy,
            spec.maximum,
            unchecked=lambda v: PLACEHOLDER.search(v) is not None,
            check_size=False,
        )
    except ValidationFailed as exc:
        rule = "maximum-exceeded" if exc.code == "scope_maximum_exceeded" else "policy-shape"
        out.append(Finding(("backend", "session_policy"), rule, exc.detail))
    text = compact_json(policy)
    least = len(PLACEHOLDER.sub("", text))
    worst = len(_worst_case(t, text))
    if least > STS_POLICY_MAX_CHARS:
        out.append(
            Finding(
                ("backend", "session_policy"),
                "policy-size",
                f"the session policy exceeds STS's {STS_POLICY_MAX_CHARS} characters",
            )
        )
    elif worst > STS_POLICY_MAX_CHARS:
        out.append(
            Finding(
                ("backend", "session_policy"),
                "policy-size",
                f"with the longest parameter values the policy reaches {worst} characters "
                f"(STS takes {STS_POLICY_MAX_CHARS}); such requests will be refused",
                "warning",
            )
        )
    return out


def _check_jwt(t: ScopeTemplate, spec: BrokerJwtBackend, used: set[str]) -> list[Finding]:
    out = _no_placeholder(spec.audience, ("backend", "audience"), "audience")
    for claim in sorted(RESERVED_JWT_CLAIMS.intersection(spec.claims)):
        out.append(
            Finding(("backend", "claims", claim), "reserved-claim", "the broker sets this claim")
        )
    for path, key in walk_keys(spec.claims):
        if "{{" in key:
            out.append(
                Finding(
                    ("backend", "claims", *path),
                    "placeholder-forbidden",
                    "a claim name cannot take a parameter",
                )
            )
    for path, text in walk_strings(spec.claims):
        out.extend(_placeholder_findings(t, text, ("backend", "claims", *path), used))
    return out


def _github_maximum_findings(spec: GitHubAppBackend) -> list[Finding]:
    out: list[Finding] = []
    maximum = spec.maximum
    if maximum is None:
        return out
    for field in ("owners", "repositories"):
        for i, m in enumerate(getattr(maximum, field) or []):
            if m.strip("*") == "":
                out.append(
                    Finding(
                        ("backend", "maximum", field, i),
                        "maximum-unbounded",
                        f"{m!r} bounds nothing",
                        "warning",
                    )
                )
    for name, level in (maximum.permissions or {}).items():
        for problem in github.permission_catalog().problems({name: level}):
            out.append(
                Finding(("backend", "maximum", "permissions", name), "github-permission", problem)
            )
    return out


def _check_github(t: ScopeTemplate, spec: GitHubAppBackend, used: set[str]) -> list[Finding]:  # noqa: PLR0912  # one branch per documented rule
    out: list[Finding] = []
    maximum = spec.maximum
    if t.ttl.max > github.TOKEN_LIFETIME:
        out.append(
            Finding(
                ("ttl", "max"),
                "ttl-unenforceable",
                f"GitHub installation tokens last {github.TOKEN_LIFETIME} s; a task cannot outlive its token",
            )
        )
    owner_loc: Loc = ("backend", "owner")
    out.extend(_placeholder_findings(t, spec.owner, owner_loc, used))
    owners = maximum.owners if maximum is not None else None
    if PLACEHOLDER.search(spec.owner):
        if owners is None:
            out.append(
                Finding(
                    owner_loc,
                    "maximum-missing",
                    "a parameterised owner needs backend.maximum.owners",
                )
            )
    elif owners is not None and not any(
        glob_covers(m, spec.owner, ignore_case=True) for m in owners
    ):
        out.append(
            Finding(
                owner_loc, "maximum-exceeded", f"owner {spec.owner!r} is outside backend.maximum"
            )
        )
    repos = maximum.repositories if maximum is not None else None
    for i, repo in enumerate(spec.repositories):
        loc: Loc = ("backend", "repositories", i)
        out.extend(_placeholder_findings(t, repo, loc, used))
        if PLACEHOLDER.search(repo):
            if repos is None:
                out.append(
                    Finding(
                        loc,
                        "maximum-missing",
                        "a parameterised repository needs backend.maximum.repositories",
                    )
                )
        elif repos is not None and not any(glob_covers(m, repo, ignore_case=True) for m in repos):
            out.append(
                Finding(loc, "maximum-exceeded", f"repository {repo!r} is outside backend.maximum")
            )
    if spec.all_repositories:
        if repos is not None:
            out.append(
                Finding(
                    ("backend", "all_repositories"),
                    "maximum-exceeded",
                    "all_repositories reaches beyond backend.maximum.repositories",
                )
            )
        else:
            out.append(
                Finding(
                    ("backend", "all_repositories"),
                    "github-all-repositories",
                    "the token reaches every repository the installation can; name repositories where you can",
                    "warning",
                )
            )
    caps = maximum.permissions if maximum is not None else None
    for name, level in spec.permissions.items():
        loc = ("backend", "permissions", name)
        out.extend(_placeholder_findings(t, level, loc, used))
        if name not in github.permission_catalog().levels:
            out.append(
                Finding(loc, "github-permission", f"{name!r} is not a GitHub App permission")
            )
            continue
        if PLACEHOLDER.search(level):
            if caps is None or name not in caps:
                out.append(
                    Finding(
                        loc,
                        "maximum-missing",
                        "a parameterised permission level needs backend.maximum.permissions to cap it",
                    )
                )
            continue
        for problem in github.permission_catalog().problems({name: level}):
            out.append(Finding(loc, "github-permission", problem))
        if caps is not None and github.exceeding({name: level}, caps):
            out.append(
                Finding(
                    loc, "maximum-exceeded", f"{name}: {level} is above backend.maximum.permissions"
                )
            )
    out.extend(_github_maximum_findings(spec))
    return out


#: Values a pattern written for one purpose would not admit all of: a pattern that fully matches
#: every one of them constrains nothing (``.*``, ``.+``, ``[\\s\\S]*``, ``.{1,64}``, ...).
_PROBES = ("a", "Z9", "-", "_", ".", "/", "@", ":", "=", " ", "x y", "a/b", "root", "é", "A" * 64)


def matches_anything(pattern: str) -> bool:
    """Whether ``pattern`` (matched whole, as parameters are) admits every probe value."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return False
    return all(compiled.fullmatch(probe) for probe in _PROBES)


def check_template(  # noqa: PLR0912  # one branch per documented rule
    template: ScopeTemplate, *, forbidden: ForbiddenPolicies = ROOT_ONLY
) -> list[Finding]:
    """Every semantic finding for one (schema-valid) template."""
    out: list[Finding] = []
    spec = template.backend
    if template.max_uses is not None and spec.type not in COUNTS_USES:
        out.append(
            Finding(
                ("max_uses",),
                "backend-cannot-count-uses",
                f"the {spec.type} backend cannot count uses; remove max_uses",
            )
        )
    used: set[str] = set()
    if isinstance(spec, VaultTokenBackend):
        out.extend(_check_vault_token(template, spec, used, forbidden))
    elif isinstance(spec, VaultDatabaseBackend):
        out.extend(_check_vault_database(template, spec, used))
    elif isinstance(spec, AwsStsBackend):
        out.extend(_check_aws(template, spec, used))
    elif isinstance(spec, GitHubAppBackend):
        out.extend(_check_github(template, spec, used))
    else:
        out.extend(_check_jwt(template, spec, used))

    for name, param in template.parameters.items():
        if param.default is not None:
            try:
                check_value(name, param, param.default)
            except ValidationFailed as exc:
                out.append(Finding(("parameters", name, "default"), "default-invalid", exc.detail))
        if param.required and param.default is not None:
            out.append(
                Finding(
                    ("parameters", name, "required"),
                    "default-invalid",
                    "a parameter with a default is never required; drop 'required: true'",
                    "warning",
                )
            )
        if name not in used:
            out.append(
                Finding(
                    ("parameters", name),
                    "param-unused",
                    "no backend setting uses this parameter; it is only recorded",
                    "warning",
                )
            )
        elif param.type is ParamType.STRING and param.pattern is None and param.enum is None:
            out.append(
                Finding(
                    ("parameters", name),
                    "param-unconstrained",
                    "this string reaches a backend but has no pattern or enum: the agent chooses "
                    "what the backend gets; add a pattern that admits only what it needs",
                    "warning",
                )
            )
        elif (
            param.type is ParamType.STRING
            and param.pattern is not None
            and param.enum is None
            and matches_anything(param.pattern)
        ):
            out.append(
                Finding(
                    ("parameters", name, "pattern"),
                    "param-unconstrained",
                    f"the pattern {param.pattern!r} matches almost anything ('root', 'a/b', "
                    "'x y' alike), which is no better than no pattern: the agent chooses what "
                    "the backend gets; write one that admits only what it needs",
                    "warning",
                )
            )
    if template.share == "principal" and template.approval.mode == "manual":
        out.append(
            Finding(
                ("share",),
                "share-principal",
                "every session of the requester may use what approvers granted one request "
                "(another CI run of the same workflow, too); keep 'session' unless people "
                "need it",
                "warning",
            )
        )
    for key in ("all", "any"):
        for i, cond in enumerate(getattr(template.requester, key)):
            if cond.cel is not None and cond.cel.strip() == "true":
                out.append(
                    Finding(
                        ("requester", key, i, "cel"),
                        "requester-open",
                        "every principal of every trusted issuer may request this scope",
                        "warning",
                    )
                )
    return out
