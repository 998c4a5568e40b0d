"""Scope templates: what an agent may ask for, as admins wrote it under ``scopes/``.

These models are the single source of the published JSON Schema (``broker scopes schema``).

Parameters reach a backend only through **placeholders** of the form ``{{params.NAME}}`` (spaces
inside the braces allowed), and only in the fields that document it:

- ``vault_token.policies[*]`` and ``vault_database.role``: a Vault name (``[A-Za-z0-9_.-]``);
- string values inside ``aws_sts.session_policy`` (never keys, ``Effect``, ``Version`` or ``Sid``)
  and ``aws_sts.tags`` values;
- string values inside ``broker_jwt.claims``;
- ``github_app.owner``, ``github_app.repositories[*]`` (GitHub's login and name alphabets) and
  the *levels* of ``github_app.permissions`` (never their names).

Substitution happens in :mod:`broker.scopes.render` on the parsed data, never on serialised JSON,
and the result must stay within the backend's declared ``maximum``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from broker.domain.conditions import ConditionSet
from broker.domain.patterns import LinearPattern

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
PARAM_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"

#: ``{{params.NAME}}``; the only placeholder syntax. IAM's own ``${aws:...}`` policy variables and
#: Vault's ``{{identity...}}`` templating are deliberately different, so neither can be confused
#: with (or smuggled in as) a parameter.
PLACEHOLDER = re.compile(r"\{\{\s*params\.([a-z][a-z0-9_]{0,63})\s*\}\}")

#: STS rejects session policies above this many characters (before its own packed-size check).
STS_POLICY_MAX_CHARS = 2048
#: STS issues credentials for at least this long, whatever the caller asks.
STS_MIN_DURATION = 900
#: Claims a broker JWT template may not set: the broker owns them.
RESERVED_JWT_CLAIMS = frozenset({"iss", "sub", "aud", "exp", "iat", "nbf", "jti"})


def placeholders(text: str) -> list[str]:
    """The parameter names a string refers to, in order."""
    return PLACEHOLDER.findall(text)


def has_stray_braces(text: str) -> bool:
    """True when ``{{`` or ``}}`` remains after removing well-formed placeholders (a typo)."""
    rest = PLACEHOLDER.sub("", text)
    return "{{" in rest or "}}" in rest


def walk_strings(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every string *value* in a JSON-like structure, with its path (keys are not values)."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from walk_strings(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk_strings(v, (*path, i))


def walk_keys(
    value: Any, path: tuple[str | int, ...] = ()
) -> Iterator[tuple[tuple[str | int, ...], str]]:
    """Every mapping key in a JSON-like structure, with the path of its mapping."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield path, str(k)
            yield from walk_keys(v, (*path, str(k)))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from walk_keys(v, (*path, i))


def glob_covers(maximum: str, value: str, *, ignore_case: bool = False) -> bool:
    """True when every string ``value`` can denote is also denoted by ``maximum``.

    Both are IAM-style globs (``*`` any run, ``?`` one character). A ``*`` in ``maximum`` absorbs
    anything in ``value``, including its wildcards; a ``?`` in ``maximum`` absorbs one ordinary
    character only, so ``value``'s ``*`` (which may stand for many) never slips through it.
    """
    parts: list[str] = []
    for ch in maximum:
        if ch == "*":
            parts.append(".*")
        elif ch == "?":
            parts.append(r"[^*?]")
        else:
            parts.append(re.escape(ch))
    return _covering("".join(parts), ignore_case).fullmatch(value)


@functools.lru_cache(maxsize=1024)
def _covering(source: str, ignore_case: bool) -> LinearPattern:
    # Linear time: a maximum with many stars would make a backtracking engine try every split
    # of the rendered value (which carries the agent's parameters) between them.
    return LinearPattern(("(?i)" if ignore_case else "") + source, dot_matches_newline=True)


class RiskTier(StrEnum):
    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


