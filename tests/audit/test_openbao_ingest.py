"""Uses of broker-minted tokens, from OpenBao's own audit stream, joined to the task's trace.

A dedicated OpenBao runs with both audit devices: a socket device streaming to the broker's
ingest listener and a file device. Tokens are minted through the broker's API and then used
directly against OpenBao, as an agent would.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.audit.openbao_ingest import parse_entry, parse_time
from broker.devstack.processes import free_port
from broker.domain.audit import EventName
from broker.settings import (
    AuditSettings,
    OpenBaoAuditSettings,
    OtlpSettings,
    VaultSettings,
)
from broker.store import Database, repo
from tests.audit.conftest import exchange, wait_for
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao, live_broker, start_test_openbao

pytestmark = pytest.mark.integration


class Placeholder:
    """Accepts (and discards) OpenBao's socket audit stream until the broker listens.

    OpenBao refuses to start with a socket device nobody listens on; once started it reconnects
    by itself, so the placeholder only has to exist while OpenBao starts.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    @staticmethod
    def _drain(conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            return

    def close(self) -> None:
        # shutdown() wakes the thread blocked in accept(); close() alone would not free the port.
        for sock in [self.sock, *self.conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def bao_stream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OpenBao, int]]:
    """An OpenBao whose socket audit device streams to 127.0.0.1:PORT (and a file device)."""
    port = free_port()
    placeholder = Placeholder(port)
    bao = start_test_openbao(
        tmp_path_factory.mktemp("openbao-stream"), socket_address=f"127.0.0.1:{port}"
    )
    placeholder.close()
    yield bao, port
    bao.process.stop()


def settings_for(make_settings: Any, bao: OpenBao, port: int, **kw: Any) -> Any:
    poll = kw.pop("poll_interval", 3600.0)  # the tail runs when a test says so
    return make_settings(
        vault=VaultSettings(addr=bao.addr, token=bao.broker_token, token_role="broker-child"),
        audit=AuditSettings(
            openbao=OpenBaoAuditSettings(
                listen=f"127.0.0.1:{port}", file=bao.audit_log, poll_interval=poll
            )
        ),
        **kw,
    )


def mint(client: httpx.Client, issuer: TestIssuer, sub: str) -> tuple[dict[str, Any], str, str]:
    """A task and its real OpenBao token, through the broker's API; returns (task, token, session)."""
    session = exchange(client, issuer.token(sub))
    auth = {"Authorization": f"Bearer {session}"}
    task = client.post(
        "/v1/tasks",
        headers={**auth, "X-Conversation-Id": f"conv-{sub}"},
        json={"scope": "vault-kv-read", "purpose": "read the demo secret"},
    ).json()
    resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
    assert resp.status_code == 201, resp.text
    body = resp.json()
    task["credential_id"] = body["credential_id"]
    return task, body["secret"]["token"], session


def uses(db: Database, credential_id: str) -> list[dict[str, Any]]:
    with db.read() as conn:
        return repo.audit_events(
            conn, credential_id=credential_id, name=EventName.CREDENTIAL_USE, limit=10_000
        )


def agent_calls(bao: OpenBao, token: str) -> list[int]:
    """What an agent does with its token: a permitted read, a forbidden read, a lookup."""
    with bao.client(token) as agent:
        return [
            agent.get("/v1/secret/data/demo/hello").status_code,
            agent.get("/v1/secret/data/private/key").status_code,
            agent.get("/v1/auth/token/lookup-self").status_code,
        ]


