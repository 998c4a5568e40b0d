"""ID token discovery: GitHub Actions over real HTTP, files, commands, Kubernetes; refusals."""

from __future__ import annotations

import base64
import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.client.errors import IdTokenUnavailable
from broker.client.tokens import (
    CommandIdToken,
    FileIdToken,
    GitHubActionsIdToken,
    KubernetesIdToken,
    StaticIdToken,
    discover,
)

JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJl"
OTHER_JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJvdGhlciJ9.c2lnbmF0dXJl"


class FakeGitHub:
    """GitHub's OIDC token endpoint, as a real HTTP server: checks the runtime token, echoes the audience."""

    def __init__(self, request_token: str = "gh-runtime-token") -> None:
        self.request_token = request_token
        self.seen: list[dict[str, Any]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                outer.seen.append({"auth": self.headers.get("Authorization"), "query": query})
                if self.headers.get("Authorization") != f"bearer {outer.request_token}":
                    self.send_response(401)
                    self.end_headers()
                    return
                body = json.dumps({"value": JWT, "audience": query.get("audience")}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        port = self.server.server_address[1]
        return f"http://127.0.0.1:{port}/_apis/token?api-version=2.0"


@pytest.fixture
def github() -> Iterator[FakeGitHub]:
    gh = FakeGitHub()
    yield gh
    gh.server.shutdown()
    gh.server.server_close()


def test_github_actions_token_is_fetched_with_the_brokers_audience(github: FakeGitHub) -> None:
    """In GitHub Actions the client asks the job's OIDC endpoint for a token whose audience is the
    broker's, authenticating with the runtime request token, and keeps the existing query."""
    source = discover(
        {
            "ACTIONS_ID_TOKEN_REQUEST_URL": github.url,
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "gh-runtime-token",
        },
        audience="broker-prod",
    )
    assert isinstance(source, GitHubActionsIdToken)
    with httpx.Client() as http:
        assert source.fetch(http) == JWT
    assert github.seen[0]["auth"] == "bearer gh-runtime-token"
    assert github.seen[0]["query"] == {"api-version": ["2.0"], "audience": ["broker-prod"]}
    assert "gh-runtime-token" not in repr(source)


def test_github_refusal_says_what_permission_is_missing(github: FakeGitHub) -> None:
    """A refused runtime token becomes IdTokenUnavailable naming `id-token: write`."""
    source = GitHubActionsIdToken(github.url, "wrong")
    with httpx.Client() as http, pytest.raises(IdTokenUnavailable) as err:
        source.fetch(http)
    assert "HTTP 401" in err.value.detail
    assert "id-token: write" in str(err.value.next_step)


def test_a_token_file_is_reread_so_rotation_is_picked_up(tmp_path: Path) -> None:
    """A file source (Kubernetes rotates projected tokens in place) returns the current content."""
    path = tmp_path / "token"
    path.write_text(JWT + "\n")
    source = discover({"BROKER_ID_TOKEN_FILE": str(path)})
    assert isinstance(source, FileIdToken)
    with httpx.Client() as http:
        assert source.fetch(http) == JWT
        path.write_text(OTHER_JWT)
        assert source.fetch(http) == OTHER_JWT


def test_kubernetes_projected_token_is_found_and_the_default_sa_token_is_not(
    tmp_path: Path,
) -> None:
    """A projected token at BROKER_K8S_TOKEN_FILE is used; nothing falls back to the pod's API
    service account token (its audience is the cluster, not the broker)."""
    projected = tmp_path / "broker-token"
    projected.write_text(JWT)
    source = discover({"BROKER_K8S_TOKEN_FILE": str(projected)})
    assert isinstance(source, KubernetesIdToken)
    with httpx.Client() as http:
        assert source.fetch(http) == JWT
    with pytest.raises(IdTokenUnavailable) as err:
        discover({"BROKER_K8S_TOKEN_FILE": str(tmp_path / "absent")})
    assert "serviceaccount" not in err.value.detail


def test_a_command_prints_the_token(tmp_path: Path) -> None:
    """BROKER_ID_TOKEN_COMMAND runs without a shell and its stdout is the token."""
    source = discover(
        {"BROKER_ID_TOKEN_COMMAND": f"{sys.executable} -c 'print(\"{JWT}\")'"},
    )
    assert isinstance(source, CommandIdToken)
    with httpx.Client() as http:
        assert source.fetch(http) == JWT


def test_a_failing_command_shows_its_stderr_never_its_stdout() -> None:
    """A failing token command reports its exit status and last stderr line; stdout (which could
    hold a partial token) stays out of the error."""
    source = CommandIdToken(
        (
            sys.executable,
            "-c",
            f"import sys; print('{JWT}'); print('login expired', file=sys.stderr); sys.exit(3)",
        )
    )
    with httpx.Client() as http, pytest.raises(IdTokenUnavailable) as err:
        source.fetch(http)
    assert "status 3" in err.value.detail
    assert "login expired" in err.value.detail
    assert JWT not in str(err.value)


def test_discovery_order_prefers_explicit_configuration(tmp_path: Path, github: FakeGitHub) -> None:
    """An explicit token, file or command wins over the platform's ambient token."""
    path = tmp_path / "t"
    path.write_text(JWT)
    env = {
        "ACTIONS_ID_TOKEN_REQUEST_URL": github.url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "x",
        "BROKER_ID_TOKEN_FILE": str(path),
    }
    assert isinstance(discover(env), FileIdToken)
    assert isinstance(discover({**env, "BROKER_ID_TOKEN": JWT}), StaticIdToken)


def test_without_any_source_the_error_lists_the_options() -> None:
    """No token anywhere: the error names every source and the next step; in GitHub Actions it
    points at the missing permission."""
    with pytest.raises(IdTokenUnavailable) as err:
        discover({"BROKER_K8S_TOKEN_FILE": "/nonexistent"})
    assert "BROKER_ID_TOKEN_FILE" in err.value.detail
    assert err.value.next_step and "BROKER_ID_TOKEN_COMMAND" in err.value.next_step
    with pytest.raises(IdTokenUnavailable) as err:
        discover({"GITHUB_ACTIONS": "true", "BROKER_K8S_TOKEN_FILE": "/nonexistent"})
    assert "id-token: write" in err.value.detail


@pytest.mark.parametrize("bad", ["", "   ", "not-a-jwt", "a.b", "a.b.c d", "x" * 20000])
def test_what_is_not_a_jwt_is_refused(bad: str) -> None:
    """Empty values, non-JWTs and oversized values never reach the broker."""
    with httpx.Client() as http, pytest.raises(IdTokenUnavailable):
        StaticIdToken(bad).fetch(http)


def test_costly_sources_name_their_cached_session_without_fetching(tmp_path: Path) -> None:
    """A command's (and GitHub Actions') session is found in the cache by the source itself, so
    a cached session is used without running anything; the key differs per command and per CI
    run, never holds the request token, and cheap sources (a file) are keyed by the identity in
    their token instead."""
    from broker.client.config import session_cache_key

    ran = tmp_path / "ran"
    command = discover(
        {"BROKER_ID_TOKEN_COMMAND": f"sh -c 'touch {ran}; echo {JWT}'", "GITHUB_RUN_ID": "7"}
    )
    key = session_cache_key("https://b", command, None)
    assert key is not None and not ran.exists()
    same = discover(
        {"BROKER_ID_TOKEN_COMMAND": f"sh -c 'touch {ran}; echo {JWT}'", "GITHUB_RUN_ID": "7"}
    )
    other_run = discover(
        {"BROKER_ID_TOKEN_COMMAND": f"sh -c 'touch {ran}; echo {JWT}'", "GITHUB_RUN_ID": "8"}
    )
    assert session_cache_key("https://b", same, None) == key
    assert session_cache_key("https://b", other_run, None) != key
    assert session_cache_key("https://c", same, None) != key
    github = GitHubActionsIdToken("https://gh.example/token?x=1", "request-secret")
    github_key = session_cache_key("https://b", github, None)
    assert github_key is not None and "request-secret" not in github_key
    path = tmp_path / "token"
    path.write_text(JWT)
    file_source = FileIdToken(path)
    assert session_cache_key("https://b", file_source, None) is None  # fetch, then key by identity

    def jwt_of(sub: str) -> str:
        body = base64.urlsafe_b64encode(json.dumps({"iss": "https://i", "sub": sub}).encode())
        return f"eyJhbGciOiJFUzI1NiJ9.{body.decode().rstrip('=')}.c2ln"

    one = session_cache_key("https://b", file_source, jwt_of("agent-a"))
    assert one is not None
    assert one != session_cache_key("https://b", file_source, jwt_of("agent-b"))
