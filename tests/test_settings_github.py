"""The github settings section: one App identity, one key source, GitHub Enterprise Server by
base URL, and what production refuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from broker.settings import GitHubAppSettings, Settings


def gh(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"app_id": 1, "private_key_file": "/keys/app.pem"}
    values.update(overrides)
    return values


def test_github_com_and_enterprise_server_urls() -> None:
    """api.github.com clones from github.com; a GHES api_url .../api/v3 from its host; any other
    api_url needs git_url said explicitly."""
    assert GitHubAppSettings(**gh()).effective_git_url == "https://github.com"
    ghes = GitHubAppSettings(**gh(api_url="https://ghe.example.com/api/v3/"))
    assert ghes.api_url == "https://ghe.example.com/api/v3"
    assert ghes.effective_git_url == "https://ghe.example.com"
    with pytest.raises(ValidationError, match="git_url"):
        GitHubAppSettings(**gh(api_url="https://proxy.example.com/github"))


@pytest.mark.parametrize(
    "values",
    [
        gh(client_id="Iv1.abc"),  # both identities
        {"private_key_file": "/k"},  # neither
        gh(private_key_vault={"path": "github/app"}),  # both key sources
        {"app_id": 1},  # no key
        gh(api_url="ftp://api.github.com"),
        gh(api_url="https://user@api.github.com"),
    ],
)
def test_incoherent_sections_are_refused(values: dict[str, Any]) -> None:
    """Exactly one of app_id/client_id, exactly one key source, an http(s) base URL."""
    with pytest.raises(ValidationError):
        GitHubAppSettings(**values)


def test_production_needs_https_and_a_token_key(tmp_path: Path) -> None:
    """Outside dev mode: no plain-http GitHub, no disabled TLS checks, and a token_key_file (else
    no other process could revoke a token this one minted)."""
    key = tmp_path / "signing.pem"
    key.write_text("x")
    with pytest.raises(ValidationError) as refused:
        Settings(
            signing_key_file=key,
            github=GitHubAppSettings(**gh(api_url="http://ghe.internal/api/v3", verify_tls=False)),
        )
    text = str(refused.value)
    assert "github.api_url (http://ghe.internal) is plain http" in text
    assert "github.token_key_file is not set" in text
    assert "github.verify_tls is false" in text
    Settings(
        signing_key_file=key,
        github=GitHubAppSettings(**gh(token_key_file=tmp_path / "token.key")),
    )
