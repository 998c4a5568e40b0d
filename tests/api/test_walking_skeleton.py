"""The whole flow once, over HTTP, against the real OpenBao: exchange, request, mint, complete."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from broker.settings import OtlpSettings, VaultSettings
from broker.store import repo
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao, live_broker

pytestmark = pytest.mark.integration

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def exchange(client: httpx.Client, id_token: str) -> str:
    resp = client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["token_type"] == "Bearer"
    assert body["issued_token_type"] == "urn:ietf:params:oauth:token-type:access_token"
    assert body["access_token"].startswith("brk_sess_")
    return str(body["access_token"])


def vault_settings(bao: OpenBao) -> VaultSettings:
    return VaultSettings(addr=bao.addr, token=bao.broker_token, token_role="broker-child")


def test_skeleton_flow_mints_a_working_token_and_revokes_it(
    openbao: OpenBao, issuer: TestIssuer, otlp: OtlpReceiver, make_settings: Any
) -> None:
    """An agent's ID token becomes a session, a task, a real OpenBao token that works within its
    policies and TTL cap, and after `complete` OpenBao rejects it; each step is audited and exported."""
    settings = make_settings(
        vault=vault_settings(openbao), otlp=OtlpSettings(endpoint=otlp.endpoint, interval=0.05)
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        session = exchange(client, issuer.token("agent-1"))
        auth = {"Authorization": f"Bearer {session}"}

        me = client.get("/v1/sessions/current", headers=auth).json()
        assert (me["issuer"], me["subject"]) == (issuer.url, "agent-1")

        resp = client.post(
            "/v1/tasks",
            headers=auth,
            json={"scope": "vault-kv-read", "purpose": "read the demo secret"},
        )
        assert resp.status_code == 201, resp.text
        task = resp.json()
        assert task["state"] == "approved"
        assert task["decided_by_rule"]

        resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
        assert resp.status_code == 201, resp.text
        assert resp.headers["cache-control"] == "no-store"
        cred = resp.json()
        token = cred["secret"]["token"]
        assert cred["env"]["VAULT_TOKEN"] == token

        with openbao.client() as root:
            lookup = root.post("/v1/auth/token/lookup", json={"token": token}).json()["data"]
        assert "kv-read" in lookup["policies"]
        assert "root" not in lookup["policies"]
        assert 0 < lookup["ttl"] <= 3600  # the scope's cap
        assert lookup["explicit_max_ttl"] <= 3600
        assert lookup["meta"]["broker_task"] == task["id"]

        with openbao.client(token) as agent:
            assert agent.get("/v1/secret/data/demo/hello").json()["data"]["data"] == {
                "value": "world"
            }
            assert agent.get("/v1/secret/data/private/key").status_code == 403

        resp = client.post(f"/v1/tasks/{task['id']}/complete", headers=auth)
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "completed"

        with openbao.client(token) as agent:
            assert agent.get("/v1/secret/data/demo/hello").status_code == 403
            assert agent.get("/v1/auth/token/lookup-self").status_code == 403

        with broker.db.read() as conn:
            names = [e["name"] for e in repo.audit_events(conn, limit=1000)]
        for expected in (
            "broker.session.start",
            "broker.task.request",
            "broker.task.decision",
            "broker.credential.issue",
            "broker.credential.revoke",
            "broker.task.complete",
        ):
            assert expected in names

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(otlp.spans) < len(names):
            time.sleep(0.05)
        wire = {s.name for s in otlp.spans}
        assert set(names) <= wire
        task_spans = [s for s in otlp.spans if s.attributes.get("broker.task.id") == task["id"]]
        assert {s.trace_id for s in task_spans} == {task["trace_id"]}
        for span in otlp.spans:
            for value in span.attributes.values():
                assert token not in str(value) and session not in str(value)
