"""The auditors' tools over the real API: events with filters and pages, a task's trace (also as a
terminal tree), verification and status; only for the auditor role, and reading is audited."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from broker.cli.main import app
from broker.domain.audit import EventName
from broker.settings import AuditSettings, OpenBaoAuditSettings, VaultSettings
from broker.store import repo
from tests.audit.conftest import exchange, wait_for
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao, live_broker

pytestmark = pytest.mark.integration


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def request_task(client: httpx.Client, session: str, scope: str, **params: Any) -> dict[str, Any]:
    resp = client.post(
        "/v1/tasks",
        headers=bearer(session),
        json={"scope": scope, "purpose": f"work on {scope}", "params": params},
    )
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


def test_auditor_filters_and_pages_through_events(
    issuer: TestIssuer, auditors: TestIssuer, audit_settings: Any
) -> None:
    """Filters by task, principal, scope, name and time each narrow the result; pages chain by
    cursor without overlap or gap, in both orders."""
    settings = audit_settings()
    with (
        live_broker(settings) as (server, _broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        alice = exchange(client, issuer.token("agent-a"))
        bob = exchange(client, issuer.token("agent-b"))
        t1 = request_task(client, alice, "vault-kv-read")
        t2 = request_task(client, bob, "aws-s3-read", bucket="example-data-team", prefix="reports")
        auditor = exchange(client, auditors.token("carol-auditor"))

        def get(**params: Any) -> dict[str, Any]:
            resp = client.get("/v1/audit/events", headers=bearer(auditor), params=params)
            assert resp.status_code == 200, resp.text
            return dict(resp.json())

        by_task = get(task=t1["id"])["events"]
        assert by_task and {e["task_id"] for e in by_task} == {t1["id"]}
        assert {e["name"] for e in by_task} >= {"broker.task.request", "broker.task.decision"}
        assert {e["actor_subject"] for e in get(principal="agent-b")["events"]} == {"agent-b"}
        assert {e["task_id"] for e in get(scope="aws-s3-read")["events"]} == {t2["id"]}
        requests = get(name="broker.task.request")["events"]
        assert [e["task_id"] for e in requests] == [t1["id"], t2["id"]]
        t2_time = next(e["time"] for e in requests if e["task_id"] == t2["id"])
        assert [e["task_id"] for e in get(name="broker.task.request", since=t2_time)["events"]] == [
            t2["id"]
        ]
        from datetime import UTC, datetime

        # RFC 3339 works too (a millisecond before the second request).
        iso = datetime.fromtimestamp(t2_time - 0.001, tz=UTC).isoformat().replace("+00:00", "Z")
        assert [e["task_id"] for e in get(name="broker.task.request", until=iso)["events"]] == [
            t1["id"]
        ]

        everything = get(limit=1000)["events"]
        pages, cursor = [], 0
        while True:
            page = get(limit=3, after=cursor)
            pages.extend(page["events"])
            if page["next"] is None:
                break
            cursor = page["next"]
        assert [e["seq"] for e in pages][: len(everything)] == [e["seq"] for e in everything]
        newest = get(limit=2, order="desc")
        older = get(limit=2, order="desc", before=newest["next"])
        assert newest["events"][0]["seq"] > newest["events"][1]["seq"] > older["events"][0]["seq"]
        for e in everything:
            assert len(e["hash"]) == 64 and len(e["prev_hash"]) == 64


def test_only_auditors_may_read_and_refusals_and_reads_are_audited(
    issuer: TestIssuer, auditors: TestIssuer, audit_settings: Any
) -> None:
    """An agent gets 403 auditor_role_required (audited as a refusal), no session gets 401, bad
    filters get 422; an auditor's read is itself recorded as broker.audit.access."""
    settings = audit_settings()
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        agent = exchange(client, issuer.token("agent-nosy"))
        resp = client.get("/v1/audit/events", headers=bearer(agent))
        assert resp.status_code == 403
        assert resp.json()["code"] == "auditor_role_required"
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert client.get("/v1/audit/events").status_code == 401
        for path in ("/v1/audit/verify", "/v1/audit/status", "/v1/audit/tasks/tsk_x/trace"):
            assert client.get(path, headers=bearer(agent)).status_code == 403

        auditor = exchange(client, auditors.token("carol-auditor"))
        for params in (
            {"since": "yesterday"},
            {"limit": 0},
            {"trace": "zz"},
            {"until": "2026-01-01T00:00:00"},
        ):
            resp = client.get("/v1/audit/events", headers=bearer(auditor), params=params)
            assert resp.status_code == 422, (params, resp.text)
        assert (
            client.get("/v1/audit/tasks/tsk_nope/trace", headers=bearer(auditor)).status_code == 404
        )
        assert (
            client.get(
                "/v1/audit/events", headers=bearer(auditor), params={"principal": "agent-nosy"}
            ).status_code
            == 200
        )

        with broker.db.read() as conn:
            denied = repo.audit_events(conn, name=EventName.REQUEST_DENIED, subject="agent-nosy")
            reads = repo.audit_events(conn, name=EventName.AUDIT_ACCESS, subject="carol-auditor")
        assert len(denied) == 4
        assert {e["attributes"]["broker.audit.filter.code"] for e in denied} == {
            "auditor_role_required"
        }
        assert reads and reads[-1]["attributes"]["broker.audit.filter.principal"] == "agent-nosy"


