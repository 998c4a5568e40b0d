"""The GitHub App backend against GitHub's published OpenAPI description (prism validating every
request, see tests/support/github_contract.py), with the broker's own GitHub rules on top."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import httpx
import jwt
import pytest

from broker.backends.base import CredentialExpired, RevokeRef
from broker.backends.github_app import TokenSealer
from broker.domain import github
from broker.errors import InvalidRequest, ServiceUnavailable
from broker.scopes.loader import parse_template
from tests.backends.github_helpers import (
    Recorder,
    app_key,
    github_backend,
    mint_request,
    sealer_file,
    spec,
)
from tests.support.github_contract import (
    EXAMPLE_REPOSITORY_ID,
    EXAMPLE_TOKEN,
    GitHubStandIn,
)
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

ACCESS_TOKENS = "/app/installations/1/access_tokens"


def test_the_stand_in_refuses_what_github_s_schema_refuses(github_api: GitHubStandIn) -> None:
    """Proof that the stand-in validates: a bad permission level is answered 422 with prism's
    violation naming the field; the same request with a valid level is answered 201. An unknown
    permission name passes GitHub's schema (it allows extra properties), which is why the broker
    checks names itself."""
    with httpx.Client(base_url=github_api.url, timeout=20) as http:
        bad = http.post(ACCESS_TOKENS, json={"permissions": {"contents": "admin"}})
        good = http.post(ACCESS_TOKENS, json={"permissions": {"contents": "read"}})
        unknown = http.post(ACCESS_TOKENS, json={"permissions": {"no_such_thing": "read"}})
        vnd = http.get("/app", headers={"Accept": "application/vnd.github+json"})
    assert bad.status_code == 422
    assert "permissions.contents" in bad.headers["sl-violations"]
    assert good.status_code == 201
    assert unknown.status_code == 201
    # The broker's Accept header names GitHub's media type first and application/json second,
    # because the description lists only application/json.
    assert vnd.status_code == 406


def test_a_mint_sends_only_requests_github_s_schema_accepts(
    github_api: GitHubStandIn, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Minting for Hello-World with contents and pull_requests write: the installation is looked
    up as the App (an RS256 JWT), the installation's repositories listed with a metadata-only
    token that is deleted at once, then the token created with exactly the rendered repositories
    and permissions. Every request passed GitHub's schema; the credential carries GitHub's expiry,
    the hashed_token GitHub's audit log records, and a sealed copy only the key opens. Neither the
    token nor the private key appears in any log line."""
    caplog.set_level(logging.DEBUG)
    key_file, key = app_key(tmp_path)
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, key_file=key_file, recorder=rec)
    request = mint_request(spec())
    minted = backend.mint(request)

    assert rec.paths() == [
        ("GET", "/orgs/octo-org/installation"),
        ("POST", ACCESS_TOKENS),
        ("GET", "/installation/repositories"),
        ("DELETE", "/installation/token"),
        ("POST", ACCESS_TOKENS),
    ]
    assert all(status < 300 for *_, status in rec.calls), rec.calls
    lookup, listing_token, listing, delete, create = rec.calls
    assert listing_token[2] == {"permissions": {"metadata": "read"}}
    assert listing[3] == f"token {EXAMPLE_TOKEN}"
    assert delete[3] == f"token {EXAMPLE_TOKEN}"
    assert create[2] == {
        "permissions": {"contents": "write", "pull_requests": "write"},
        "repositories": ["Hello-World"],
    }
    for call in (lookup, listing_token, create):
        scheme, _, token = call[3].partition(" ")
        assert scheme == "Bearer"
        claims = jwt.decode(token, key.public_key(), algorithms=["RS256"])
        assert claims["iss"] == "12345"

    assert minted.kind == "github_app_token"
    assert minted.secret == {"token": EXAMPLE_TOKEN}
    assert minted.env["GH_TOKEN"] == minted.env["GITHUB_TOKEN"] == EXAMPLE_TOKEN
    assert minted.expires_at == int(github_api.token_expires_at)
    assert minted.handle == minted.details["hashed_token"] == github.hashed_token(EXAMPLE_TOKEN)
    assert minted.details["installation_id"] == 1
    assert minted.details["repositories"] == ["Hello-World"]
    assert minted.details["repository_ids"] == [EXAMPLE_REPOSITORY_ID]
    assert minted.details["inject"]["git"] == [
        {"url": "http://127.0.0.1:9", "username": "x-access-token"}
    ]
    assert minted.sealed is not None
    assert EXAMPLE_TOKEN not in minted.sealed
    assert backend.sealer.unseal(minted.sealed, request.credential_id) == EXAMPLE_TOKEN
    with pytest.raises(ServiceUnavailable):
        backend.sealer.unseal(minted.sealed, "crd_other")  # bound to its credential
    assert EXAMPLE_TOKEN not in repr(minted)
    assert EXAMPLE_TOKEN not in caplog.text
    assert "PRIVATE KEY" not in caplog.text


