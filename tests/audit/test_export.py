"""Audit spans as they cross the wire (OTLP protobuf over HTTP and gRPC): one trace per task, the
agent's trace context honoured, nothing lost in a collector outage and nothing sent twice."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from broker.audit.exporter import GrpcSender, HttpSender, OutboxExporter, SendResult
from broker.settings import OtlpSettings, VaultSettings
from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.audit.conftest import append_events, exchange, wait_for
from tests.audit.grpc_receiver import GrpcReceiver
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver, WireSpan
from tests.support.services import OpenBao, live_broker

pytestmark = pytest.mark.integration

AGENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
AGENT_SPAN = "00f067aa0ba902b7"


def vault(bao: OpenBao) -> VaultSettings:
    return VaultSettings(addr=bao.addr, token=bao.broker_token, token_role="broker-child")


def fast(endpoint: str, **kw: Any) -> OtlpSettings:
    return OtlpSettings(endpoint=endpoint, interval=0.05, max_backoff=0.3, timeout=3, **kw)


def run_task(client: httpx.Client, session: str, *, mint: bool = True) -> dict[str, Any]:
    """Request (with the agent's traceparent and conversation id), mint, complete."""
    auth = {"Authorization": f"Bearer {session}"}
    resp = client.post(
        "/v1/tasks",
        headers={
            **auth,
            "traceparent": f"00-{AGENT_TRACE}-{AGENT_SPAN}-01",
            "X-Conversation-Id": "conv-42",
        },
        json={"scope": "vault-kv-read", "purpose": "read the demo secret"},
    )
    assert resp.status_code == 201, resp.text
    task: dict[str, Any] = resp.json()
    if mint:
        resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
        assert resp.status_code == 201, resp.text
    resp = client.post(f"/v1/tasks/{task['id']}/complete", headers=auth)
    assert resp.status_code == 200, resp.text
    return task


def stored(db: Database) -> list[dict[str, Any]]:
    with db.read() as conn:
        return repo.audit_events(conn, limit=100_000)


def stored_at(url: str) -> list[dict[str, Any]]:
    """Every event, read after the broker stopped (its final checkpoint included)."""
    db = Database(url)
    try:
        return stored(db)
    finally:
        db.dispose()


def test_task_spans_on_the_wire_form_one_trace_joined_to_the_agent(
    openbao: OpenBao, issuer: TestIssuer, otlp: OtlpReceiver, make_settings: Any
) -> None:
    """Decoded from OTLP protobuf: request, decision, issuance, revocation and end of a task share
    the agent's trace id; the request is a child of the agent's span and links to the session
    span; the rest are children of the request; every span carries the conversation id."""
    settings = make_settings(vault=vault(openbao), otlp=fast(otlp.endpoint))
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        session = exchange(client, issuer.token("agent-1"))
        task = run_task(client, session)
        events = stored(broker.db)
        wait_for(lambda: len(otlp.spans) >= len(events), what="every event on the wire")

    spans = {s.name: s for s in otlp.spans if s.attributes.get("broker.task.id") == task["id"]}
    assert set(spans) >= {
        "broker.task.request",
        "broker.task.decision",
        "broker.credential.issue",
        "broker.credential.revoke",
        "broker.task.complete",
    }
    request = spans["broker.task.request"]
    assert {s.trace_id for s in spans.values()} == {AGENT_TRACE}
    assert request.parent_span_id == AGENT_SPAN
    session_span = next(s for s in otlp.spans if s.name == "broker.session.start")
    assert (session_span.trace_id, session_span.span_id) in request.links
    for name, span in spans.items():
        if name != "broker.task.request":
            assert span.parent_span_id == request.span_id, name
        assert span.attributes["gen_ai.conversation.id"] == "conv-42"
        assert span.resource["service.name"] == "broker"
        assert len(span.attributes["broker.event.hash"]) == 64
    issue = spans["broker.credential.issue"]
    assert issue.attributes["broker.backend"] == "vault"
    assert issue.attributes["broker.credential.id"].startswith("crd_")
    assert request.attributes["broker.purpose"] == "read the demo secret"
    assert request.status_code == 1  # STATUS_CODE_OK
    # The ids on the wire are the stored ones (a re-sent span is the same span); the final
    # checkpoint taken at shutdown was exported too.
    by_id = {e["span_id"]: e for e in stored_at(settings.effective_database_url)}
    assert len(by_id) > len(events)
    assert all(by_id[s.span_id]["trace_id"] == s.trace_id for s in otlp.spans)
    assert "broker.audit.checkpoint" in {s.name for s in otlp.spans}


def test_collector_down_during_issuance_then_up_every_event_arrives_once(
    openbao: OpenBao, issuer: TestIssuer, otlp: OtlpReceiver, make_settings: Any
) -> None:
    """With the collector answering 503, sessions, tasks and real OpenBao issuances go on (the
    store is the record); when it comes back every event arrives, and none twice."""
    otlp.fail = True
    settings = make_settings(vault=vault(openbao), otlp=fast(otlp.endpoint, batch_size=7))
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        for i in range(4):
            run_task(client, exchange(client, issuer.token(f"agent-{i}")))
        exporter = broker.audit.exporter
        wait_for(
            lambda: exporter.status.consecutive_failures >= 3, what="the exporter to keep retrying"
        )
        assert otlp.spans == []
        assert "503" in (exporter.status.last_error or "")
        with broker.db.read() as conn:
            assert repo.count_unexported(conn) == len(stored(broker.db))

        otlp.fail = False

        def backlog() -> int:
            with broker.db.read() as conn:
                return repo.count_unexported(conn)

        wait_for(lambda: backlog() == 0, what="the backlog to drain")
    events = stored_at(settings.effective_database_url)
    sent = [s.span_id for s in otlp.spans]
    assert len(sent) == len(set(sent)), "a span was sent twice"
    assert set(sent) == {e["span_id"] for e in events}
    assert sum(1 for e in events if e["name"] == "broker.credential.issue") == 4
    assert max(otlp.batch_sizes) <= 7  # memory is bounded by one batch


def test_grpc_export_with_headers_survives_an_outage(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """OTLP/gRPC: configured headers arrive as metadata; UNAVAILABLE is retried until accepted,
    and every event arrives once."""
    receiver = GrpcReceiver(fail=True).start()
    try:
        settings = make_settings(
            otlp=fast(
                receiver.endpoint,
                protocol="grpc",
                headers={"x-tenant": "blue", "authorization": "Bearer collector-key"},
            )
        )
        with (
            live_broker(settings) as (server, broker),
            httpx.Client(base_url=server.url, timeout=10) as client,
        ):
            session = exchange(client, issuer.token("agent-1"))
            run_task(client, session, mint=False)
            wait_for(lambda: receiver.requests >= 2, what="gRPC retries")
            assert receiver.spans == []
            receiver.fail = False
            wait_for(lambda: len(receiver.spans) >= len(stored(broker.db)), what="gRPC export")
        events = stored_at(settings.effective_database_url)
        assert sorted(s.span_id for s in receiver.spans) == sorted(e["span_id"] for e in events)
        assert receiver.metadata[-1]["x-tenant"] == "blue"
        assert receiver.metadata[-1]["authorization"] == "Bearer collector-key"
        names = {s.name for s in receiver.spans}
        assert {"broker.session.start", "broker.task.request", "broker.task.complete"} <= names
    finally:
        receiver.stop()


def test_http_sender_sends_headers_gzip_and_makes_exactly_one_attempt(
    store: Database, otlp: OtlpReceiver
) -> None:
    """One call is one POST (no hidden retries that could duplicate a slow success); headers and
    gzip encoding are on it; batches never exceed batch_size."""
    append_events(store, 25)
    sender = HttpSender(otlp.endpoint, headers={"x-team": "audit"}, timeout=3)
    exporter = OutboxExporter(
        store, sender, OtlpSettings(endpoint=otlp.endpoint, batch_size=10), time.time
    )
    otlp.fail = True
    assert exporter.export_once() == 0
    assert otlp.requests == 1
    otlp.fail = False
    assert exporter.drain() == 25
    assert otlp.batch_sizes == [10, 10, 5]
    assert otlp.headers[-1]["x-team"] == "audit"
    assert otlp.headers[-1]["content-encoding"] == "gzip"
    assert otlp.headers[-1]["content-type"] == "application/x-protobuf"
    sender.close()


def test_backoff_grows_caps_and_honours_retry_after(store: Database) -> None:
    """After failures the wait grows exponentially with jitter, never beyond max_backoff, and
    never shorter than the collector's Retry-After (within the cap)."""

    class Down:
        def send(self, request: Any) -> SendResult:
            return SendResult(False, "HTTP 429 (retryable)", retry_after=2.0)

        def close(self) -> None:
            pass

    append_events(store, 1)
    settings = OtlpSettings(endpoint="http://unused", interval=0.1, max_backoff=5.0)
    exporter = OutboxExporter(store, Down(), settings, time.time)
    waits = []
    for _ in range(8):
        assert exporter.export_once() == 0
        waits.append(exporter.backoff())
    assert all(2.0 <= w <= 5.0 for w in waits)
    exporter._last = SendResult(False, "x")
    exporter.status.consecutive_failures = 1
    assert 0.1 <= exporter.backoff() <= 0.2
    exporter.status.consecutive_failures = 50
    assert exporter.backoff() <= 5.0


@pytest.fixture
def pg_store(pg_url: str) -> str:
    upgrade(pg_url)
    return pg_url


@pytest.mark.postgres
def test_two_replicas_on_postgresql_export_every_event_exactly_once(
    pg_store: str, otlp: OtlpReceiver
) -> None:
    """Two exporters on one PostgreSQL share the outbox without a leader (SKIP LOCKED): all
    events arrive, none twice."""
    writer = Database(pg_store)
    append_events(writer, 300)
    replicas = [Database(pg_store), Database(pg_store)]
    settings = OtlpSettings(endpoint=otlp.endpoint, batch_size=20)
    exporters = [
        OutboxExporter(db, HttpSender(otlp.endpoint), settings, time.time) for db in replicas
    ]
    threads = [threading.Thread(target=e.drain) for e in exporters]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e in exporters:
        e.drain()
    ids = [s.span_id for s in otlp.spans]
    assert len(ids) == 300 == len(set(ids))
    assert all(e.status.exported_total > 0 for e in exporters), "both replicas took part"
    with writer.read() as conn:
        assert repo.count_unexported(conn) == 0
    for db in [writer, *replicas]:
        db.dispose()


def test_an_audit_event_that_cannot_be_written_fails_the_operation_closed(
    openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """When the store refuses the issuance's audit event, the caller gets 503 audit_unavailable,
    no credential is handed out, and the token minted at OpenBao does not stay alive."""
    settings = make_settings(vault=vault(openbao))
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        session = exchange(client, issuer.token("agent-fail-closed"))
        auth = {"Authorization": f"Bearer {session}"}
        task = client.post(
            "/v1/tasks", headers=auth, json={"scope": "vault-kv-read", "purpose": "x"}
        ).json()
        with broker.db.write() as conn:
            conn.execute(
                text(
                    "CREATE TRIGGER no_issue_audit BEFORE INSERT ON audit_events "
                    "WHEN NEW.name = 'broker.credential.issue' "
                    "BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
                )
            )
        resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
        assert resp.status_code == 503
        assert resp.json()["code"] == "audit_unavailable"
        assert "secret" not in resp.json() and "token" not in resp.text.lower().replace("audit", "")
        with broker.db.read() as conn:
            creds = repo.credentials_for(conn, task["id"])
            assert all(c.state.value != "active" for c in creds)
            assert repo.get_task(conn, task["id"]).state.value != "active"  # type: ignore[union-attr]
    with openbao.client() as root:
        accessors = root.request("LIST", "/v1/auth/token/accessors").json()["data"]["keys"]
        live = []
        for accessor in accessors:
            meta = root.post("/v1/auth/token/lookup-accessor", json={"accessor": accessor})
            if (
                meta.status_code == 200
                and (meta.json()["data"].get("meta") or {}).get("broker_task") == task["id"]
            ):
                live.append(accessor)
    assert live == [], "a token minted for the failed issuance is still alive"


def _names(spans: list[WireSpan]) -> list[str]:
    return [s.name for s in spans]


def test_grpc_sender_one_attempt_on_unavailable() -> None:
    """A gRPC send against a collector that is down fails once, quickly, without retrying."""
    receiver = GrpcReceiver(fail=True).start()
    try:
        sender = GrpcSender(receiver.endpoint, timeout=3)
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        result = sender.send(ExportTraceServiceRequest())
        assert not result.ok and "UNAVAILABLE" in result.detail
        assert receiver.requests == 1
        sender.close()
    finally:
        receiver.stop()
