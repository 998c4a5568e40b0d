"""Template models refuse incoherent settings at load time; glob coverage is sound."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker.domain.scope import (
    ApprovalRule,
    Parameter,
    ScopeTemplate,
    glob_covers,
    has_stray_braces,
    placeholders,
)

BASE: dict[str, Any] = {
    "name": "demo",
    "description": "d",
    "owner": "o",
    "backend": {"type": "vault_token", "policies": ["kv-read"]},
    "requester": {"all": [{"claim": "sub", "regex": ".+"}]},
}


@pytest.mark.parametrize(
    "spec",
    [
        {"type": "integer", "pattern": "a"},
        {"type": "string", "minimum": 1},
        {"type": "boolean", "enum": [True]},
        {"type": "string", "min_length": 5, "max_length": 2},
        {"type": "integer", "minimum": 5, "maximum": 2},
        {"type": "string", "enum": ["a", 1]},
        {"type": "integer", "default": "3"},
        {"type": "integer", "default": True},
        {"type": "string", "pattern": "("},
        {"type": "string", "max_length": 100_000},
    ],
)
def test_incoherent_parameters_are_refused(spec: dict[str, Any]) -> None:
    """Constraints that do not fit the type, or contradict each other, refuse to load."""
    with pytest.raises(ValidationError):
        Parameter.model_validate(spec)


def test_approval_rules() -> None:
    """Manual needs approvers; auto takes none; required is 0 for auto, count for manual."""
    with pytest.raises(ValidationError):
        ApprovalRule.model_validate({"mode": "manual"})
    with pytest.raises(ValidationError):
        ApprovalRule.model_validate({"mode": "auto", "count": 2})
    manual = ApprovalRule.model_validate(
        {"mode": "manual", "count": 2, "approvers": {"all": [{"claim": "sub", "regex": ".+"}]}}
    )
    assert (manual.required, ApprovalRule().required) == (2, 0)


def test_high_risk_is_never_automatic() -> None:
    """A high or critical template must be approved by people."""
    with pytest.raises(ValidationError, match="cannot be approved automatically"):
        ScopeTemplate.model_validate({**BASE, "risk": "critical"})


def test_placeholders() -> None:
    """Only {{params.NAME}} is a placeholder; IAM's ${...} and Vault's {{identity...}} are not."""
    assert placeholders("a/{{ params.x }}/{{params.y_2}}") == ["x", "y_2"]
    assert placeholders("${aws:username}") == []
    assert has_stray_braces("{{identity.entity.id}}")
    assert has_stray_braces("{{params.x}")
    assert not has_stray_braces("{{params.x}}-b")


@pytest.mark.parametrize(
    ("maximum", "value", "covered"),
    [
        ("arn:aws:s3:::data-*", "arn:aws:s3:::data-a", True),
        ("arn:aws:s3:::data-*", "arn:aws:s3:::data-a/*", True),  # * absorbs anything
        ("arn:aws:s3:::data-*/*", "arn:aws:s3:::data-a/p/*", True),
        ("arn:aws:s3:::data-*", "arn:aws:s3:::*", False),  # wider than the maximum
        ("arn:aws:s3:::data-*", "arn:aws:s3:::dat*", False),
        ("arn:aws:s3:::data-?", "arn:aws:s3:::data-*", False),  # ? never absorbs a *
        ("arn:aws:s3:::data-?", "arn:aws:s3:::data-a", True),
        ("s3:Get*", "s3:getobject", False),
    ],
)
def test_glob_covers_is_sound(maximum: str, value: str, covered: bool) -> None:
    """A value is covered only if everything it can denote is within the maximum."""
    assert glob_covers(maximum, value) is covered


def test_actions_compare_without_case() -> None:
    assert glob_covers("s3:Get*", "s3:getobject", ignore_case=True)
