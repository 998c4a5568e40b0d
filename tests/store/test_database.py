"""Store behaviour that matters for correctness: the audit chain, compare-and-set, concurrency."""

from __future__ import annotations

import threading

from broker.domain.audit import AuditEvent, chain_hash, new_trace_id
from broker.store import Database, repo
from broker.store.migrate import upgrade


def test_audit_chain_links_each_event_to_the_previous(sqlite_url: str) -> None:
    """Each stored event's hash covers its predecessor's hash and its own body."""
    upgrade(sqlite_url)
    db = Database(sqlite_url)
    for i in range(3):
        with db.write() as conn:
            repo.append_audit(
                conn,
                AuditEvent(
                    name="test",
                    outcome="success",
                    time=1000.0 + i,
                    trace_id=new_trace_id(),
                    attributes={"i": i},
                ),
            )
    with db.read() as conn:
        rows = repo.audit_events(conn)
    prev = "0" * 64
    for row in rows:
        body = {
            k: row[k]
            for k in (
                "id",
                "name",
                "outcome",
                "time",
                "end_time",
                "session_id",
                "task_id",
                "credential_id",
                "actor_issuer",
                "actor_subject",
                "trace_id",
                "span_id",
                "parent_span_id",
                "links",
                "attributes",
            )
        }
        assert row["prev_hash"] == prev
        assert row["hash"] == chain_hash(prev, body)
        prev = row["hash"]
    db.dispose()


def test_concurrent_sqlite_writers_do_not_fail(sqlite_url: str) -> None:
    """32 threads appending at once all succeed (no 'database is locked'), and the chain stays whole."""
    upgrade(sqlite_url)
    db = Database(sqlite_url)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                with db.write() as conn:
                    repo.append_audit(
                        conn,
                        AuditEvent(name="t", outcome="success", time=1.0, trace_id=new_trace_id()),
                    )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.read() as conn:
        rows = repo.audit_events(conn, limit=1000)
    assert len(rows) == 320
    assert all(b["prev_hash"] == a["hash"] for a, b in zip(rows, rows[1:], strict=False))
    db.dispose()
