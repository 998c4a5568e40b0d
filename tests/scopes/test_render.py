"""Rendering: parameters reach a backend only as checked values, within the template's maximum.
Every hostile value an agent might send is refused before anything is stored or minted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from broker.domain.scope import (
    AwsStsBackend,
    ScopeTemplate,
    VaultDatabaseBackend,
    VaultTokenBackend,
)
from broker.domain.vault_policies import ForbiddenPolicies
from broker.errors import ValidationFailed
from broker.scopes.loader import load_folder
from broker.scopes.params import validate_params
from broker.scopes.render import compact_json, render_backend

SCOPES = Path(__file__).resolve().parents[2] / "scopes"
TEMPLATES, _ = load_folder(SCOPES)
S3 = TEMPLATES["aws-s3-read"].template
GOOD = {"bucket": "example-data-logs", "prefix": "2024/05"}


def template(backend: dict[str, Any], parameters: dict[str, Any]) -> ScopeTemplate:
    return ScopeTemplate.model_validate(
        {
            "name": "tpl",
            "description": "d",
            "owner": "o",
            "backend": backend,
            "parameters": parameters,
            "requester": {"all": [{"claim": "sub", "regex": ".+"}]},
            "ttl": {"default": 900, "max": 900},
        }
    )


# Each value is refused somewhere on its way (parameter check, context alphabet or maximum).
HOSTILE_PREFIXES = [
    "*",
    "reports/*",
    "../private",
    "a/../../b",
    "a,b",
    'a"b',
    "a'b",
    "a`b",
    "a\\b",
    "${aws:username}",
    "{{params.bucket}}",
    "%2e%2e/x",
    "a#b",
    "a\nb",
    "a\x00b",
    "caf\u0065\u0301",  # not NFC
    'x"]},{"Effect":"Allow","Action":"*","Resource":"*',
    "",
    "a" * 301,
    " leading",
    "a b",
]


@pytest.mark.parametrize("prefix", HOSTILE_PREFIXES)
def test_hostile_prefixes_are_refused(prefix: str) -> None:
    """Globs, traversal, separators, quotes, IAM policy variables, placeholders, URL escapes,
    control characters, JSON injection, empty and oversized values: each refused (422)."""
    with pytest.raises(ValidationFailed) as err:
        render_backend(S3, {**GOOD, "prefix": prefix})
    assert err.value.status == 422


@pytest.mark.parametrize(
    "bucket",
    [
        "other-data-logs",
        "example-data-",
        "example-data-logs/..",
        "*",
        "example-data-a*",
        7,
        None,
        ["example-data-x"],
    ],
)
def test_buckets_outside_the_pattern_or_maximum(bucket: Any) -> None:
    with pytest.raises(ValidationFailed):
        render_backend(S3, {**GOOD, "bucket": bucket})


def test_unknown_and_missing_parameters() -> None:
    with pytest.raises(ValidationFailed) as unknown:
        render_backend(S3, {**GOOD, "Effect": "Allow"})
    assert unknown.value.code == "unknown_parameter"
    with pytest.raises(ValidationFailed) as missing:
        render_backend(S3, {"bucket": "example-data-logs"})
    assert missing.value.code == "missing_parameter"


def test_the_policy_is_data_and_values_stay_values() -> None:
    """The rendered policy serialises to JSON whose structure is the template's: a parameter can
    only ever be one string value."""
    spec = render_backend(S3, GOOD)
    assert isinstance(spec, AwsStsBackend)
    text = compact_json(spec.session_policy)
    parsed = json.loads(text)
    assert len(parsed["Statement"]) == 2
    assert [s["Action"] for s in parsed["Statement"]] == ["s3:ListBucket", "s3:GetObject"]
    assert "example-data-logs/2024/05/*" in text


def test_the_maximum_is_enforced_even_when_the_pattern_is_loose() -> None:
    """A template whose parameter pattern admits more than its maximum still cannot widen."""
    loose = template(
        {
            "type": "aws_sts",
            "role_arn": "arn:aws:iam::123456789012:role/r",
            "session_policy": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": "{{params.action}}",
                        "Resource": "arn:aws:s3:::{{params.bucket}}/*",
                    }
                ],
            },
            "maximum": {"actions": ["s3:Get*"], "resources": ["arn:aws:s3:::team-*/*"]},
        },
        {"bucket": {"pattern": "[a-z-]+"}, "action": {"pattern": "s3:[A-Za-z]+"}},
    )
    render_backend(loose, {"bucket": "team-a", "action": "s3:GetObject"})
    for params, code in (
        ({"bucket": "finance", "action": "s3:GetObject"}, "scope_maximum_exceeded"),
        ({"bucket": "team-a", "action": "s3:DeleteObject"}, "scope_maximum_exceeded"),
    ):
        with pytest.raises(ValidationFailed) as err:
            render_backend(loose, params)
        assert err.value.code == code


def test_policy_size_is_checked() -> None:
    """A rendered policy above STS's 2,048 characters is refused before any call."""
    big = template(
        {
            "type": "aws_sts",
            "role_arn": "arn:aws:iam::123456789012:role/r",
            "session_policy": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::b/{{{{params.p{i}}}}}/*",
                    }
                    for i in range(4)
                ],
            },
            "maximum": {"actions": ["s3:GetObject"], "resources": ["arn:aws:s3:::b/*"]},
        },
        {f"p{i}": {"pattern": "[a-z]+", "max_length": 1000} for i in range(4)},
    )
    render_backend(big, {f"p{i}": "short" for i in range(4)})
    with pytest.raises(ValidationFailed) as err:
        render_backend(big, {f"p{i}": "x" * 600 for i in range(4)})
    assert err.value.code == "policy_too_large"


VAULT_TEAM = template(
    {
        "type": "vault_token",
        "policies": ["kv-read", "team-{{params.team}}"],
        "maximum": {"policies": ["kv-read", "team-*"]},
    },
    {"team": {"pattern": "[A-Za-z0-9_.-]+"}},
)


@pytest.mark.parametrize(
    "team", ["a,root", "a b", "a/b", "..", "a*", 'a"', "x{{params.team}}", "\u0430lpha"]
)
def test_vault_policy_names_take_no_separator(team: str) -> None:
    """A parameterised policy name can never become a list, a path, a glob or another policy."""
    with pytest.raises(ValidationFailed):
        render_backend(VAULT_TEAM, {"team": team})


def test_vault_policies_render_within_the_maximum() -> None:
    spec = render_backend(VAULT_TEAM, {"team": "payments"})
    assert isinstance(spec, VaultTokenBackend)
    assert spec.policies == ["kv-read", "team-payments"]


def test_root_is_never_rendered() -> None:
    """Even a maximum of '*' cannot let a parameter name the root policy."""
    anything = template(
        {"type": "vault_token", "policies": ["{{params.p}}"], "maximum": {"policies": ["*"]}},
        {"p": {"pattern": "[a-z]+"}},
    )
    with pytest.raises(ValidationFailed) as err:
        render_backend(anything, {"p": "root"})
    assert err.value.code == "forbidden_policy"


def test_policy_names_render_as_vault_reads_them() -> None:
    """A parameter spelling root or an admin-forbidden policy in capitals is refused; an allowed
    one is rendered in Vault's normal form and checked against the maximum in that form."""
    kv = template(
        {"type": "vault_token", "policies": ["{{params.p}}"], "maximum": {"policies": ["KV-*"]}},
        {"p": {"pattern": "[A-Za-z-]+"}},
    )
    forbidden = ForbiddenPolicies.of(["kv-admin"])
    for value in ("ROOT", "Root", "KV-ADMIN", "kv-Admin"):
        anything = template(
            {"type": "vault_token", "policies": ["{{params.p}}"], "maximum": {"policies": ["*"]}},
            {"p": {"pattern": "[A-Za-z-]+"}},
        )
        with pytest.raises(ValidationFailed) as err:
            render_backend(anything, {"p": value}, forbidden=forbidden)
        assert err.value.code == "forbidden_policy"
    spec = render_backend(kv, {"p": "KV-Read"}, forbidden=forbidden)
    assert isinstance(spec, VaultTokenBackend)
    assert spec.policies == ["kv-read"]


def test_database_roles_within_the_maximum() -> None:
    db = template(
        {"type": "vault_database", "role": "{{params.app}}-ro", "maximum": {"roles": ["app-*-ro"]}},
        {"app": {"pattern": "[a-z-]+"}},
    )
    spec = render_backend(db, {"app": "app-billing"})
    assert isinstance(spec, VaultDatabaseBackend) and spec.role == "app-billing-ro"
    with pytest.raises(ValidationFailed):
        render_backend(db, {"app": "admin"})


def test_parameters_are_validated_by_type() -> None:
    """Integers, booleans, enums and bounds; a bool is not an integer."""
    typed = template(
        {"type": "vault_token", "policies": ["kv-read"]},
        {
            "n": {"type": "integer", "minimum": 1, "maximum": 5},
            "flag": {"type": "boolean", "default": False},
            "env": {"enum": ["dev", "prod"]},
        },
    )
    assert validate_params(typed, {"n": 3, "env": "dev"}) == {"n": 3, "flag": False, "env": "dev"}
    for bad in (
        {"n": True, "env": "dev"},
        {"n": 9, "env": "dev"},
        {"n": 1, "env": "qa"},
        {"n": 1, "env": "dev", "flag": "yes"},
    ):
        with pytest.raises(ValidationFailed):
            validate_params(typed, bad)
