"""One-time ID tokens hold across replicas: two brokers sharing one PostgreSQL accept each jti once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from broker.oidc.errors import TokenRefused
from broker.store import repo
from broker.wiring import Broker, build_broker
from tests.support.issuer import TestIssuer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def replicas(make_settings: Any, pg_url: str, issuer: TestIssuer) -> Iterator[list[Broker]]:
    settings = make_settings(database_url=pg_url, issuers=[issuer.issuer_config(require_jti=True)])
    brokers = [build_broker(settings), build_broker(settings)]
    yield brokers
    for broker in brokers:
        broker.stop()


def test_a_jti_replayed_on_another_replica_is_refused(
    replicas: list[Broker], issuer: TestIssuer
) -> None:
    """A token used on replica A is refused on replica B (and on A again)."""
    a, b = replicas
    token = issuer.token("agent-pg")
    a.sessions.exchange(token)
    for replica in (b, a):
        with pytest.raises(TokenRefused) as info:
            replica.sessions.exchange(token)
        assert info.value.code == "token_replayed"


def race(brokers: list[Broker], token: str) -> list[str]:
    """Present ``token`` to every broker at once (one thread each); the outcomes."""
    barrier = threading.Barrier(len(brokers))
    outcomes: list[str] = []

    def present(broker: Broker) -> None:
        barrier.wait()
        try:
            broker.sessions.exchange(token)
            outcomes.append("session")
        except TokenRefused as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=present, args=(b,)) for b in brokers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_concurrent_presentations_on_two_replicas_open_one_session(
    replicas: list[Broker], issuer: TestIssuer
) -> None:
    """The same token presented at the same moment to both replicas, several times over: each
    time exactly one exchange succeeds and the other is refused as a replay (the unique insert
    decides, not a read-then-write race)."""
    for round_ in range(8):
        outcomes = race(replicas * 2, issuer.token(f"agent-race-{round_}"))
        assert sorted(outcomes) == ["session", "token_replayed", "token_replayed", "token_replayed"]
    a, _ = replicas
    with a.db.read() as conn:
        starts = [
            e for e in repo.audit_events(conn, limit=1000) if e["name"] == "broker.session.start"
        ]
        failures = [
            e for e in repo.audit_events(conn, limit=1000) if e["name"] == "broker.auth.failure"
        ]
    assert len(starts) == 8
    assert len(failures) == 24
    assert {f["attributes"]["broker.auth.reason"] for f in failures} == {"token_replayed"}


def test_expired_jtis_are_purged(replicas: list[Broker], issuer: TestIssuer) -> None:
    """Remembered jtis are dropped once their token (plus leeway) has expired."""
    a, _ = replicas
    a.sessions.exchange(issuer.token("short", ttl=1))
    with a.db.write() as conn:
        assert repo.remember_jti(conn, issuer.url, "later", 0.0, now=10**12)
        rows = conn.exec_driver_sql("SELECT jti FROM seen_jtis").scalars().all()
    assert rows == ["later"]
