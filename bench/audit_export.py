"""Audit throughput on PostgreSQL: appending events to the hash chain, and exporting the outbox
to an OTLP/HTTP collector with one exporter and with two (as two replicas share the work)."""

from __future__ import annotations

import threading
import time
from typing import Any

from broker.audit.exporter import HttpSender, OutboxExporter
from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.services.common import record
from broker.settings import OtlpSettings
from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.support.services import pg_database


def _event(i: int) -> AuditEvent:
    return AuditEvent(
        name=EventName.CREDENTIAL_ISSUE,
        outcome=Outcome.SUCCESS,
        time=time.time(),
        trace_id=new_trace_id(),
        attributes={
            "broker.credential.id": f"crd_bench{i:08d}",
            "broker.backend": "vault",
            "broker.scope": "vault-kv-read",
            "broker.principal.sub": f"agent-{i % 50}",
            "broker.credential.ttl": 600,
        },
    )


def _drain(dbs: list[Database], endpoint: str, settings: OtlpSettings) -> float:
    exporters = [OutboxExporter(db, HttpSender(endpoint), settings, time.time) for db in dbs]
    start = time.perf_counter()
    threads = [threading.Thread(target=e.drain) for e in exporters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def run(sink_endpoint: str, *, events: int = 5000) -> dict[str, Any]:
    """Append ``events`` events (one transaction each, as the services do), then export them."""
    settings = OtlpSettings(endpoint=sink_endpoint)
    with pg_database() as url:
        upgrade(url)
        db = Database(url)
        other = Database(url)
        try:
            start = time.perf_counter()
            for i in range(events):
                with db.write() as conn:
                    record(conn, _event(i))
            append = time.perf_counter() - start

            one = _drain([db], sink_endpoint, settings)
            with db.write() as conn:
                from sqlalchemy import text  # bench code may reach into the store

                conn.execute(text("UPDATE audit_events SET exported = false"))
            two = _drain([db, other], sink_endpoint, settings)
            with db.read() as conn:
                left = repo.count_unexported(conn)
        finally:
            db.dispose()
            other.dispose()
    return {
        "events": events,
        "append_per_second": round(events / append, 1),
        "export_per_second_one_exporter": round(events / one, 1),
        "export_per_second_two_exporters": round(events / two, 1),
        "batch_size": settings.batch_size,
        "compression": settings.compression,
        "left_unexported": left,
    }