def test_installation_and_listing_are_remembered_briefly(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """A second mint within cache_seconds skips the lookup and the listing (one POST); with
    cache_seconds 0 every mint looks again."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    backend.mint(mint_request(spec()))
    rec.clear()
    backend.mint(mint_request(spec(), "crd_test2"))
    assert rec.paths() == [("POST", ACCESS_TOKENS)]

    rec_off = Recorder()
    uncached = github_backend(github_api.url, tmp_path / "b", recorder=rec_off, cache_seconds=0)
    for n in range(2):
        uncached.mint(mint_request(spec(), f"crd_off{n}"))
    assert rec_off.paths().count(("GET", "/orgs/octo-org/installation")) == 2


def test_a_user_owner_is_looked_up_under_users(github_api: GitHubStandIn, tmp_path: Path) -> None:
    """owner_type user: GET /users/{username}/installation; repository_ids go as ids."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    backend.mint(
        mint_request(
            spec(
                owner="octocat",
                owner_type="user",
                repositories=[],
                repository_ids=[EXAMPLE_REPOSITORY_ID],
            )
        )
    )
    assert rec.paths()[0] == ("GET", "/users/octocat/installation")
    assert rec.calls[-1][2] == {
        "permissions": {"contents": "write", "pull_requests": "write"},
        "repository_ids": [EXAMPLE_REPOSITORY_ID],
    }


@pytest.mark.parametrize(
    ("rendered", "code"),
    [
        (spec(repositories=["Other-Repo"]), "github_repository_not_in_installation"),
        (spec(repositories=[], repository_ids=[999]), "github_repository_not_in_installation"),
        (spec(permissions={"actions": "write"}), "github_permission_not_granted"),
        (spec(permissions={"issues": "write", "checks": "write"}), None),
    ],
)
def test_the_installation_bounds_what_is_asked(
    github_api: GitHubStandIn, tmp_path: Path, rendered: object, code: str | None
) -> None:
    """A repository outside the installation's selection, or a permission the installation does
    not hold, is refused before the token request (no POST with it is sent); within both, the
    request goes out (and here GitHub's canned grant then differs, see the widening test)."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    if code is None:
        with pytest.raises(ServiceUnavailable):  # the canned answer is wider: deleted
            backend.mint(mint_request(rendered))  # type: ignore[arg-type]
        assert rec.calls[-2][1] == ACCESS_TOKENS
        return
    with pytest.raises(InvalidRequest) as refused:
        backend.mint(mint_request(rendered))  # type: ignore[arg-type]
    assert refused.value.code == code
    narrowed = [c for c in rec.calls if c[1] == ACCESS_TOKENS and "repositories" in (c[2] or {})]
    assert narrowed == []


def test_unknown_permissions_and_too_many_repositories_never_reach_github(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """GitHub's schema lets an unknown permission name through (see the first test); the broker
    refuses it, and more than 500 repositories, in plan() without a single request."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    from pydantic import BaseModel

    def forged(**kw: object) -> BaseModel:
        # The template model refuses these already; a forged spec shows the backend's own check.
        return spec().model_copy(update=kw)

    for rendered, code in (
        (forged(permissions={"no_such_thing": "read"}), "github_permission_invalid"),
        (forged(permissions={"workflows": "read"}), "github_permission_invalid"),
        (forged(repositories=[f"r{i}" for i in range(501)]), "github_too_many_repositories"),
    ):
        with pytest.raises(InvalidRequest) as refused:
            backend.mint(mint_request(rendered))  # type: ignore[arg-type]
        assert refused.value.code == code
    assert rec.calls == []


