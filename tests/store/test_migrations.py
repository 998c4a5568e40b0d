"""Migrations run forwards and backwards on SQLite and on the machine's PostgreSQL."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from broker.store import Database
from broker.store.migrate import current_tables, downgrade, upgrade
from broker.store.schema import metadata

EXPECTED = set(metadata.tables)


def _check_roundtrip(url: str) -> None:
    upgrade(url)
    assert current_tables(url) >= EXPECTED
    db = Database(url)
    try:
        with db.read() as conn:
            head = conn.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        assert head.seq == 0 and head.hash == "0" * 64
    finally:
        db.dispose()
    downgrade(url, "base")
    assert not (EXPECTED & current_tables(url))
    upgrade(url)
    assert current_tables(url) >= EXPECTED


def test_sqlite_migrations_round_trip(sqlite_url: str) -> None:
    """Upgrade, downgrade to base and upgrade again on SQLite; WAL mode is on."""
    _check_roundtrip(sqlite_url)
    db = Database(sqlite_url)
    try:
        with db.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    finally:
        db.dispose()


@pytest.mark.postgres
def test_postgres_migrations_round_trip(pg_url: str) -> None:
    """The same on PostgreSQL."""
    _check_roundtrip(pg_url)


def _check_session_kinds_survive_the_upgrade(url: str) -> None:
    """Sessions live when 0006_ownership runs keep working where they were opened: one whose
    start event says the console opened it becomes a console session, the others API sessions;
    tasks default to being their session's own."""
    import json
    import time

    upgrade(url, "0004_minting_lifecycle")
    db = Database(url)
    now = time.time()
    try:
        with db.write() as conn:
            for sid, via in (("ses_console", "console"), ("ses_api", None), ("ses_old", "console")):
                conn.execute(
                    text(
                        "INSERT INTO sessions (id, token_hash, issuer, subject, claims, roles, "
                        "created_at, expires_at, ended_at, trace_id, span_id) VALUES (:id, :h, "
                        "'https://idp', 'ann', '{}', '[]', :now, :exp, :ended, :t, :s)"
                    ),
                    {
                        "id": sid,
                        "h": sid.ljust(64, "0"),
                        "now": now,
                        "exp": now + 600,
                        "ended": now if sid == "ses_old" else None,
                        "t": "0" * 32,
                        "s": "0" * 16,
                    },
                )
                attributes = {"broker.session.id": sid}
                if via:
                    attributes["broker.session.via"] = via
                conn.execute(
                    text(
                        "INSERT INTO audit_events (id, name, outcome, time, end_time, session_id, "
                        "trace_id, span_id, links, attributes, prev_hash, hash, exported) VALUES "
                        "(:id, 'broker.session.start', 'success', :now, :now, :sid, :t, :s, "
                        "'[]', :attrs, :p, :p, false)"
                    ),
                    {
                        "id": "evt_" + sid,
                        "now": now,
                        "sid": sid,
                        "t": "0" * 32,
                        "s": "0" * 16,
                        "attrs": json.dumps(attributes),
                        "p": "0" * 64,
                    },
                )
    finally:
        db.dispose()
    upgrade(url)
    db = Database(url)
    try:
        with db.read() as conn:
            kinds = dict(conn.execute(text("SELECT id, via FROM sessions")).all())
    finally:
        db.dispose()
    # An ended session can be used nowhere; it keeps the default.
    assert kinds == {"ses_console": "console", "ses_api": "api", "ses_old": "api"}


def test_sqlite_ownership_upgrade_keeps_console_sessions(sqlite_url: str) -> None:
    """0006_ownership on SQLite: live console sessions stay console sessions."""
    _check_session_kinds_survive_the_upgrade(sqlite_url)


@pytest.mark.postgres
def test_postgres_ownership_upgrade_keeps_console_sessions(pg_url: str) -> None:
    """0006_ownership on PostgreSQL (JSON attributes come back decoded): the same."""
    _check_session_kinds_survive_the_upgrade(pg_url)