def test_token_uses_from_openbao_become_use_spans_in_the_task_trace(
    bao_stream: tuple[OpenBao, int],
    issuer: TestIssuer,
    otlp: OtlpReceiver,
    make_settings: Any,
) -> None:
    """Each request made with a broker-minted token, as OpenBao's socket device reports it,
    becomes a broker.credential.use span: in the task's trace, a child of the issuance span, with
    path, operation, outcome and remote address, and never the token."""
    bao, port = bao_stream
    settings = settings_for(
        make_settings, bao, port, otlp=OtlpSettings(endpoint=otlp.endpoint, interval=0.05)
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        task, token, session = mint(client, issuer, "agent-use")
        assert agent_calls(bao, token) == [200, 403, 200]
        cred = task["credential_id"]
        wait_for(lambda: len(uses(broker.db, cred)) >= 3, what="use events from the socket")
        events = uses(broker.db, cred)
        with broker.db.read() as conn:
            issue = next(
                e
                for e in repo.audit_events(conn, credential_id=cred)
                if e["name"] == EventName.CREDENTIAL_ISSUE
            )
        wait_for(
            lambda: len([s for s in otlp.spans if s.name == "broker.credential.use"]) >= 3,
            what="use spans on the wire",
        )
        resp = client.post(
            f"/v1/tasks/{task['id']}/complete", headers={"Authorization": f"Bearer {session}"}
        )
        assert resp.status_code == 200

    by_path = {e["attributes"]["vault.request.path"]: e for e in events}
    assert set(by_path) == {
        "secret/data/demo/hello",
        "secret/data/private/key",
        "auth/token/lookup-self",
    }
    assert len(events) == 3
    ok, denied = by_path["secret/data/demo/hello"], by_path["secret/data/private/key"]
    assert ok["outcome"] == "success" and denied["outcome"] == "denied"
    assert "permission denied" in denied["attributes"]["broker.use.error"]
    for event in events:
        a = event["attributes"]
        assert event["trace_id"] == task["trace_id"]
        assert event["parent_span_id"] == issue["span_id"]
        assert event["task_id"] == task["id"]
        assert a["broker.use.source"] == "openbao"
        assert a["broker.use.matched_by"] == "accessor"
        assert a["vault.request.operation"] == "read"
        assert a["client.address"] == "127.0.0.1"
        assert a["gen_ai.conversation.id"] == "conv-agent-use"
        assert token not in json.dumps(event)
    wire = [s for s in otlp.spans if s.name == "broker.credential.use"]
    assert {s.trace_id for s in wire} == {task["trace_id"]}
    assert {s.parent_span_id for s in wire} == {issue["span_id"]}
    assert all(token not in json.dumps(s.attributes) for s in wire)


def test_listener_down_the_file_device_catches_up_without_gaps_or_duplicates(
    bao_stream: tuple[OpenBao, int], issuer: TestIssuer, make_settings: Any
) -> None:
    """OpenBao drops socket entries while the broker's listener is down; the file tail records
    those, and the ones the socket already delivered are not recorded twice, whatever the order."""
    bao, port = bao_stream
    settings = settings_for(make_settings, bao, port)
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        task, token, _ = mint(client, issuer, "agent-outage")
        cred = task["credential_id"]
        ingest = broker.audit.openbao
        agent_calls(bao, token)
        wait_for(lambda: len(uses(broker.db, cred)) >= 3, what="socket delivery")

        ingest.listener.stop()  # the broker's listener goes away
        with bao.client(token) as agent:
            for _ in range(4):
                assert agent.get("/v1/secret/data/demo/hello").status_code == 200
        assert len(uses(broker.db, cred)) == 3  # the socket lost those four

        ingest.poll_once()  # the file device has everything: catch up
        events = uses(broker.db, cred)
        assert len(events) == 7
        assert len({e["attributes"]["vault.request.id"] for e in events}) == 7
        ingest.poll_once()  # and reading again changes nothing
        assert len(uses(broker.db, cred)) == 7
        assert broker.uses.counters.duplicate >= 3


def test_a_restarted_broker_resumes_the_file_where_it_stopped(
    bao_stream: tuple[OpenBao, int], issuer: TestIssuer, make_settings: Any
) -> None:
    """With no socket at all, uses made while the broker was stopped are ingested from the file
    when it starts again, from its stored position, once each."""
    bao, _port = bao_stream
    settings = make_settings(
        vault=VaultSettings(addr=bao.addr, token=bao.broker_token, token_role="broker-child"),
        audit=AuditSettings(openbao=OpenBaoAuditSettings(file=bao.audit_log, poll_interval=0.05)),
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        task, token, _ = mint(client, issuer, "agent-restart")
        cred = task["credential_id"]
        agent_calls(bao, token)
        wait_for(lambda: len(uses(broker.db, cred)) == 3, what="the file tail")
    # The broker is down: the agent goes on using its token.
    with bao.client(token) as agent:
        assert agent.get("/v1/secret/data/demo/hello").status_code == 200
        assert agent.get("/v1/secret/data/demo/hello").status_code == 200
    with live_broker(settings) as (_server, broker):
        wait_for(lambda: len(uses(broker.db, cred)) == 5, what="catch-up after restart")
        with broker.db.read() as conn:
            cursor = repo.ingest_cursor(conn, f"openbao-file:{Path(bao.audit_log).resolve()}")
        assert cursor is not None and cursor["offset"] > 0
        assert len(uses(broker.db, cred)) == 5


def test_a_token_claiming_to_be_the_brokers_but_unknown_is_reported(
    bao_stream: tuple[OpenBao, int], make_settings: Any
) -> None:
    """A token carrying broker metadata that matches no credential (minted behind the broker's
    back, or its record lost) is reported as broker.use.unmatched, never dropped; tokens of other
    clients are ignored."""
    bao, port = bao_stream
    settings = settings_for(make_settings, bao, port)
    with bao.client() as root:
        forged = root.post(
            "/v1/auth/token/create",
            json={
                "policies": ["kv-read"],
                "ttl": "300s",
                "meta": {"broker_task": "tsk_ghost", "broker_credential": "crd_ghost"},
            },
        ).json()["auth"]
        other = root.post("/v1/auth/token/create", json={"policies": ["kv-read"], "ttl": "300s"})
        other_token = other.json()["auth"]["client_token"]
    with live_broker(settings) as (_server, broker):
        with bao.client(forged["client_token"]) as ghost:
            assert ghost.get("/v1/secret/data/demo/hello").status_code == 200
        with bao.client(other_token) as stranger:
            assert stranger.get("/v1/secret/data/demo/hello").status_code == 200

        def unmatched() -> list[dict[str, Any]]:
            with broker.db.read() as conn:
                return [
                    e
                    for e in repo.audit_events(conn, name=EventName.USE_UNMATCHED, limit=10_000)
                    if e["attributes"].get("broker.use.claimed_credential") == "crd_ghost"
                ]

        wait_for(lambda: len(unmatched()) == 1, what="the unmatched report")
        event = unmatched()[0]
        assert event["attributes"]["vault.request.path"] == "secret/data/demo/hello"
        assert f"accessor={forged['accessor']}" in event["attributes"]["broker.use.lookup"]
        assert forged["client_token"] not in json.dumps(event)
        assert broker.uses.counters.ignored >= 1


def test_only_known_fields_of_an_audit_entry_are_kept() -> None:
    """The parser reads the path, operation, mount, outcome, remote address and ids, and nothing
    from request or response bodies, even if a device were configured to log them raw."""
    entry = {
        "time": "2026-11-26T11:53:07.363518702Z",
        "type": "response",
        "auth": {
            "accessor": "acc123",
            "display_name": "token-broker-vault-kv-read",
            "policies": ["default", "kv-read"],
            "metadata": {"broker_credential": "crd_1", "broker_task": "tsk_1"},
            "token_type": "service",
        },
        "request": {
            "id": "req-1",
            "operation": "update",
            "mount_type": "kv",
            "client_token": "s.rawtokenvalue000000000000",
            "client_token_accessor": "acc123",
            "path": "secret/data/demo/new",
            "data": {"data": {"password": "hunter2-canary"}},
            "remote_address": "10.0.0.7",
            "remote_port": 5555,
        },
        "response": {"data": {"secret": "canary-response"}},
    }
    use = parse_entry(entry)
    assert use is not None
    text = json.dumps([use.attributes, use.error, use.target, use.operation])
    for secret in ("hunter2-canary", "canary-response", "s.rawtokenvalue"):
        assert secret not in text
    assert use.outcome == "success" and use.client_address == "10.0.0.7"
    assert use.claimed_credential == "crd_1" and use.ours
    assert use.time == pytest.approx(parse_time("2026-11-26T11:53:07.363518Z"))
    assert parse_entry({**entry, "type": "request"}) is None
    lease = parse_entry(
        {
            "type": "response",
            "request": {"id": "r2", "path": "sys/leases/revoke/database/creds/ro/abc"},
            "auth": {},
        }
    )
    assert lease is not None
    assert [(m.kind, m.value) for m in lease.matches] == [("lease_id", "database/creds/ro/abc")]


@pytest.mark.postgres
def test_database_leases_the_brokers_own_lease_tokens_are_not_uses_or_unmatched(
    openbao_db: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """A database credential is read by the broker's internal lease-owner token (metadata
    ``broker_role = lease_owner``): that request is the issuance, not a use, and is never
    reported as unmatched. Operations on the lease (the broker's own renewal at issuance) are
    joined to the credential as lease operations."""
    bao = openbao_db
    settings = make_settings(
        vault=bao.vault_settings(),
        audit=AuditSettings(openbao=OpenBaoAuditSettings(file=bao.audit_log, poll_interval=3600)),
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        session = exchange(client, issuer.token("agent-db", groups=["developers"], ttl=3600))
        auth = {"Authorization": f"Bearer {session}"}
        task = client.post(
            "/v1/tasks", headers=auth, json={"scope": "postgres-readonly", "purpose": "report"}
        ).json()
        resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
        assert resp.status_code == 201, resp.text
        cred = resp.json()
        assert client.post(f"/v1/tasks/{task['id']}/complete", headers=auth).status_code == 200
        broker.audit.openbao.poll_once()
        with broker.db.read() as conn:
            mine = repo.audit_events(conn, credential_id=cred["credential_id"], limit=1000)
            unmatched = [
                e
                for e in repo.audit_events(conn, name=EventName.USE_UNMATCHED, limit=10_000)
                if e["attributes"].get("broker.use.claimed_credential") == cred["credential_id"]
            ]
    assert unmatched == []
    uses = [e for e in mine if e["name"] == EventName.CREDENTIAL_USE]
    paths = [u["attributes"]["vault.request.path"] for u in uses]
    assert not any("creds/" in p for p in paths), paths
    # The broker shortening the lease at issuance, as OpenBao itself recorded it.
    assert "sys/leases/renew" in paths
    for use in uses:
        assert use["attributes"]["broker.use.kind"] == "lease_operation"
        assert use["attributes"]["broker.use.matched_by"] == "lease_id"
    assert cred["secret"]["password"] not in json.dumps(mine)
