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


def test_a_session_keeps_both_its_groups_claim_and_its_mapped_groups(sqlite_url: str) -> None:
    """Groups mapped from another claim are stored beside the token's own ``groups`` claim, not over it."""
    from broker.domain.principal import Principal
    from broker.domain.records import Session

    upgrade(sqlite_url)
    db = Database(sqlite_url)
    principal = Principal(
        issuer="https://idp",
        subject="s",
        groups=("mapped",),
        claims={"groups": ["from-token"], "team": "x"},
    )
    session = Session(
        id="ses_1",
        principal=principal,
        created_at=1.0,
        expires_at=2.0,
        ended_at=None,
        trace_id="a" * 32,
        span_id="b" * 16,
    )
    with db.write() as conn:
        repo.insert_session(conn, session, "h" * 64)
    with db.read() as conn:
        loaded = repo.get_session(conn, "ses_1")
    assert loaded is not None
    assert loaded.principal.groups == ("mapped",)
    assert loaded.principal.claims == {"groups": ["from-token"], "team": "x"}
    db.dispose()
