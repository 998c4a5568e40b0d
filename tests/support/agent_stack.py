"""A live broker on a real socket with real OpenBao, for the agent-side tests (client, CLI, MCP).

The broker serves the repository's ``vault-kv-read`` scope plus a few test scopes that exercise
the agent's error paths: one that needs a human approver, one only admins may request, one that
allows a single open task.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from broker.client import BrokerClient, ClientConfig, FileIdToken, SessionCache
from broker.domain.records import Credential
from broker.settings import AwsSettings, Settings
from broker.store import repo
from broker.store.migrate import upgrade
from broker.wiring import Broker
from tests.support.issuer import TestIssuer
from tests.support.services import LiveServer, Moto, OpenBao, live_broker

REPO = Path(__file__).resolve().parents[2]

MANUAL_SCOPE = """\
name: agent-test-manual
description: Read the demo secrets, after an SRE approves.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 5
risk: medium
approval:
  mode: manual
  count: 1
  approvers:
    all:
      - claim: groups
        equals: sre
  request_ttl: 600
  approval_ttl: 300
"""

ADMINS_SCOPE = """\
name: agent-test-admins
description: Only admins may ask for this one.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: groups
      equals: admins
ttl:
  default: 600
  max: 900
risk: low
approval:
  mode: auto
"""

SINGLE_SCOPE = """\
name: agent-test-single
description: One open task at a time.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 1
risk: low
approval:
  mode: auto
"""


def write_scopes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "scopes" / "vault-kv-read.yaml", folder / "vault-kv-read.yaml")
    for name, text in (
        ("agent-test-manual", MANUAL_SCOPE),
        ("agent-test-admins", ADMINS_SCOPE),
        ("agent-test-single", SINGLE_SCOPE),
    ):
        (folder / f"{name}.yaml").write_text(text)
    return folder


@dataclass
class AgentStack:
    server: LiveServer
    broker: Broker
    issuer: TestIssuer
    openbao: OpenBao
    home: Path

    @property
    def url(self) -> str:
        return self.server.url

    def token_file(self, sub: str = "agent-1", **claims: Any) -> Path:
        """A fresh ID token for ``sub`` in a file (as a platform would mount it)."""
        path = self.home / f"id-token-{sub}-{time.monotonic_ns()}"
        path.write_text(self.issuer.token(sub, ttl=3600, **claims))
        return path

    def env(self, sub: str = "agent-1", **claims: Any) -> dict[str, str]:
        """The environment of an agent process: broker URL, ID token file, its own session cache."""
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("BROKER_", "VAULT_", "AWS_", "ACTIONS_ID_TOKEN"))
            and k != "TRACEPARENT"
        }
        return {
            **base,
            "BROKER_URL": self.url,
            "BROKER_ID_TOKEN_FILE": str(self.token_file(sub, **claims)),
            "BROKER_SESSION_CACHE": str(self.home / f"sessions-{sub}.json"),
            "BROKER_K8S_TOKEN_FILE": str(self.home / "no-k8s-token"),
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }

    def client(self, sub: str = "agent-1", **claims: Any) -> BrokerClient:
        return BrokerClient(
            ClientConfig(broker_url=self.url, timeout=20),
            id_token_source=FileIdToken(self.token_file(sub, **claims)),
            session_cache=SessionCache(self.home / f"sdk-sessions-{sub}.json"),
        )

    def approve(
        self, task_id: str, sub: str = "sam", reason: str = "looks right"
    ) -> dict[str, Any]:
        """A human SRE approves ``task_id`` through the broker's approval API."""
        token = self.issuer.token(sub, groups=["sre"], broker_roles=["approver"])
        with httpx.Client(base_url=self.url, timeout=20) as http:
            session = http.post(
                "/oauth2/token",
                data={
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                    "subject_token": token,
                },
            )
            assert session.status_code == 200, session.text
            resp = http.post(
                f"/v1/approvals/{task_id}/approve",
                json={"reason": reason},
                headers={"Authorization": f"Bearer {session.json()['access_token']}"},
            )
            assert resp.status_code == 200, resp.text
            body: dict[str, Any] = resp.json()
            return body

    def vault_token_alive(self, token: str) -> bool:
        """Whether OpenBao still accepts ``token`` (asked with the token itself)."""
        with self.openbao.client(token) as c:
            return c.get("/v1/auth/token/lookup-self").status_code == 200

    def events(self, task_id: str, name: str | None = None) -> list[dict[str, Any]]:
        with self.broker.db.read() as conn:
            return repo.audit_events(conn, task_id=task_id, name=name, limit=1000)

    def broker_events_by_trace(self, trace_id: str) -> list[dict[str, Any]]:
        with self.broker.db.read() as conn:
            events = repo.audit_events(conn, limit=100_000)
        return [e for e in events if e["trace_id"] == trace_id]

    def credentials(self, task_id: str) -> list[Credential]:
        with self.broker.db.read() as conn:
            return repo.credentials_for(conn, task_id)

    def task_state(self, task_id: str) -> str:
        with self.broker.db.read() as conn:
            task = repo.get_task(conn, task_id)
        assert task is not None
        return task.state.value


def agent_settings(
    home: Path,
    issuer: TestIssuer,
    openbao: OpenBao,
    moto: Moto | None = None,
    **overrides: Any,
) -> Settings:
    values: dict[str, Any] = {
        "dev_mode": True,
        "data_dir": home / "data",
        "scopes_dir": write_scopes(home / "scopes"),
        # Roles from the `broker_roles` claim, so a test can log in an approver next to its agents.
        "issuers": [issuer.issuer_config(claims={"roles": "broker_roles"})],
        "vault": openbao.vault_settings(),
    }
    if moto is not None:
        # The repository's aws-s3-read scope, against moto's STS (its IAM roles are provisioned).
        shutil.copy(REPO / "scopes" / "aws-s3-read.yaml", home / "scopes" / "aws-s3-read.yaml")
        values["aws"] = AwsSettings(endpoint_url=moto.endpoint)
    values.update(overrides)
    settings = Settings(**values)
    upgrade(settings.effective_database_url)
    return settings


class ShiftedClock:
    """Real time plus an offset a test can move forward (approvals and requests expire)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@contextmanager
def agent_stack(
    home: Path,
    issuer: TestIssuer,
    openbao: OpenBao,
    *,
    clock: ShiftedClock | None = None,
    moto: Moto | None = None,
    **overrides: Any,
) -> Iterator[AgentStack]:
    """A live broker for agent tests; ``home`` holds its store, scopes, tokens and caches."""
    home.mkdir(parents=True, exist_ok=True)
    settings = agent_settings(home, issuer, openbao, moto, **overrides)
    build: dict[str, Any] = {"clock": clock} if clock is not None else {}
    with live_broker(settings, **build) as (server, broker):
        yield AgentStack(server, broker, issuer, openbao, home)
