"""Helpers for task and approval flows over real HTTP: people with real tokens, a movable clock,
a webhook receiver, and scope folders a test may edit."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from broker.settings import Settings
from broker.wiring import Broker
from tests.support.issuer import TestIssuer
from tests.support.services import live_broker

REPO = Path(__file__).resolve().parents[2]
SCOPES = REPO / "scopes"
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"

#: A manual-approval template minting a real OpenBao child token (kv-read), for flows that mint.
REVIEWED_KV = """\
name: vault-kv-reviewed
description: Read the demo secrets, after a reviewer approved it.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: groups
      one_of: [developers]
ttl:
  default: 600
  max: 1200
max_uses: 10
risk: medium
approval:
  mode: manual
  count: 1
  approvers:
    all:
      - claim: groups
        equals: reviewers
  request_ttl: 1800
  approval_ttl: 300
"""


class Clock:
    """Wall time plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def settings_for(
    make_settings: Any, issuer: TestIssuer, scopes_dir: Path = SCOPES, **overrides: Any
) -> Settings:
    """Dev settings trusting ``issuer`` with roles from the ``broker_roles`` claim."""
    values: dict[str, Any] = {
        "scopes_dir": scopes_dir,
        "scopes_reload_interval": 0,
        "session_max_ttl": 86_400,
        "issuers": [issuer.issuer_config(claims={"roles": "broker_roles"})],
    }
    values.update(overrides)
    settings: Settings = make_settings(**values)
    return settings


def scope_folder(tmp_path: Path, *extra: tuple[str, str]) -> Path:
    """A copy of the example scopes plus ``(name, yaml)`` extras, for tests that edit templates."""
    folder = tmp_path / "scopes"
    shutil.copytree(SCOPES, folder)
    for name, text in extra:
        (folder / f"{name}.yaml").write_text(text)
    return folder


@dataclass
class Person:
    """Someone with a broker session: an agent, an approver, or both."""

    client: httpx.Client
    token: str
    subject: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(path, headers={**self.auth, **kw.pop("headers", {})}, **kw)

    def request(
        self,
        scope: str,
        params: dict[str, Any] | None = None,
        *,
        key: str | None = None,
        **body: Any,
    ) -> httpx.Response:
        payload = {"scope": scope, "params": params or {}, "purpose": "a test task", **body}
        return self.post("/v1/tasks", json=payload, headers={"Idempotency-Key": key} if key else {})

    def approve(self, task_id: str, reason: str = "looks right") -> httpx.Response:
        return self.post(f"/v1/approvals/{task_id}/approve", json={"reason": reason})

    def deny(self, task_id: str, reason: str = "not now") -> httpx.Response:
        return self.post(f"/v1/approvals/{task_id}/deny", json={"reason": reason})

    def task(self, task_id: str, **params: Any) -> dict[str, Any]:
        resp = self.get(f"/v1/tasks/{task_id}", params=params)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def mint(self, task_id: str) -> httpx.Response:
        return self.post(f"/v1/tasks/{task_id}/credentials")


def login(client: httpx.Client, issuer: TestIssuer, sub: str, **claims: Any) -> Person:
    """Exchange a real ID token from ``issuer`` for a session (tokens live long: clocks move)."""
    resp = client.post(
        "/oauth2/token",
        data={
            "grant_type": GRANT,
            "subject_token_type": ID_TOKEN,
            "subject_token": issuer.token(sub, ttl=20_000, **claims),
        },
    )
    assert resp.status_code == 200, resp.text
    return Person(client, resp.json()["access_token"], sub)


@dataclass
class Cast:
    """The usual people: an agent, two release managers, a DBA, a reviewer, a bystander."""

    agent: Person
    dba: Person
    reviewer: Person
    manager1: Person
    manager2: Person
    not_approver: Person
    wrong_group: Person


def cast(client: httpx.Client, issuer: TestIssuer) -> Cast:
    approver = ["agent", "approver"]
    return Cast(
        agent=login(
            client, issuer, "agent-1", groups=["developers", "release"], broker_roles=["agent"]
        ),
        dba=login(client, issuer, "dana", name="Dana DBA", groups=["dba"], broker_roles=approver),
        reviewer=login(client, issuer, "rita", groups=["reviewers"], broker_roles=approver),
        manager1=login(client, issuer, "max", groups=["release-managers"], broker_roles=approver),
        manager2=login(client, issuer, "mia", groups=["release-managers"], broker_roles=approver),
        not_approver=login(
            client, issuer, "nick", groups=["dba", "reviewers"], broker_roles=["agent"]
        ),
        wrong_group=login(client, issuer, "walt", groups=["developers"], broker_roles=approver),
    )


@contextmanager
def running(settings: Settings, **build: Any) -> Iterator[tuple[Broker, httpx.Client]]:
    """The real app on a real socket, and a client for it."""
    with (
        live_broker(settings, **build) as (server, broker),
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield broker, client


def events(broker: Broker, task_id: str | None = None) -> list[dict[str, Any]]:
    from broker.store import repo

    with broker.db.read() as conn:
        return repo.audit_events(conn, task_id=task_id, limit=10_000)


@dataclass
class WebhookReceiver:
    """Collects webhook POSTs (headers and raw body); ``status`` sets the answer."""

    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> WebhookReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.received.append((dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def bodies(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(b) for _, b in self.received]

    def wait_for(self, count: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.received) >= count, f"{len(self.received)} of {count} webhooks arrived"