class ParamType(StrEnum):
    STRING = "string"
    INTEGER = "integer"
    BOOLEAN = "boolean"


class Parameter(BaseModel):
    """A typed parameter the agent supplies with its request.

    Strings always refuse globs, quotes, commas, backslashes, ``..``, braces and control characters,
    whatever ``pattern`` says; ``pattern`` must match the *whole* value.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType = ParamType.STRING
    description: str = ""
    required: bool = True
    default: str | int | bool | None = None
    pattern: str | None = Field(
        default=None,
        description="A regular expression (RE2 syntax: no backreferences or lookaround) matched "
        "against the whole value, in time linear in the value.",
    )
    enum: list[str | int] | None = Field(default=None, min_length=1)
    min_length: int | None = Field(default=None, ge=0)
    max_length: int = Field(default=256, ge=1, le=4096)
    minimum: int | None = None
    maximum: int | None = None

    _linear: LinearPattern | None = PrivateAttr(default=None)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            LinearPattern(pattern)  # refuses what the linear-time engine cannot run
        return pattern

    def pattern_matches(self, value: str) -> bool:
        """Whether ``value`` matches ``pattern`` as a whole (True without a pattern)."""
        if self.pattern is None:
            return True
        if self._linear is None:
            self._linear = LinearPattern(self.pattern)
        return self._linear.fullmatch(value)

    @model_validator(mode="after")
    def _coherent(self) -> Parameter:
        if self.type is not ParamType.STRING and (
            self.pattern is not None or self.min_length is not None
        ):
            raise ValueError("pattern and min_length apply to string parameters only")
        if self.type is not ParamType.INTEGER and (
            self.minimum is not None or self.maximum is not None
        ):
            raise ValueError("minimum and maximum apply to integer parameters only")
        if self.type is ParamType.BOOLEAN and self.enum is not None:
            raise ValueError("a boolean parameter takes no enum")
        if self.min_length is not None and self.min_length > self.max_length:
            raise ValueError("min_length must not exceed max_length")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError("minimum must not exceed maximum")
        if self.enum is not None:
            want = str if self.type is ParamType.STRING else int
            if any(isinstance(v, bool) or not isinstance(v, want) for v in self.enum):
                raise ValueError(f"every enum value must be a {self.type.value}")
        if self.default is not None:
            ok = {
                ParamType.STRING: isinstance(self.default, str),
                ParamType.INTEGER: isinstance(self.default, int)
                and not isinstance(self.default, bool),
                ParamType.BOOLEAN: isinstance(self.default, bool),
            }[self.type]
            if not ok:
                raise ValueError(f"default must be a {self.type.value}")
        return self


_VAULT_NAME = r"^(?:[A-Za-z0-9_.-]|\{\{\s*params\.[a-z][a-z0-9_]{0,63}\s*\}\}){1,256}$"


class VaultTokenMaximum(BaseModel):
    """The widest a rendered ``vault_token`` may be: each policy must match one of these globs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policies: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.*?-]{1,128}$")]] = Field(
        min_length=1
    )


class VaultTokenBackend(BaseModel):
    """An OpenBao/Vault child token carrying fixed (or parameterised) policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["vault_token"]
    policies: list[Annotated[str, Field(pattern=_VAULT_NAME)]] = Field(min_length=1)
    no_default_policy: bool = False
    maximum: VaultTokenMaximum | None = None


class VaultDatabaseMaximum(BaseModel):
    """The widest a rendered ``vault_database`` may be: the role must match one of these globs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    roles: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_*?-]{1,128}$")]] = Field(min_length=1)


class VaultDatabaseBackend(BaseModel):
    """Dynamic credentials from a database secrets engine role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["vault_database"]
    mount: str = Field(default="database", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    role: str = Field(pattern=_VAULT_NAME)
    maximum: VaultDatabaseMaximum | None = None


class AwsPolicyMaximum(BaseModel):
    """The widest a rendered session policy may be.

    Every ``Allow`` statement's actions must each be covered by one of ``actions`` (case-insensitive)
    and its resources by one of ``resources``; both are IAM-style globs.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    actions: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=1)
    resources: list[Annotated[str, Field(min_length=1, max_length=2048)]] = Field(min_length=1)


