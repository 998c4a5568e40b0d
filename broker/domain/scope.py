"""Scope templates: what an agent may ask for, as admins wrote it under ``scopes/``.

These models are the single source of the published JSON Schema (``broker scopes schema``).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.domain.conditions import ConditionSet

NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"


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
    """A typed parameter the agent supplies with its request."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType = ParamType.STRING
    description: str = ""
    required: bool = True
    default: str | int | bool | None = None
    pattern: str | None = None
    enum: list[str | int] | None = None
    min_length: int | None = Field(default=None, ge=0)
    max_length: int = Field(default=256, ge=1, le=4096)
    minimum: int | None = None
    maximum: int | None = None


class VaultTokenBackend(BaseModel):
    """An OpenBao/Vault child token carrying fixed policies."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["vault_token"]
    policies: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,128}$")]] = Field(min_length=1)
    no_default_policy: bool = False


class VaultDatabaseBackend(BaseModel):
    """Dynamic credentials from a database secrets engine role."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["vault_database"]
    mount: str = Field(default="database", pattern=r"^[A-Za-z0-9_-]{1,64}$")
    role: str = Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")


class AwsStsBackend(BaseModel):
    """AWS AssumeRole with a session policy rendered from parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["aws_sts"]
    role_arn: str = Field(pattern=r"^arn:aws[a-z-]*:iam::\d{12}:role/[A-Za-z0-9_+=,.@/-]{1,512}$")
    session_policy: dict[str, Any] | None = None
    external_id: str | None = Field(default=None, min_length=2, max_length=1224)
    tags: dict[str, str] = Field(default_factory=dict)
    role_max_session: int = Field(default=3600, ge=900, le=43_200)


class BrokerJwtBackend(BaseModel):
    """A short-lived JWT signed by the broker itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["broker_jwt"]
    audience: str = Field(min_length=1)
    claims: dict[str, Any] = Field(default_factory=dict)


BackendSpec = Annotated[
    VaultTokenBackend | VaultDatabaseBackend | AwsStsBackend | BrokerJwtBackend,
    Field(discriminator="type"),
]


class TtlRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    default: int = Field(default=900, ge=60)
    max: int = Field(default=3600, ge=60)

    @model_validator(mode="after")
    def _ordered(self) -> TtlRule:
        if self.default > self.max:
            raise ValueError("ttl.default must not exceed ttl.max")
        return self


class ApprovalRule(BaseModel):
    """How a request is decided: automatically, or by ``count`` distinct approvers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["auto", "manual"] = "auto"
    approvers: ConditionSet | None = None
    count: int = Field(default=1, ge=1, le=10)
    request_ttl: int = Field(default=3600, ge=60, le=7 * 86_400)
    approval_ttl: int = Field(default=900, ge=60, le=86_400)

    @model_validator(mode="after")
    def _manual_needs_approvers(self) -> ApprovalRule:
        if self.mode == "manual" and self.approvers is None:
            raise ValueError("a manual approval rule needs 'approvers' conditions")
        return self


class ScopeTemplate(BaseModel):
    """One reviewed scope template file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field(min_length=1)
    owner: str = Field(min_length=1)
    backend: BackendSpec
    parameters: dict[Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")], Parameter] = Field(
        default_factory=dict
    )
    requester: ConditionSet
    ttl: TtlRule = Field(default_factory=TtlRule)
    max_uses: int | None = Field(default=None, ge=1)
    max_active_tasks: int = Field(default=5, ge=1, le=1000)
    risk: RiskTier = RiskTier.LOW
    approval: ApprovalRule = Field(default_factory=ApprovalRule)
    labels: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _risk_needs_review(self) -> ScopeTemplate:
        if self.risk in (RiskTier.HIGH, RiskTier.CRITICAL) and self.approval.mode == "auto":
            raise ValueError(f"a {self.risk.value}-risk template cannot be approved automatically")
        return self
