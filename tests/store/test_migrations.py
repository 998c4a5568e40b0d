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