class AwsStsBackend(BaseModel):
    """AWS AssumeRole with a session policy rendered from parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["aws_sts"]
    role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
    session_policy: dict[str, Any] | None = None
    external_id: str | None = Field(default=None, min_length=2, max_length=1224)
    tags: dict[Annotated[str, Field(pattern=r"^[\w.:/=+@-]{1,128}$")], str] = Field(
        default_factory=dict, max_length=50
    )
    role_max_session: int = Field(default=3600, ge=900, le=43_200)
    maximum: AwsPolicyMaximum | None = None


class BrokerJwtBackend(BaseModel):
    """A short-lived JWT signed by the broker itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["broker_jwt"]
    audience: str = Field(min_length=1)
    claims: dict[str, Any] = Field(default_factory=dict)


_PARAM = r"\{\{\s*params\.[a-z][a-z0-9_]{0,63}\s*\}\}"
_GITHUB_OWNER = rf"^(?:[A-Za-z0-9-]|{_PARAM}){{1,256}}$"
_GITHUB_REPOSITORY = rf"^(?:[A-Za-z0-9._-]|{_PARAM}){{1,256}}$"
_GITHUB_LEVEL = rf"^(?:read|write|admin|{_PARAM})$"
_GITHUB_PERMISSION = r"^[a-z][a-z0-9_]{0,63}$"
GitHubLevel = Literal["read", "write", "admin"]


class GitHubAppMaximum(BaseModel):
    """The widest a rendered ``github_app`` request may be.

    ``owners`` and ``repositories`` are globs (``*``, ``?``) matched case-insensitively, as
    GitHub compares logins and names; ``permissions`` caps each permission's level.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    owners: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9*?-]{1,39}$")]] | None = Field(
        default=None, min_length=1
    )
    repositories: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._*?-]{1,100}$")]] | None = Field(
        default=None, min_length=1
    )
    permissions: dict[Annotated[str, Field(pattern=_GITHUB_PERMISSION)], GitHubLevel] | None = (
        Field(default=None, min_length=1)
    )


class GitHubAppBackend(BaseModel):
    """A GitHub App installation token narrowed to named repositories and permissions.

    ``owner`` (an organisation or user login) names the installation; ``repositories`` (names
    in that owner) or ``repository_ids`` narrow the token, or ``all_repositories: true`` says
    on purpose that it covers every repository the installation can reach (org-level work).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["github_app"]
    owner: str = Field(pattern=_GITHUB_OWNER)
    owner_type: Literal["organization", "user"] = "organization"
    repositories: list[Annotated[str, Field(pattern=_GITHUB_REPOSITORY)]] = Field(
        default_factory=list, max_length=500
    )
    repository_ids: list[Annotated[int, Field(ge=1)]] = Field(default_factory=list, max_length=500)
    all_repositories: bool = False
    permissions: dict[
        Annotated[str, Field(pattern=_GITHUB_PERMISSION)],
        Annotated[str, Field(pattern=_GITHUB_LEVEL)],
    ] = Field(min_length=1, max_length=100)
    maximum: GitHubAppMaximum | None = None

    @model_validator(mode="after")
    def _one_selection(self) -> GitHubAppBackend:
        chosen = [bool(self.repositories), bool(self.repository_ids), self.all_repositories]
        if sum(chosen) != 1:
            raise ValueError(
                "name the token's repositories: exactly one of repositories, repository_ids "
                "or all_repositories: true"
            )
        return self


BackendSpec = Annotated[
    VaultTokenBackend | VaultDatabaseBackend | AwsStsBackend | BrokerJwtBackend | GitHubAppBackend,
    Field(discriminator="type"),
]
AnyBackend = (
    VaultTokenBackend | VaultDatabaseBackend | AwsStsBackend | BrokerJwtBackend | GitHubAppBackend
)


