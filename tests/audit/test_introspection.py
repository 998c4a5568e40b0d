"""Introspection of broker-signed tokens records each presentation as a use in the task's trace."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.domain.audit import EventName
from broker.store import repo
from tests.audit.conftest import exchange
from tests.support.issuer import TestIssuer
from tests.support.services import live_broker

pytestmark = pytest.mark.integration

TEMPLATE = """
name: reports-api
description: Call the internal reports API for one task.
owner: platform-team
backend:
  type: broker_jwt
  audience: reports-api
requester:
  all:
    - claim: sub
      regex: "agent-[a-z0-9-]{1,40}"
ttl:
  default: 300
  max: 600
risk: low
approval:
  mode: auto
"""


def test_introspected_tokens_become_use_spans_active_then_denied(
    issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """A resource server introspecting a broker-signed token records a use under the issuance
    (matched by jti); after the task ends the same presentation is recorded as a denied use."""
    scopes = tmp_path / "scopes"
    scopes.mkdir()
    (scopes / "reports-api.yaml").write_text(TEMPLATE)
    settings = make_settings(scopes_dir=scopes)
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        agent = {"Authorization": f"Bearer {exchange(client, issuer.token('agent-jwt'))}"}
        service = {"Authorization": f"Bearer {exchange(client, issuer.token('agent-reports'))}"}
        task = client.post(
            "/v1/tasks", headers=agent, json={"scope": "reports-api", "purpose": "fetch q1"}
        ).json()
        minted = client.post(f"/v1/tasks/{task['id']}/credentials", headers=agent)
        assert minted.status_code == 201, minted.text
        cred = minted.json()
        token = next(iter(cred["secret"].values()))
        answer = client.post("/oauth2/introspect", headers=service, data={"token": token})
        assert answer.json()["active"] is True
        assert client.post(f"/v1/tasks/{task['id']}/complete", headers=agent).status_code == 200
        assert client.post("/oauth2/introspect", headers=service, data={"token": token}).json() == {
            "active": False
        }
        with broker.db.read() as conn:
            uses = repo.audit_events(conn, task_id=task["id"], name=EventName.CREDENTIAL_USE)
            issue = repo.audit_events(
                conn, credential_id=cred["credential_id"], name=EventName.CREDENTIAL_ISSUE
            )[0]
    assert [u["outcome"] for u in uses] == ["success", "denied"]
    for use in uses:
        a = use["attributes"]
        assert use["trace_id"] == task["trace_id"] and use["parent_span_id"] == issue["span_id"]
        assert a["broker.use.source"] == "introspection"
        assert a["broker.use.matched_by"] == "jti"
        assert a["broker.use.target"].endswith("#agent-reports")
        assert token not in str(use)
