"""Evaluate a template against sample claims and parameters, exactly as the broker would.

``broker scopes test`` runs this offline, so admins keep policy tests next to their templates and
run them in their own CI. The same functions decide real requests (:mod:`broker.services.tasks`):
parameter validation, TTL, rendering within the maximum, the requester's conditions and the
approval rule, and whether a given approver could decide.

A cases file (YAML)::

    cases:
      - name: developers read the replica at once
        scope: postgres-readonly
        claims: {sub: ci-bot, groups: [developers]}
        expect: approved            # approved | pending | denied | invalid
      - name: a DBA may approve read-write, the requester may not
        scope: postgres-readwrite
        claims: {sub: dev-1, groups: [developers, dba]}
        approver: {sub: dana, groups: [dba]}
        expect: pending
        expect_approver: allowed    # allowed | refused | self
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from broker.domain.task import TaskState, decide_request, resolve_ttl
from broker.errors import ValidationFailed
from broker.scopes.loader import LoadedTemplate
from broker.scopes.params import validate_params
from broker.scopes.render import render_backend

Outcome = Literal["approved", "pending", "denied", "invalid"]
ApproverOutcome = Literal["allowed", "refused", "self"]
#: The broker's default global TTL cap (``credential_max_ttl``), used when none is given.
DEFAULT_TTL_CAP = 12 * 3600


@dataclass
class Evaluation:
    """What the broker would answer for one request (and, optionally, one approver)."""

    scope: str
    outcome: Outcome
    reason: str | None = None
    rule: str | None = None
    params: dict[str, Any] | None = None
    ttl: int | None = None
    rendered: dict[str, Any] | None = None
    approvals_required: int = 0
    approver: ApproverOutcome | None = None
    approver_reason: str | None = None
    code: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _same_principal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("sub") == b.get("sub") and a.get("iss") == b.get("iss")


def evaluate(
    loaded: LoadedTemplate,
    claims: dict[str, Any],
    params: dict[str, Any] | None = None,
    *,
    ttl: int | None = None,
    approver: dict[str, Any] | None = None,
    ttl_cap: int = DEFAULT_TTL_CAP,
) -> Evaluation:
    """Decide one sample request for ``loaded`` as the broker would."""
    template = loaded.template
    out = Evaluation(scope=template.name, outcome="invalid")
    try:
        out.params = validate_params(template, params or {})
        out.ttl = resolve_ttl(template, ttl, ttl_cap)
        out.rendered = render_backend(
            template, out.params, forbidden=loaded.forbidden_policies
        ).model_dump(mode="json")
    except ValidationFailed as exc:
        out.reason, out.code = exc.detail, exc.code
        return out
    decision = decide_request(template, claims)
    out.outcome = {
        TaskState.APPROVED: "approved",
        TaskState.PENDING: "pending",
        TaskState.DENIED: "denied",
    }[decision.state]  # type: ignore[assignment]
    out.rule, out.reason = decision.rule, decision.reason
    out.approvals_required = template.approval.required
    if approver is not None:
        rule = template.approval.approvers
        if _same_principal(approver, claims):
            out.approver, out.approver_reason = "self", "the requester never decides their own task"
        elif rule is None:
            out.approver, out.approver_reason = "refused", "this scope is approved automatically"
        else:
            verdict = rule.evaluate(approver, claims)
            out.approver = "allowed" if verdict else "refused"
            out.approver_reason = None if verdict else verdict.reason
    return out


class PolicyCase(BaseModel):
    """One expectation about one sample request."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    scope: str
    claims: dict[str, Any]
    params: dict[str, Any] = Field(default_factory=dict)
    ttl: int | None = None
    approver: dict[str, Any] | None = None
    expect: Outcome
    expect_approver: ApproverOutcome | None = None


class PolicyCases(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cases: list[PolicyCase] = Field(min_length=1)


@dataclass
class CaseResult:
    case: PolicyCase
    evaluation: Evaluation | None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


def load_cases(path: Path) -> PolicyCases:
    """Read a cases file; raises ``ValueError`` with a readable message when it is malformed."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        return PolicyCases.model_validate(data)
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{path}: {where}: {first['msg']}") from None


def run_cases(
    cases: PolicyCases, templates: dict[str, LoadedTemplate], *, ttl_cap: int = DEFAULT_TTL_CAP
) -> list[CaseResult]:
    """Evaluate every case; a case fails when its scope is unknown or an expectation differs."""
    results: list[CaseResult] = []
    for case in cases.cases:
        loaded = templates.get(case.scope)
        if loaded is None:
            results.append(CaseResult(case, None, [f"no valid template named {case.scope!r}"]))
            continue
        ev = evaluate(
            loaded, case.claims, case.params, ttl=case.ttl, approver=case.approver, ttl_cap=ttl_cap
        )
        failures = []
        if ev.outcome != case.expect:
            why = f" ({ev.reason})" if ev.reason else ""
            failures.append(f"expected {case.expect}, got {ev.outcome}{why}")
        if case.expect_approver is not None and ev.approver != case.expect_approver:
            why = f" ({ev.approver_reason})" if ev.approver_reason else ""
            failures.append(f"expected approver {case.expect_approver}, got {ev.approver}{why}")
        results.append(CaseResult(case, ev, failures))
    return results
