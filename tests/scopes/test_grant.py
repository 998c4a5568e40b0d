"""The grant approvers see: each example template rendered for exact parameters, as minting
renders it, with no placeholder and no secret left."""

from __future__ import annotations

import json
from pathlib import Path

from broker.domain.vault_policies import ForbiddenPolicies
from broker.scopes.grant import AT_MINT, grant_preview, grant_summary
from broker.scopes.loader import load_folder

SCOPES = Path(__file__).resolve().parents[2] / "scopes"
TEMPLATES, _ = load_folder(SCOPES)


def preview(scope: str, params: dict[str, object], **kw: object) -> dict[str, object]:
    values: dict[str, object] = {
        "ttl": 1800,
        "ttl_cap": 43_200,
        "subject": "agent-1",
        "task_id": "tsk_1",
        "cluster": "prod",
    }
    values.update(kw)
    return grant_preview(TEMPLATES[scope].template, params, **values)  # type: ignore[arg-type]


def test_an_sts_grant_shows_the_rendered_session_policy_and_tags() -> None:
    """aws-s3-read: the session policy names the requested bucket and prefix; the session tags
    are the broker's own plus the template's, rendered; the TTL is capped by the template."""
    grant = preview("aws-s3-read", {"bucket": "example-data-logs", "prefix": "2024/05"}, ttl=99_999)
    assert grant["type"] == "aws_sts"
    assert grant["role_arn"] == "arn:aws:iam::123456789012:role/broker-s3-read"
    assert grant["ttl_seconds"] == 3600 and grant["duration_seconds"] == 3600
    policy = json.dumps(grant["session_policy"])
    assert "arn:aws:s3:::example-data-logs/2024/05/*" in policy
    assert grant["session_tags"] == {
        "broker:cluster": "prod",
        "broker:task": "tsk_1",
        "broker:credential": AT_MINT,
        "broker:scope": "aws-s3-read",
        "broker:subject": "agent-1",
        "bucket": "example-data-logs",
    }
    assert "{{" not in json.dumps(grant)
    summary = grant_summary(grant)
    assert "s3:GetObject on arn:aws:s3:::example-data-logs/2024/05/*" in summary


def test_vault_database_and_deploy_grants() -> None:
    """Vault: the policies as Vault will hold them (default included); a database role; a
    deploy role whose session tags carry the approved environment and change ticket."""
    kv = preview("vault-kv-read", {})
    assert kv["policies"] == ["default", "kv-read"] and kv["renewable"] is False
    db = preview("postgres-readonly", {})
    assert (db["mount"], db["role"]) == ("database", "readonly")
    deploy = preview("aws-deploy", {"environment": "production", "change": "CHG-2041"})
    tags = deploy["session_tags"]
    assert isinstance(tags, dict)
    assert (tags["environment"], tags["change"]) == ("production", "CHG-2041")


def test_a_grant_that_cannot_render_says_so() -> None:
    """Parameters the template (or the administrator's forbidden list) refuses give an error,
    never a half-rendered grant."""
    bad = preview("aws-deploy", {"environment": "moon", "change": "CHG-1"})
    assert set(bad) == {"type", "error"}
    refused = preview("vault-kv-read", {}, forbidden=ForbiddenPolicies.of(["KV-READ"]))
    assert "error" in refused and "cannot be rendered" in grant_summary(refused)


def test_a_github_grant_names_owner_repositories_and_permissions() -> None:
    """github-admin (two approvers): approvers see the repository and the exact permission
    levels rendered for the parameters, within GitHub's one-hour token lifetime."""
    grant = preview("github-admin", {"repo": "platform-api", "administration": "write"})
    assert grant["type"] == "github_app", grant
    assert grant["owner"] == "octo-org"
    assert grant["repositories"] == ["platform-api"]
    assert grant["permissions"] == {
        "contents": "write",
        "pull_requests": "write",
        "administration": "write",
    }
    assert grant["ttl_seconds"] == 1800
    summary = grant_summary(grant)
    assert "GitHub octo-org: platform-api" in summary and "administration: write" in summary