def test_trace_of_a_task_through_the_api_and_as_a_terminal_tree(
    openbao: OpenBao,
    issuer: TestIssuer,
    auditors: TestIssuer,
    audit_settings: Any,
    tmp_path: Any,
) -> None:
    """A task that was requested, issued, used against the real OpenBao and completed reads as
    one tree: who asked and why, the decision, the issuance with its uses beneath it, the
    revocation and the end; the chain verifies and the status shows the head."""
    settings = audit_settings(
        vault=VaultSettings(
            addr=openbao.addr, token=openbao.broker_token, token_role="broker-child"
        ),
        audit=AuditSettings(
            openbao=OpenBaoAuditSettings(file=openbao.audit_log, poll_interval=0.05)
        ),
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        agent = exchange(client, issuer.token("agent-tree"))
        task = request_task(client, agent, "vault-kv-read")
        cred = client.post(f"/v1/tasks/{task['id']}/credentials", headers=bearer(agent)).json()
        with openbao.client(cred["secret"]["token"]) as used:
            assert used.get("/v1/secret/data/demo/hello").status_code == 200

        def uses() -> int:
            with broker.db.read() as conn:
                return len(
                    repo.audit_events(conn, task_id=task["id"], name=EventName.CREDENTIAL_USE)
                )

        wait_for(lambda: uses() == 1, what="the use from OpenBao's file device")
        assert (
            client.post(f"/v1/tasks/{task['id']}/complete", headers=bearer(agent)).status_code
            == 200
        )

        auditor = exchange(client, auditors.token("carol-auditor"))
        body = client.get(f"/v1/audit/tasks/{task['id']}/trace", headers=bearer(auditor)).json()
        assert body["trace_id"] == task["trace_id"]
        names = [e["name"] for e in body["events"]]
        for expected in (
            "broker.task.request",
            "broker.task.decision",
            "broker.credential.issue",
            "broker.credential.use",
            "broker.credential.revoke",
            "broker.task.complete",
        ):
            assert expected in names

        verified = client.get("/v1/audit/verify", headers=bearer(auditor)).json()
        assert verified["ok"] is True and verified["events"] > 5
        status = client.get("/v1/audit/status", headers=bearer(auditor)).json()
        assert status["head"]["seq"] >= verified["last_seq"]
        assert status["uses"]["recorded"] >= 1
        assert status["openbao"]["file"]["bytes_read"] > 0

        result = CliRunner().invoke(
            app,
            ["audit", "trace", task["id"], "--url", server.url, "--token", auditor],
            env={"BROKER_CONFIG": ""},
        )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"task {task['id']}  scope vault-kv-read")
    text = result.output
    assert "REQUEST  agent-tree" in text and "purpose work on vault-kv-read" in text
    assert "DECISION approved" in text
    assert "ISSUE" in text and "via vault: success" in text
    assert "USE      openbao read secret/data/demo/hello: success, from 127.0.0.1" in text
    assert "REVOKE" in text and "END" in text
    use_line = next(line for line in lines if "USE " in line)
    issue_line = next(line for line in lines if "ISSUE" in line)
    # The use hangs beneath the issuance: deeper indentation, later in the listing.
    assert lines.index(use_line) > lines.index(issue_line)
    assert len(use_line) - len(use_line.lstrip("│ ├└─")) > len(issue_line) - len(
        issue_line.lstrip("│ ├└─")
    )
    assert cred["secret"]["token"] not in text
