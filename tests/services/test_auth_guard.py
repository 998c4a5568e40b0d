"""Failed authentication: throttled per address and issuer, a flood audited as summaries.

The guard against a real store (SQLite, and PostgreSQL for two guards sharing one database the
way two replicas do), on a clock the test moves.
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.errors import RateLimited
from broker.services.auth_guard import AuthGuard, client_key
from broker.settings import AuthLimitSettings
from broker.store import Database, repo
from broker.store.migrate import upgrade

T0 = 60 * 30_000 + 5.0  # 5 s into a minute window


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def db_at(url: str) -> Database:
    upgrade(url)
    return Database(url)


def guard(db: Database, clock: Clock, **limits: Any) -> AuthGuard:
    values: dict[str, Any] = {"per_address": 5, "per_issuer": 1000, "window": 60}
    values.update(limits)
    return AuthGuard(AuthLimitSettings(**values), db, clock)


def event(reason: str = "invalid_signature", issuer: str | None = None) -> AuditEvent:
    return AuditEvent(
        name=EventName.AUTH_FAILURE,
        outcome=Outcome.DENIED,
        time=T0,
        trace_id=new_trace_id(),
        actor_issuer=issuer,
        attributes={"broker.auth.reason": reason},
    )


def named(db: Database, name: str) -> list[dict[str, Any]]:
    with db.read() as conn:
        return repo.audit_events(conn, name=name, limit=10_000)


def refuse(g: AuthGuard, address: str, reason: str = "invalid_signature", **kw: Any) -> bool:
    return g.refused(address, reason, kw.pop("issuer", None), event(reason), **kw)


def test_a_flood_is_one_event_and_one_summary(sqlite_url: str) -> None:
    """Forty refusals of one reason from one address: the first is audited in full at once
    (with where and which window), the rest become one summary event with their count once the
    window is over; flushing again writes nothing more."""
    db, clock = db_at(sqlite_url), Clock()
    g = guard(db, clock, per_address=1000)
    results = [refuse(g, "198.51.100.7") for _ in range(40)]
    assert results == [True] + [False] * 39
    (first,) = named(db, "broker.auth.failure")
    assert first["attributes"]["broker.auth.source"] == "198.51.100.7"
    assert first["attributes"]["broker.auth.window_start"] == 60 * 30_000
    assert g.flush() == 0  # the window is still open
    clock.now += 60
    assert g.flush() == 1
    (summary,) = named(db, "broker.auth.failure_summary")
    attrs = summary["attributes"]
    assert (attrs["broker.auth.source"], attrs["broker.auth.reason"]) == (
        "198.51.100.7",
        "invalid_signature",
    )
    assert attrs["broker.auth.count"] == 39
    assert attrs["broker.auth.window_end"] - attrs["broker.auth.window_start"] == 60
    assert g.flush() == 0


def test_each_reason_and_address_is_its_own_first(sqlite_url: str) -> None:
    """A different reason or a different address is audited in full on its first refusal."""
    db, clock = db_at(sqlite_url), Clock()
    g = guard(db, clock, per_address=1000)
    assert refuse(g, "198.51.100.7", "invalid_signature")
    assert refuse(g, "198.51.100.7", "token_expired")
    assert refuse(g, "198.51.100.8", "invalid_signature")
    assert not refuse(g, "198.51.100.8", "invalid_signature")
    clock.now += 60  # a new window: first again
    assert refuse(g, "198.51.100.8", "invalid_signature")
    assert len(named(db, "broker.auth.failure")) == 4


def test_an_address_over_its_budget_is_refused_until_the_window_ends(sqlite_url: str) -> None:
    """Five failures are allowed a minute; then admission refuses with 429 and Retry-After to
    the end of the window, counting each refusal into the summary (without writing to the
    store per refusal); other addresses are not affected; the next window admits again."""
    db, clock = db_at(sqlite_url), Clock()
    g = guard(db, clock)
    for _ in range(5):
        g.admit("198.51.100.7", lambda e: event("rate_limited"))
        refuse(g, "198.51.100.7")
    for _ in range(10):
        with pytest.raises(RateLimited) as info:
            g.admit("198.51.100.7", lambda e: event("rate_limited"))
        assert info.value.retry_after == 55
    g.admit("198.51.100.8", lambda e: event("rate_limited"))
    clock.now += 60
    g.admit("198.51.100.7", lambda e: event("rate_limited"))
    g.flush()
    clock.now += 60
    g.flush()
    summaries = {
        e["attributes"]["broker.auth.reason"]: e["attributes"]["broker.auth.count"]
        for e in named(db, "broker.auth.failure_summary")
    }
    assert summaries == {"invalid_signature": 4, "rate_limited": 9}


def test_a_flooded_issuer_blocks_the_addresses_failing_against_it_only(sqlite_url: str) -> None:
    """Past the issuer's budget, every address that fails against it is refused for the rest
    of the window; an address without a failure still gets in (a flood naming an issuer cannot
    lock its healthy agents out)."""
    db, clock = db_at(sqlite_url), Clock()
    g = guard(db, clock, per_address=1000, per_issuer=10)
    issuer = "https://idp.example"
    for i in range(10):
        refuse(g, f"203.0.113.{i}", issuer=issuer)
    with pytest.raises(RateLimited):  # its failure was the tenth
        g.admit("203.0.113.9", lambda e: event("rate_limited"))
    refuse(g, "203.0.113.10", issuer=issuer)
    with pytest.raises(RateLimited):
        g.admit("203.0.113.10", lambda e: event("rate_limited"))
    g.admit("203.0.113.3", lambda e: event("rate_limited"))  # failed before the flood began
    refuse(g, "203.0.113.3", issuer=issuer)  # ... and fails again while it lasts
    with pytest.raises(RateLimited):
        g.admit("203.0.113.3", lambda e: event("rate_limited"))
    g.admit("192.0.2.1", lambda e: event("rate_limited"))


def test_outages_are_not_the_clients_failures(sqlite_url: str) -> None:
    """A refusal that is the broker's own trouble (an unreachable issuer) is audited but does
    not count against the address."""
    db, clock = db_at(sqlite_url), Clock()
    g = guard(db, clock, per_address=2)
    for _ in range(5):
        refuse(g, "198.51.100.7", "issuer_unavailable", counts=False)
    g.admit("198.51.100.7", lambda e: event("rate_limited"))


def test_ipv6_clients_are_counted_by_their_slash_64() -> None:
    """Every address of one /64 is one client; IPv4-mapped IPv6 is the IPv4 address."""
    assert client_key("2001:db8:1:2::1", 64) == client_key("2001:db8:1:2:ffff::9", 64)
    assert client_key("2001:db8:1:2::1", 64) == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1", 64) != client_key("2001:db8:1:2::1", 64)
    assert client_key("::ffff:198.51.100.7", 64) == "198.51.100.7"
    assert client_key(None, 64) is None


@pytest.mark.postgres
def test_two_replicas_share_counts_and_write_each_summary_once(pg_url: str) -> None:
    """Two guards on one PostgreSQL database (two replicas): the budget is shared (the second
    learns of the block at the address's next failure), exactly one of them audits the
    window's first refusal, and the summary is written once counting every other refusal,
    though both flush it."""
    upgrade(pg_url)
    clock = Clock()
    dbs = [Database(pg_url), Database(pg_url)]
    a, b = (guard(db, clock, per_address=6) for db in dbs)
    firsts = [refuse(g, "198.51.100.7") for g in (a, b, a, b, a, b)]
    assert firsts.count(True) == 1
    with pytest.raises(RateLimited):  # b counted the sixth: the shared budget is spent
        b.admit("198.51.100.7", lambda e: event("rate_limited"))
    a.admit("198.51.100.7", lambda e: event("rate_limited"))  # a has not heard yet ...
    refuse(a, "198.51.100.7")  # ... until the address fails there once more
    with pytest.raises(RateLimited):
        a.admit("198.51.100.7", lambda e: event("rate_limited"))
    clock.now += 61
    assert a.flush() + b.flush() == 2  # invalid_signature and rate_limited, once each
    counts = {
        e["attributes"]["broker.auth.reason"]: e["attributes"]["broker.auth.count"]
        for e in named(dbs[0], "broker.auth.failure_summary")
    }
    assert counts == {"invalid_signature": 6, "rate_limited": 1}  # beyond each first
    assert len(named(dbs[0], "broker.auth.failure")) == 2
    for db in dbs:
        db.dispose()