class TtlRule(BaseModel):
    """Credential lifetime in seconds: ``default`` when the agent names none, never above ``max``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: int = Field(default=900, ge=60)
    max: int = Field(default=3600, ge=60)

    @model_validator(mode="after")
    def _ordered(self) -> TtlRule:
        if self.default > self.max:
            raise ValueError("ttl.default must not exceed ttl.max")
        return self


class ApprovalRule(BaseModel):
    """How a request is decided: automatically, or by ``count`` distinct approvers.

    ``request_ttl``: how long a request may wait for its approvers. ``approval_ttl``: how long an
    approval stays valid, both while further approvers are awaited and between the decision and
    the mint. ``notify``: names of configured webhooks to tell (all of them when empty).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "manual"] = "auto"
    approvers: ConditionSet | None = None
    count: int = Field(default=1, ge=1, le=10)
    request_ttl: int = Field(default=3600, ge=60, le=7 * 86_400)
    approval_ttl: int = Field(default=900, ge=60, le=86_400)
    notify: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _manual_needs_approvers(self) -> ApprovalRule:
        if self.mode == "manual" and self.approvers is None:
            raise ValueError("a manual approval rule needs 'approvers' conditions")
        if self.mode == "auto" and (self.approvers is not None or self.count != 1):
            raise ValueError("an automatic approval rule takes no 'approvers' or 'count'")
        return self

    @property
    def required(self) -> int:
        """Distinct approvals needed: none for automatic rules."""
        return 0 if self.mode == "auto" else self.count


class RateWindow(BaseModel):
    """At most ``requests`` task requests per ``per`` seconds (a fixed window)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(ge=1, le=1_000_000)
    per: int = Field(ge=1, le=30 * 86_400)


class Limits(BaseModel):
    """Rate limits and quotas on requests for this scope.

    ``principal``: windows counted per requesting principal; ``scope``: counted over everyone.
    A long window (a day, a week) is a quota.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    principal: list[RateWindow] = Field(default_factory=list, max_length=5)
    scope: list[RateWindow] = Field(default_factory=list, max_length=5)


class ScopeTemplate(BaseModel):
    """One reviewed scope template file."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="Scope template",
        json_schema_extra={"$comment": "Generated by `broker scopes schema`; see docs/scopes.md."},
    )

    name: str = Field(pattern=NAME_PATTERN, description="Must equal the file name without .yaml.")
    description: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    backend: BackendSpec
    parameters: dict[Annotated[str, Field(pattern=PARAM_NAME_PATTERN)], Parameter] = Field(
        default_factory=dict
    )
    requester: ConditionSet = Field(description="Conditions on the requester's verified claims.")
    ttl: TtlRule = Field(default_factory=TtlRule)
    max_uses: int | None = Field(
        default=None, ge=1, description="Uses of the credential; only backends that count uses."
    )
    max_active_tasks: int = Field(
        default=5, ge=1, le=1000, description="Open tasks per principal for this scope."
    )
    risk: RiskTier = RiskTier.LOW
    share: Literal["session", "principal"] = Field(
        default="session",
        description=(
            "Who may reach a task of this scope: 'session' (the session that requested it, and "
            "later sessions of the same CI run or pod), or 'principal' (every session of the "
            "requester, e.g. a person's CLI and their editor's agent)."
        ),
    )
    approval: ApprovalRule = Field(default_factory=ApprovalRule)
    limits: Limits = Field(default_factory=Limits)
    labels: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]{1,63}$")], str] = Field(
        default_factory=dict
    )

    @model_validator(mode="after")
    def _risk_needs_review(self) -> ScopeTemplate:
        if self.risk in (RiskTier.HIGH, RiskTier.CRITICAL) and self.approval.mode == "auto":
            raise ValueError(f"a {self.risk.value}-risk template cannot be approved automatically")
        return self
