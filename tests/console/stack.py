"""The console's test stack: the real dev issuer and the real broker on real sockets.

The broker needs its public URL (the sign-in's redirect URI) before it starts, so both servers
listen on ports chosen first. People sign in through the dev issuer's sign-in page exactly as in
``broker dev``; agents get ID tokens from its JSON token endpoint and exchange them at the API.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import uvicorn

from broker.api.app import create_app
from broker.api.dev_issuer import create_dev_issuer_app
from broker.devstack.processes import free_port
from broker.settings import Settings
from broker.store.migrate import upgrade
from broker.wiring import Broker, build_broker

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"

#: High risk, one approver from the SREs; a broker-signed JWT (nothing else to run).
DEPLOY_NOTES = """\
name: deploy-notes
description: Sign deploy notes for one environment, after an SRE agreed.
owner: platform-team
backend:
  type: broker_jwt
  audience: notes-service
  claims:
    environment: "{{params.environment}}"
    ticket: "{{params.ticket}}"
parameters:
  environment:
    description: Where the notes go.
    enum: [staging, production]
  ticket:
    description: The change ticket.
    max_length: 40
requester:
  all:
    - claim: groups
      one_of: [developers, sre]
ttl:
  default: 600
  max: 1800
max_active_tasks: 10
risk: high
approval:
  mode: manual
  count: 1
  approvers:
    all:
      - claim: groups
        equals: sre
  request_ttl: 3600
  approval_ttl: 900
"""

#: An OpenBao child token (kv-read) after one SRE approved: for the timeline.
KV_REVIEWED = """\
name: kv-reviewed
description: Read the demo secrets after an SRE approved it.
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
max_uses: 20
max_active_tasks: 10
risk: medium
approval:
  mode: manual
  count: 1
  approvers:
    all:
      - claim: groups
        equals: sre
  request_ttl: 1800
  approval_ttl: 600
"""


class Server:
    """An ASGI app on a given loopback port, in a background thread."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=2,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@dataclass
class DevIssuer:
    """The dev issuer of ``broker dev``, with every ID token it issued remembered (for the
    tests that prove no token ever reaches a page)."""

    server: Server
    app: Any
    issued: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def config(self) -> dict[str, Any]:
        """The issuer entry ``broker dev`` writes."""
        return {
            "name": "dev",
            "issuer": self.url,
            "audiences": ["broker"],
            "preset": "dev",
            "algorithms": ["ES256"],
            "claims": {
                "subject": "sub",
                "display_name": "name",
                "groups": "groups",
                "roles": "broker_roles",
            },
        }

    def id_token(self, sub: str, **claims: Any) -> str:
        resp = httpx.post(
            f"{self.url}/token", json={"sub": sub, "aud": "broker", "ttl": 3600, "claims": claims}
        )
        assert resp.status_code == 200, resp.text
        token = str(resp.json()["id_token"])
        self.issued.append(token)
        return token


@contextmanager
def dev_issuer(state_dir: Path) -> Iterator[DevIssuer]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    app = create_dev_issuer_app(url, state_dir / "dev-issuer-key.pem")
    issuer = DevIssuer(Server(app, port), app)
    login = app.state.dev_login
    sign = login.sign

    def recording(claims: dict[str, Any], ttl: int) -> str:
        token: str = sign(claims, ttl)
        issuer.issued.append(token)
        return token

    login.sign = recording
    with issuer.server:
        yield issuer


@dataclass
class Agent:
    """An agent with a session over the real API."""

    client: httpx.Client
    token: str
    id_token: str
    subject: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def request(self, scope: str, params: dict[str, Any], purpose: str) -> dict[str, Any]:
        resp = self.client.post(
            "/v1/tasks",
            json={"scope": scope, "params": params, "purpose": purpose},
            headers=self.auth,
        )
        assert resp.status_code in (200, 201), resp.text
        body: dict[str, Any] = resp.json()
        return body

    def task(self, task_id: str) -> dict[str, Any]:
        resp = self.client.get(f"/v1/tasks/{task_id}", headers=self.auth)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body


@dataclass
class Stack:
    broker: Broker
    url: str
    issuer: DevIssuer
    client: httpx.Client

    def agent(self, sub: str, **claims: Any) -> Agent:
        id_token = self.issuer.id_token(sub, **claims)
        resp = self.client.post(
            "/oauth2/token",
            data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
        )
        assert resp.status_code == 200, resp.text
        return Agent(self.client, resp.json()["access_token"], id_token, sub)


def console_settings(tmp_path: Path, issuer: DevIssuer, port: int, **overrides: Any) -> Settings:
    """Dev settings as ``broker dev`` makes them, with the console signing people in."""
    scopes = tmp_path / "scopes"
    scopes.mkdir(parents=True, exist_ok=True)
    (scopes / "deploy-notes.yaml").write_text(DEPLOY_NOTES)
    (scopes / "kv-reviewed.yaml").write_text(KV_REVIEWED)
    values: dict[str, Any] = {
        "dev_mode": True,
        "public_url": f"http://127.0.0.1:{port}",
        "data_dir": tmp_path / "data",
        "scopes_dir": scopes,
        "scopes_reload_interval": 0,
        "issuers": [issuer.config()],
        "console": {"issuer": "dev"},
    }
    values.update(overrides)
    settings = Settings(**values)
    upgrade(settings.effective_database_url)
    return settings


@contextmanager
def console_stack(tmp_path: Path, issuer: DevIssuer, **overrides: Any) -> Iterator[Stack]:
    """The real broker with the console, on the port its public URL names."""
    port = free_port()
    settings = console_settings(tmp_path, issuer, port, **overrides)
    broker = build_broker(settings)
    with (
        Server(create_app(settings, broker=broker), port) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        yield Stack(broker, server.url, issuer, client)


# --- signing in without a browser (for protocol-level tests) ---------------------------------


def sign_in(
    client: httpx.Client,
    *,
    sub: str,
    roles: list[str],
    groups: str = "",
    name: str = "",
    next_path: str = "/ui",
) -> httpx.Response:
    """Sign in over HTTP like a browser would; returns the callback's answer. ``client`` keeps
    the cookies (it must be a client for the broker's URL)."""
    resp = client.get("/ui/login", params={"next": next_path})
    assert resp.status_code == 303, resp.text
    authorize = resp.headers["location"]
    page = httpx.get(authorize)
    assert page.status_code == 200, page.text
    hidden = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
    hidden = {k: _unescape(v) for k, v in hidden.items()}
    form: dict[str, Any] = {**hidden, "sub": sub, "name": name, "groups": groups}
    form["role"] = roles
    form["action"] = "sign-in"
    back = httpx.post(f"{_origin(authorize)}/authorize", data=form)
    assert back.status_code == 303, back.text
    location = back.headers["location"]
    parts = urlsplit(location)
    return client.get(parts.path, params={k: v[0] for k, v in parse_qs(parts.query).items()})


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _unescape(value: str) -> str:
    import html

    return html.unescape(value)


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "the page has no CSRF field"
    return match.group(1)