def test_a_token_wider_than_asked_is_deleted_and_nothing_issued(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """Asking for contents: read while GitHub (its canned answer) grants contents and
    pull_requests write: the broker deletes that token at once and refuses, fail closed."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    with pytest.raises(ServiceUnavailable) as refused:
        backend.mint(mint_request(spec(permissions={"contents": "read"})))
    assert refused.value.code == "backend_refused"
    assert "wider" in refused.value.detail
    assert rec.paths()[-2:] == [("POST", ACCESS_TOKENS), ("DELETE", "/installation/token")]
    assert rec.calls[-1][3] == f"token {EXAMPLE_TOKEN}"


def test_an_already_expired_answer_is_refused(github_api: GitHubStandIn, tmp_path: Path) -> None:
    """A token whose expires_at has passed (here: the broker's clock two hours ahead) is deleted
    and nothing is issued; one living longer than an hour (clock two hours behind) likewise."""
    for offset in (7200, -7200):
        rec = Recorder()
        backend = github_backend(
            github_api.url,
            tmp_path / str(offset),
            recorder=rec,
            clock=lambda o=offset: time.time() + o,
        )
        with pytest.raises(ServiceUnavailable):
            backend.mint(mint_request(spec()))
        assert rec.paths()[-1] == ("DELETE", "/installation/token")


def test_revocation_deletes_the_token_with_the_token(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """revoke() opens the sealed copy and sends DELETE /installation/token authenticated with
    the token itself (204). A second backend built from the same key file (a restart, another
    replica) revokes too; one with another key cannot, and says so."""
    key_file, _ = app_key(tmp_path)
    token_key = sealer_file(tmp_path)
    minted = github_backend(github_api.url, tmp_path, key_file=key_file, token_key=token_key).mint(
        mint_request(spec())
    )
    ref = RevokeRef(
        credential_id="crd_test1",
        task_id="tsk_test1",
        kind=minted.kind,
        handle=minted.handle,
        details=minted.details,
        expires_at=minted.expires_at,
        sealed=minted.sealed,
    )
    rec = Recorder()
    restarted = github_backend(
        github_api.url, tmp_path, key_file=key_file, token_key=token_key, recorder=rec
    )
    restarted.revoke(ref)
    assert rec.calls == [("DELETE", "/installation/token", None, f"token {EXAMPLE_TOKEN}", 204)]
    other = github_backend(
        github_api.url, tmp_path, key_file=key_file, token_key=sealer_file(tmp_path, "other.key")
    )
    with pytest.raises(ServiceUnavailable) as refused:
        other.revoke(ref)
    assert refused.value.code == "github_token_unavailable"
    with pytest.raises(ServiceUnavailable) as missing:
        restarted.revoke(RevokeRef("crd_x", "tsk_x", minted.kind, None, dict(minted.details)))
    assert missing.value.code == "github_token_unavailable"


def test_after_github_s_expiry_revocation_reports_expired_not_revoked(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """Once GitHub's expires_at has passed there is nothing to delete: revoke() raises
    CredentialExpired (the broker records 'expired') without calling GitHub."""
    rec = Recorder()
    backend = github_backend(
        github_api.url, tmp_path, recorder=rec, clock=lambda: github_api.token_expires_at + 1
    )
    ref = RevokeRef(
        "crd_1",
        "tsk_1",
        "github_app_token",
        "h",
        {"github_expires_at": github_api.token_expires_at},
        sealed="v1.x.y",
    )
    with pytest.raises(CredentialExpired):
        backend.revoke(ref)
    intent = RevokeRef("crd_2", "tsk_2", "github_app", None, {"max_expires_at": time.time() - 1})
    with pytest.raises(CredentialExpired):
        backend.revoke(intent)
    assert rec.calls == []


def test_a_token_github_no_longer_accepts_is_not_called_revoked(tmp_path: Path) -> None:
    """DELETE answered 401 (revoked by its holder, or by a racing replica): the backend raises,
    so the record stays revoke_pending (then expired), never 'revoked' without a 204. GitHub's
    description has no 401 example to serve, so this one answer comes from an httpx transport."""
    sealer = TokenSealer.from_file(sealer_file(tmp_path, "s.key"))
    backend = github_backend("http://github.invalid", tmp_path)
    backend.http = httpx.Client(
        base_url="http://github.invalid",
        transport=httpx.MockTransport(
            lambda r: httpx.Response(401, json={"message": "Bad credentials"})
        ),
    )
    backend.sealer = sealer
    ref = RevokeRef(
        "crd_1",
        "tsk_1",
        "github_app_token",
        "h",
        {"github_expires_at": time.time() + 600},
        sealed=sealer.seal("ghs_x", "crd_1"),
    )
    with pytest.raises(ServiceUnavailable) as refused:
        backend.revoke(ref)
    assert refused.value.code == "github_token_rejected"


def test_health_asks_github_as_the_app(github_api: GitHubStandIn, tmp_path: Path) -> None:
    """health() is GET /app with the app JWT (answered by the stand-in); an unreadable key
    makes it fail with a message that names no key material."""
    rec = Recorder()
    backend = github_backend(github_api.url, tmp_path, recorder=rec)
    backend.health()
    assert rec.paths() == [("GET", "/app")]
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN RSA PRIVATE KEY-----\nnot a key\n-----END RSA PRIVATE KEY-----\n")
    bad = github_backend(github_api.url, tmp_path, key_file=broken)
    with pytest.raises(ServiceUnavailable) as refused:
        bad.health()
    assert "not a key" not in str(refused.value) + str(refused.value.internal)


TEMPLATE = """\
name: gh-check
description: check
owner: platform
backend:
  type: github_app
  owner: octo-org
  repositories: [Hello-World]
  permissions: {{contents: read}}
  maximum:
    permissions: {{contents: write, {extra}}}
requester:
  all:
    - claim: sub
      equals: a
ttl: {{default: 900, max: 3600}}
"""


def test_check_template_reports_permissions_the_installation_lacks(
    github_api: GitHubStandIn, tmp_path: Path
) -> None:
    """check_template() (the hook for `broker scopes check --live`) is silent when the
    installation holds every level the template may ask for, and names the permission when
    the template's maximum goes beyond it."""
    backend = github_backend(github_api.url, tmp_path)
    fine, _ = parse_template(tmp_path / "gh-check.yaml", TEMPLATE.format(extra="issues: write"))
    wide, _ = parse_template(tmp_path / "gh-check.yaml", TEMPLATE.format(extra="actions: write"))
    assert fine is not None
    assert wide is not None
    assert backend.check_template(fine.template) == []
    problems = backend.check_template(wide.template)
    assert len(problems) == 1
    assert "actions" in problems[0]
    # The same answers through the `scopes check --live` protocol, with what to create.
    (ok,) = backend.check(fine.template)
    assert ok.status == "ok" and "installed on 'octo-org'" in ok.what
    (missing,) = backend.check(wide.template)
    assert missing.status == "missing" and "actions" in (missing.found or "")
    assert "install the App on octo-org" in missing.fix


def test_the_private_key_can_live_in_openbao(
    github_api: GitHubStandIn, openbao: OpenBao, tmp_path: Path
) -> None:
    """github.private_key_vault: the composition root reads the App's key from OpenBao's KV
    engine through the Vault backend (hvac stays there), with a token that may read only that
    secret; GitHub (the stand-in) then accepts requests signed with it. A missing field fails
    health without naming any key material."""
    from cryptography.hazmat.primitives import serialization

    from broker.backends.vault import VaultBackend
    from broker.settings import GitHubAppSettings, Settings, VaultSecretRef
    from broker.wiring import github_backend as build_github

    _, key = app_key(tmp_path)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    with openbao.client() as root:
        assert root.post(
            "/v1/secret/data/github/app", json={"data": {"private_key": pem}}
        ).is_success
        policy = 'path "secret/data/github/app" { capabilities = ["read"] }'
        assert root.put("/v1/sys/policies/acl/github-app-key", json={"policy": policy}).is_success
        token = root.post(
            "/v1/auth/token/create", json={"policies": ["github-app-key"], "ttl": "10m"}
        ).json()["auth"]["client_token"]
    vault_settings = openbao.vault_settings(token=token)
    for field, ok in (("private_key", True), ("missing", False)):
        settings = Settings(
            dev_mode=True,
            data_dir=tmp_path / field,
            vault=vault_settings,
            github=GitHubAppSettings(
                app_id=12345,
                private_key_vault=VaultSecretRef(path="github/app", field=field),
                api_url=github_api.url,
                git_url="https://github.example",
            ),
        )
        backend = build_github(settings, VaultBackend(vault_settings))
        if ok:
            backend.health()
            claims = jwt.decode(
                backend.app_token(),  # type: ignore[attr-defined]
                key.public_key(),
                algorithms=["RS256"],
            )
            assert claims["iss"] == "12345"
        else:
            with pytest.raises(ServiceUnavailable) as refused:
                backend.health()
            assert "PRIVATE" not in str(refused.value.internal)
