"""Floods of failed authentication across two real broker processes on one PostgreSQL store.

Both replicas trust ``127.0.0.2`` as a proxy, so the test speaks for client addresses of its
choosing through ``X-Forwarded-For``, as agents behind a load balancer would appear.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store import Database, repo
from tests.replicas.cluster import (
    GRANT,
    ID_TOKEN,
    Cluster,
    base_config,
    race,
    scope_folder,
    wait_until,
)
from tests.support.issuer import TestIssuer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

WINDOW = 20
PER_ADDRESS = 8


@pytest.fixture(scope="module")
def pair(
    tmp_path_factory: pytest.TempPathFactory, pg_store: str, issuer: TestIssuer
) -> Iterator[Cluster]:
    base: Path = tmp_path_factory.mktemp("floods")
    config = base_config(
        database_url=pg_store,
        issuer=issuer,
        scopes_dir=scope_folder(base),
        http={"trusted_proxies": ["127.0.0.2"]},
        auth_limits={"per_address": PER_ADDRESS, "window": WINDOW, "flush_interval": 0.2},
    )
    nodes = Cluster(base, config, count=2)
    try:
        nodes.start()
    except Exception:
        print(nodes.logs())
        nodes.stop()
        raise
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def proxies(pair: Cluster) -> Iterator[list[httpx.Client]]:
    """One client per replica, connecting from the trusted proxy's address."""
    made = [
        httpx.Client(
            base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=30
        )
        for url in pair.urls
    ]
    yield made
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def store(pg_store: str) -> Iterator[Database]:
    db = Database(pg_store, pool_size=2)
    yield db
    db.dispose()


def exchange(client: httpx.Client, token: str, address: str) -> httpx.Response:
    return client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
        headers={"X-Forwarded-For": address},
    )


def new_address() -> str:
    return f"203.0.{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 1}"


def from_address(store: Database, name: str, address: str) -> list[dict[str, Any]]:
    with store.read() as conn:
        rows = repo.audit_events(conn, name=name, limit=100_000)
    return [e for e in rows if e["attributes"].get("broker.auth.source") == address]


def at_window_start(margin: float = 10.0) -> None:
    """Wait, if needed, until at least ``margin`` seconds of the current window remain."""
    wait_until(lambda: WINDOW - time.time() % WINDOW > margin, timeout=WINDOW + 5, interval=0.2)


def test_the_budget_is_shared_by_both_replicas(
    proxies: list[httpx.Client], issuer: TestIssuer
) -> None:
    """Bad tokens from one address spread over both replicas: together they let at most the
    budget plus one through as refusals (the second replica learns of the block at the
    address's next failure there), then both answer 429 with Retry-After; a valid token from
    another address still opens a session on either."""
    at_window_start()
    address = new_address()
    bad = issuer.token("flood", aud="someone-else")
    codes = [exchange(proxies[i % 2], bad, address).status_code for i in range(3 * PER_ADDRESS)]
    refused = codes.count(400)
    assert PER_ADDRESS <= refused <= PER_ADDRESS + 1, codes
    assert codes[refused:] == [429] * (len(codes) - refused), codes
    for client in proxies:
        resp = exchange(client, issuer.token("flood-valid"), address)
        assert resp.status_code == 429
        assert int(resp.headers["retry-after"]) >= 1
        assert exchange(client, issuer.token("bystander"), new_address()).status_code == 200


def test_a_flood_on_both_replicas_is_summarised_once(
    proxies: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Sixty bad tokens from one address, raced on both replicas at once: each reason's first
    refusal is audited in full exactly once (not once per replica), and after the window the
    summaries (each written by one replica, though both flush) count every other refusal."""
    at_window_start()
    address = new_address()
    bad = issuer.token("racer", aud="someone-else")
    answers = race([partial(exchange, proxies[i % 2], bad, address) for i in range(60)])
    codes = [r.status_code for r in answers]
    assert set(codes) == {400, 429}
    full = from_address(store, "broker.auth.failure", address)
    reasons = sorted(e["attributes"]["broker.auth.reason"] for e in full)
    assert reasons == ["audience_mismatch", "rate_limited"]

    def summarised() -> dict[str, int]:
        rows = from_address(store, "broker.auth.failure_summary", address)
        out: dict[str, int] = {}
        for e in rows:
            reason = e["attributes"]["broker.auth.reason"]
            out[reason] = out.get(reason, 0) + e["attributes"]["broker.auth.count"]
        return out

    expected = {"audience_mismatch": codes.count(400) - 1, "rate_limited": codes.count(429) - 1}
    wait_until(
        lambda: summarised() == expected, timeout=2 * WINDOW + 15, what="the flood's summaries"
    )
    # Both replicas keep flushing; nothing is summarised twice.
    time_ended = time.time() + 2
    wait_until(lambda: time.time() > time_ended, timeout=5, interval=0.5)
    assert summarised() == expected
