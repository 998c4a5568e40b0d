"""Shared pieces of the GitHub backend tests: an App key, a backend on the contract stand-in,
and a recorder of every request the backend sends."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.backends.base import MintRequest
from broker.backends.github_app import GitHubAppBackend, TokenSealer, key_reader
from broker.domain.scope import GitHubAppBackend as GitHubAppSpec
from broker.settings import GitHubAppSettings


def app_key(folder: Path) -> tuple[Path, rsa.RSAPrivateKey]:
    """A fresh 2048-bit App key in PEM, as GitHub hands it out."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = folder / "app.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return path, key


def sealer_file(folder: Path, name: str | None = None) -> Path:
    """A fresh token-sealing key file (a new name unless one is given)."""
    path = folder / (name or f"token-{secrets.token_hex(4)}.key")
    TokenSealer.create_file(path)
    return path


@dataclass
class Recorder:
    """Every request sent and the status it got, in order (httpx event hooks)."""

    calls: list[tuple[str, str, dict[str, Any] | None, str, int]] = field(default_factory=list)
    _pending: list[tuple[str, str, dict[str, Any] | None, str]] = field(default_factory=list)

    def request(self, req: httpx.Request) -> None:
        body = json.loads(req.content) if req.content else None
        self._pending.append((req.method, req.url.path, body, req.headers.get("authorization", "")))

    def response(self, resp: httpx.Response) -> None:
        method, path, body, auth = self._pending.pop(0)
        self.calls.append((method, path, body, auth, resp.status_code))

    def paths(self) -> list[tuple[str, str]]:
        return [(m, p) for m, p, *_ in self.calls]

    def clear(self) -> None:
        self.calls.clear()


def github_backend(
    url: str,
    folder: Path,
    *,
    key_file: Path | None = None,
    token_key: Path | None = None,
    clock: Any = None,
    recorder: Recorder | None = None,
    **settings: Any,
) -> GitHubAppBackend:
    folder.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "app_id": 12345,
        "private_key_file": key_file or app_key(folder)[0],
        "api_url": url,
        "git_url": "http://127.0.0.1:9",
    }
    values.update(settings)
    config = GitHubAppSettings(**values)
    hooks = {"request": [recorder.request], "response": [recorder.response]} if recorder else {}
    http = httpx.Client(base_url=url, timeout=20, event_hooks=hooks)
    read = key_reader(config)
    assert read is not None
    kw: dict[str, Any] = {"clock": clock} if clock is not None else {}
    return GitHubAppBackend(
        config,
        private_key=read,
        sealer=TokenSealer.from_file(token_key or sealer_file(folder)),
        http=http,
        **kw,
    )


def spec(**overrides: Any) -> GitHubAppSpec:
    values: dict[str, Any] = {
        "type": "github_app",
        "owner": "octo-org",
        "repositories": ["Hello-World"],
        "permissions": {"contents": "write", "pull_requests": "write"},
    }
    values.update(overrides)
    return GitHubAppSpec(**values)


def mint_request(
    rendered: GitHubAppSpec, credential_id: str = "crd_test1", ttl: int = 900
) -> MintRequest:
    return MintRequest(
        task_id="tsk_test1",
        credential_id=credential_id,
        scope="github-test",
        issuer="https://issuer.example",
        subject="agent-1",
        ttl=ttl,
        spec=rendered,
    )
