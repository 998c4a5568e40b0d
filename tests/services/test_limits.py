"""Rate limits and quotas: fixed windows shared through the store, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
import threading
from typing import Any

import pytest

from broker.domain.principal import Principal
from broker.domain.scope import RateWindow, ScopeTemplate
from broker.errors import RateLimited
from broker.services.limits import RateLimiter, limits_for
from broker.store import Database
from broker.store.migrate import upgrade

TEMPLATE = ScopeTemplate.model_validate(
    {
        "name": "limited",
        "description": "d",
        "owner": "o",
        "backend": {"type": "vault_token", "policies": ["kv-read"]},
        "requester": {"all": [{"claim": "sub", "regex": ".+"}]},
        "limits": {
            "principal": [{"requests": 3, "per": 60}],
            "scope": [{"requests": 5, "per": 3600}],
        },
    }
)
ALICE = Principal(issuer="https://idp", subject="alice")
BOB = Principal(issuer="https://idp", subject="bob")


def db_at(url: str) -> Database:
    upgrade(url)
    return Database(url)


def hit(db: Database, limiter: RateLimiter, who: Principal, now: float, extra: Any = ()) -> None:
    with db.write() as conn:
        limiter.hit(conn, limits_for(who, TEMPLATE, list(extra)), now)


def test_windows_per_principal_and_per_scope(sqlite_url: str) -> None:
    """Three per principal a minute, five for everyone an hour; Retry-After is when the fullest
    window ends; a refused request does not count."""
    db = db_at(sqlite_url)
    limiter = RateLimiter(db, lambda: 0.0)
    t0 = 60 * 16_667 + 20.0  # 20 s into a minute window
    for _ in range(3):
        hit(db, limiter, ALICE, t0)
    with pytest.raises(RateLimited) as err:
        hit(db, limiter, ALICE, t0)
    assert err.value.retry_after == 40
    assert "your requests for 'limited'" in err.value.detail
    hit(db, limiter, BOB, t0)
    hit(db, limiter, BOB, t0)
    with pytest.raises(RateLimited) as err:  # the scope's hourly quota (5) is used up
        hit(db, limiter, BOB, t0 + 1)
    assert "requests for 'limited' are limited to 5 per 3600 s" in err.value.detail
    hour_start = (t0 + 1) // 3600 * 3600
    assert err.value.retry_after == math.ceil(hour_start + 3600 - (t0 + 1))
    db.dispose()


def test_global_per_principal_limit(sqlite_url: str) -> None:
    db = db_at(sqlite_url)
    limiter = RateLimiter(db, lambda: 0.0)
    window = [RateWindow(requests=1, per=10)]
    hit(db, limiter, ALICE, 5.0, window)
    with pytest.raises(RateLimited) as err:
        hit(db, limiter, ALICE, 6.0, window)
    assert (err.value.retry_after, "your requests are limited" in err.value.detail) == (4, True)
    hit(db, limiter, ALICE, 10.0, window)  # a new window
    db.dispose()


@pytest.mark.postgres
def test_counts_are_atomic_across_concurrent_writers(pg_url: str) -> None:
    """Twenty concurrent requests on PostgreSQL against a limit of 3: exactly 3 pass."""
    db = db_at(pg_url)
    limiter = RateLimiter(db, lambda: 0.0)
    passed: list[int] = []
    refused: list[int] = []
    start = threading.Barrier(20)

    def worker(i: int) -> None:
        start.wait()
        try:
            hit(db, limiter, ALICE, 2_000_000.0)
            passed.append(i)
        except RateLimited:
            refused.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(passed), len(refused)) == (3, 17)
    db.dispose()
