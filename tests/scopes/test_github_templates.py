"""github_app templates: the schema, lint and rendering enforce GitHub's rules and the template's
maximum before anything is approved or minted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from broker.domain.scope import ScopeTemplate
from broker.errors import ValidationFailed
from broker.scopes.loader import LintProblem, parse_template
from broker.scopes.render import render_backend

BASE: dict[str, Any] = {
    "name": "gh",
    "description": "A GitHub template under test.",
    "owner": "tests",
    "backend": {
        "type": "github_app",
        "owner": "octo-org",
        "repositories": ["{{params.repo}}"],
        "permissions": {"contents": "read"},
        "maximum": {"repositories": ["Hello-*"], "permissions": {"contents": "write"}},
    },
    "parameters": {"repo": {"pattern": "[A-Za-z0-9._-]{1,100}", "max_length": 100}},
    "requester": {"all": [{"claim": "sub", "regex": ".+"}]},
    "ttl": {"default": 900, "max": 3600},
}


def with_backend(**backend: Any) -> dict[str, Any]:
    data = {**BASE, "backend": {**BASE["backend"], **backend}}
    return {k: v for k, v in data.items() if v is not None}


def lint(tmp_path: Path, data: dict[str, Any]) -> list[LintProblem]:
    path = tmp_path / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return parse_template(path)[1]


def rules(problems: list[LintProblem]) -> set[tuple[str, str, str]]:
    return {(p.severity, p.rule, p.field) for p in problems}


def test_a_narrow_template_is_clean(tmp_path: Path) -> None:
    """One parameterised repository bounded by a maximum, a fixed permission within it: no
    finding at all."""
    assert lint(tmp_path, BASE) == []


@pytest.mark.parametrize(
    ("backend", "expected"),
    [
        (
            {"permissions": {"contents": "admin"}},
            ("error", "github-permission", "backend.permissions.contents"),
        ),
        (
            {"permissions": {"no_such": "read"}},
            ("error", "github-permission", "backend.permissions.no_such"),
        ),
        ({"maximum": None}, ("error", "maximum-missing", "backend.repositories[0]")),
        (
            {"repositories": ["Other"], "maximum": {"repositories": ["Hello-*"]}},
            ("error", "maximum-exceeded", "backend.repositories[0]"),
        ),
        (
            {
                "permissions": {"contents": "{{params.level}}"},
                "maximum": {"repositories": ["Hello-*"]},
            },
            ("error", "maximum-missing", "backend.permissions.contents"),
        ),
        ({"owner": "{{params.repo}}"}, ("error", "maximum-missing", "backend.owner")),
        (
            {"repositories": [], "all_repositories": True},
            ("error", "maximum-exceeded", "backend.all_repositories"),
        ),
        (
            {"maximum": {"repositories": ["*"], "permissions": {"contents": "write"}}},
            ("warning", "maximum-unbounded", "backend.maximum.repositories[0]"),
        ),
        (
            {"maximum": {"repositories": ["Hello-*"], "permissions": {"workflows": "read"}}},
            ("error", "github-permission", "backend.maximum.permissions.workflows"),
        ),
    ],
)
def test_lint_names_each_github_rule(
    tmp_path: Path, backend: dict[str, Any], expected: tuple[str, str, str]
) -> None:
    """Each rule is reported at its field: levels and names from GitHub's published schema,
    parameterised owners, repositories and levels without a maximum, fixed values outside it,
    all_repositories beyond a repository maximum, a maximum that bounds nothing."""
    data = with_backend(**backend)
    if "{{params.level}}" in str(backend):
        data["parameters"] = {**data["parameters"], "level": {"enum": ["read", "write"]}}
    assert expected in rules(lint(tmp_path, data))


def test_a_task_cannot_outlive_its_token(tmp_path: Path) -> None:
    """ttl.max above GitHub's one hour is an error: the token expires then, whatever the TTL."""
    data = {**BASE, "ttl": {"default": 900, "max": 7200}}
    assert ("error", "ttl-unenforceable", "ttl.max") in rules(lint(tmp_path, data))


def test_all_repositories_is_a_warning_said_out_loud(tmp_path: Path) -> None:
    """A token for every repository of the installation is allowed when written on purpose,
    and lint says what it means."""
    data = with_backend(repositories=[], all_repositories=True, maximum=None)
    data["parameters"] = {}
    assert rules(lint(tmp_path, data)) == {
        ("warning", "github-all-repositories", "backend.all_repositories")
    }


@pytest.mark.parametrize(
    "backend",
    [
        {"repositories": []},  # names no repository and does not say all_repositories
        {"repository_ids": [1]},  # two selections at once
        {"repositories": [f"r{i}" for i in range(501)]},
        {"owner": "bad owner"},
        {"repositories": ["a/b"]},
        {"permissions": {}},
    ],
)
def test_the_schema_refuses_malformed_selections(backend: dict[str, Any]) -> None:
    """Exactly one of repositories, repository_ids, all_repositories; at most 500 repositories;
    GitHub's alphabets for owners and names; at least one permission."""
    with pytest.raises(ValidationError):
        ScopeTemplate.model_validate(with_backend(**backend))


def template(**backend: Any) -> ScopeTemplate:
    data = with_backend(**backend)
    data["parameters"] = {
        "repo": {"pattern": "[A-Za-z0-9._-]{1,100}", "max_length": 100},
        "level": {"enum": ["read", "write", "admin"], "default": "read", "required": False},
    }
    return ScopeTemplate.model_validate(data)


def test_rendering_fills_names_and_levels_within_the_maximum() -> None:
    """Parameters land in the repository name and the permission level, as data; the rendered
    request names exactly that repository and level."""
    t = template(permissions={"contents": "{{params.level}}"})
    rendered = render_backend(t, {"repo": "Hello-World", "level": "write"})
    assert rendered.repositories == ["Hello-World"]  # type: ignore[union-attr]
    assert rendered.permissions == {"contents": "write"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"repo": "Other-Repo"}, "scope_maximum_exceeded"),
        ({"repo": "hello-world", "level": "admin"}, "github_permission_invalid"),
        ({"repo": "."}, "invalid_parameter"),
    ],
)
def test_rendering_refuses_what_github_or_the_maximum_refuses(
    params: dict[str, Any], code: str
) -> None:
    """A repository outside the maximum (names compare case-insensitively, as on GitHub), a
    level GitHub's schema does not have for the permission, a name GitHub refuses: each is a
    422 before approval and again before minting."""
    t = template(permissions={"contents": "{{params.level}}"})
    with pytest.raises(ValidationFailed) as refused:
        render_backend(t, params)
    assert refused.value.code == code


def test_the_maximum_caps_parameterised_levels() -> None:
    """A level the parameter allows but the template's maximum does not is refused."""
    t = template(
        permissions={"contents": "{{params.level}}"},
        maximum={"repositories": ["Hello-*"], "permissions": {"contents": "read"}},
    )
    assert render_backend(t, {"repo": "Hello-World"}).permissions == {"contents": "read"}  # type: ignore[union-attr]
    with pytest.raises(ValidationFailed) as refused:
        render_backend(t, {"repo": "Hello-World", "level": "write"})
    assert refused.value.code == "scope_maximum_exceeded"
