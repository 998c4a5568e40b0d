"""The example templates under scopes/ are lint-clean, valid against the published schema,
and decide and render as their comments say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from broker.cli.scopes import template_schema
from broker.scopes.evaluate import evaluate
from broker.scopes.loader import LoadedTemplate, load_folder
from broker.scopes.render import compact_json

SCOPES = Path(__file__).resolve().parents[2] / "scopes"
EXAMPLES = {
    "vault-kv-read",
    "postgres-readonly",
    "postgres-readwrite",
    "aws-s3-read",
    "aws-deploy",
    "github-read-repo",
    "github-pull-request",
    "github-admin",
}


@pytest.fixture(scope="module")
def examples() -> dict[str, LoadedTemplate]:
    templates, problems = load_folder(SCOPES)
    assert problems == [], [str(p) for p in problems]  # no error and no warning
    return templates


def test_every_example_is_present_and_clean(examples: dict[str, LoadedTemplate]) -> None:
    """All examples load with no finding at all."""
    assert set(examples) == EXAMPLES


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_match_the_published_schema(name: str) -> None:
    """The JSON Schema from `broker scopes schema` accepts each example file as written."""
    data = yaml.safe_load((SCOPES / f"{name}.yaml").read_text())
    jsonschema.Draft202012Validator(template_schema()).validate(data)


def test_the_schema_refuses_what_the_models_refuse() -> None:
    """An unknown key or a wrong backend type fails schema validation too."""
    validator = jsonschema.Draft202012Validator(template_schema())
    data = yaml.safe_load((SCOPES / "vault-kv-read.yaml").read_text())
    assert not list(validator.iter_errors(data))
    assert list(validator.iter_errors({**data, "surprise": 1}))
    assert list(validator.iter_errors({**data, "backend": {"type": "ftp"}}))


DEV = {"sub": "dev-1", "groups": ["developers"]}


def test_backends_and_rules(examples: dict[str, LoadedTemplate]) -> None:
    """What the admin's guide says of each example holds."""
    kv = examples["vault-kv-read"].template
    assert (kv.backend.type, kv.approval.mode, kv.max_uses) == ("vault_token", "auto", 50)
    ro = examples["postgres-readonly"].template
    assert ro.backend.model_dump() == {
        "type": "vault_database",
        "mount": "database",
        "role": "readonly",
        "maximum": None,
    }
    rw = examples["postgres-readwrite"].template
    assert (rw.backend.role, rw.approval.mode, rw.approval.count) == ("readwrite", "manual", 1)  # type: ignore[union-attr]
    s3 = examples["aws-s3-read"].template
    assert s3.backend.role_arn == "arn:aws:iam::123456789012:role/broker-s3-read"  # type: ignore[union-attr]
    deploy = examples["aws-deploy"].template
    assert deploy.backend.role_arn == "arn:aws:iam::123456789012:role/broker-deploy"  # type: ignore[union-attr]
    assert (deploy.approval.count, deploy.risk.value) == (2, "critical")


@pytest.mark.parametrize(
    ("name", "claims", "params", "expect"),
    [
        ("vault-kv-read", DEV, {}, "approved"),
        ("postgres-readonly", DEV, {}, "approved"),
        ("postgres-readonly", {"sub": "x", "groups": ["contractors"]}, {}, "denied"),
        ("postgres-readwrite", DEV, {}, "pending"),
        ("aws-s3-read", DEV, {"bucket": "example-data-logs", "prefix": "2024/05"}, "approved"),
        ("aws-s3-read", DEV, {"bucket": "other-bucket", "prefix": "x"}, "invalid"),
        (
            "aws-deploy",
            {"sub": "r", "groups": ["release"]},
            {"environment": "production", "change": "CHG-2024"},
            "pending",
        ),
        (
            "aws-deploy",
            {"sub": "r", "groups": ["release"]},
            {"environment": "prod", "change": "CHG-2024"},
            "invalid",
        ),
        ("github-read-repo", DEV, {"repo": "Hello-World"}, "approved"),
        ("github-read-repo", DEV, {"repo": "secrets-vault"}, "invalid"),
        ("github-pull-request", DEV, {"repo": "platform-api"}, "approved"),
        (
            "github-pull-request",
            {"sub": "x", "groups": ["contractors"]},
            {"repo": "platform-api"},
            "denied",
        ),
        ("github-admin", DEV, {"repo": "platform-api"}, "pending"),
        ("github-admin", DEV, {"repo": "platform-api", "administration": "admin"}, "invalid"),
    ],
)
def test_example_decisions(
    examples: dict[str, LoadedTemplate],
    name: str,
    claims: dict[str, Any],
    params: dict[str, Any],
    expect: str,
) -> None:
    """Each example decides sample requests as documented."""
    assert evaluate(examples[name], claims, params).outcome == expect


def test_s3_policy_is_assembled_as_data(examples: dict[str, LoadedTemplate]) -> None:
    """The rendered session policy is a JSON document whose values are the parameters, exactly."""
    result = evaluate(
        examples["aws-s3-read"], DEV, {"bucket": "example-data-logs", "prefix": "2024/05"}
    )
    policy = result.rendered["session_policy"]  # type: ignore[index]
    parsed = json.loads(compact_json(policy))
    assert parsed["Statement"][0]["Resource"] == "arn:aws:s3:::example-data-logs"
    assert parsed["Statement"][0]["Condition"]["StringLike"]["s3:prefix"] == ["2024/05/*"]
    assert parsed["Statement"][1]["Resource"] == "arn:aws:s3:::example-data-logs/2024/05/*"
    assert result.rendered["tags"] == {"bucket": "example-data-logs"}  # type: ignore[index]


def test_github_examples_render_narrow_tokens(examples: dict[str, LoadedTemplate]) -> None:
    """The GitHub examples render exactly one repository each, the read scope contents: read
    only, the pull-request scope contents and pull requests write, and the admin scope adds
    administration at the level asked (read unless write is asked for)."""
    read = evaluate(examples["github-read-repo"], DEV, {"repo": "Hello-World"}).rendered
    assert read is not None
    assert (read["owner"], read["repositories"], read["permissions"]) == (
        "octo-org",
        ["Hello-World"],
        {"contents": "read"},
    )
    pr = evaluate(examples["github-pull-request"], DEV, {"repo": "platform-api"}).rendered
    assert pr is not None
    assert pr["permissions"] == {"contents": "write", "pull_requests": "write"}
    admin = examples["github-admin"]
    assert (admin.template.approval.count, admin.template.risk.value) == (2, "high")
    for asked, level in (({}, "read"), ({"administration": "write"}, "write")):
        rendered = evaluate(admin, DEV, {"repo": "platform-api", **asked}).rendered
        assert rendered is not None
        assert rendered["permissions"]["administration"] == level
