"""GitHub's rules as the broker keeps them: the permission catalog is exactly what GitHub's
published OpenAPI description says, and the level and naming rules hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from broker.domain import github
from tests.support.github_contract import OPENAPI_VERSION, NpmUnavailable, description_path

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def published() -> dict[str, object]:
    try:
        path = description_path()
    except NpmUnavailable as exc:
        import os

        if os.environ.get("CI"):
            pytest.fail(f"GitHub's description is required in CI: {exc}")
        pytest.skip(str(exc))
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


def test_the_checked_in_catalog_matches_the_package(published: dict[str, object]) -> None:
    """broker/domain/github_permissions.json holds exactly the names and levels of the
    app-permissions schema in @octokit/openapi (the pinned version); regenerate it with
    scripts/github-permissions when the package moves."""
    checked_in = json.loads((REPO / "broker" / "domain" / github.CATALOG_FILE).read_text())
    assert checked_in["permissions"] == github.permissions_from_openapi(published)
    assert OPENAPI_VERSION in checked_in["source"]
    assert set(github.permission_catalog().levels) == set(checked_in["permissions"])


def test_the_script_regenerates_the_same_file(published: dict[str, object], tmp_path: Path) -> None:
    """scripts/github-permissions, run against the package's description, writes a file
    identical to the checked-in one (so the test above and the script cannot drift apart)."""
    target = REPO / "broker" / "domain" / github.CATALOG_FILE
    before = target.read_bytes()
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "github-permissions"), str(description_path())],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    after = target.read_bytes()
    target.write_bytes(before)
    assert done.returncode == 0, done.stderr
    assert after == before


def test_levels_are_ordered_and_bounded() -> None:
    """read < write < admin; an absent permission grants nothing; exceeding() names exactly the
    permissions above what is allowed; metadata: read is never counted as widening."""
    assert github.rank("read") < github.rank("write") < github.rank("admin")
    assert github.exceeding({"contents": "read"}, {"contents": "write"}) == []
    assert github.exceeding({"contents": "write", "issues": "read"}, {"contents": "read"}) == [
        "contents",
        "issues",
    ]
    assert github.widened({"contents": "read", "metadata": "read"}, {"contents": "read"}) == []
    assert github.widened({"metadata": "write"}, {"contents": "read"}) == ["metadata"]


def test_the_catalog_knows_each_permission_s_levels() -> None:
    """Names outside GitHub's schema and levels a permission does not take are named."""
    catalog = github.permission_catalog()
    assert catalog.problems({"contents": "write", "repository_projects": "admin"}) == []
    assert catalog.problems({"contents": "admin"}) == [
        "'contents' takes read or write, not 'admin'"
    ]
    assert catalog.problems({"workflows": "read"}) == ["'workflows' takes write, not 'read'"]
    assert catalog.problems({"root": "read"}) == ["'root' is not a GitHub App permission"]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("octo-org", True),
        ("a", True),
        ("-lead", False),
        ("trail-", False),
        ("dou--ble", False),
        ("x" * 39, True),
        ("x" * 40, False),
        ("dot.ted", False),
    ],
)
def test_owner_logins(value: str, ok: bool) -> None:
    """GitHub logins: letters, digits, single inner hyphens, at most 39 characters."""
    assert github.owner_ok(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("Hello-World", True),
        ("repo.js", True),
        ("_x", True),
        (".", False),
        ("..", False),
        ("a/b", False),
        ("x" * 101, False),
    ],
)
def test_repository_names(value: str, ok: bool) -> None:
    """Repository names: [A-Za-z0-9._-], at most 100, never . or .."""
    assert github.repository_ok(value) is ok


def test_hashed_token_is_what_github_s_audit_log_records() -> None:
    """base64(SHA-256(token)), as GitHub documents for the audit log's hashed_token field."""
    import base64
    import hashlib

    token = "ghs_16C7e42F292c6912E7710c838347Ae178B4a"
    assert (
        github.hashed_token(token)
        == base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()
    )
    assert len(github.hashed_token(token)) == 44


def test_the_audit_scrubber_knows_github_tokens_and_keeps_their_hash() -> None:
    """A GitHub token is redacted wherever it appears in text; the hashed_token attribute (a
    one-way hash GitHub's audit log joins on) is kept, not mistaken for a secret by its name."""
    from broker.domain.scrub import scrub_text, scrub_value

    token = "ghs_16C7e42F292c6912E7710c838347Ae178B4a"
    assert token not in scrub_text(f"git push https://x-access-token:{token}@github.com/o/r")
    assert scrub_text(f"GH_TOKEN={token}") != f"GH_TOKEN={token}"
    hashed = github.hashed_token(token)
    kept = scrub_value({"broker.credential.hashed_token": hashed, "token": token})
    assert kept["broker.credential.hashed_token"] == hashed
    assert kept["token"] != token
