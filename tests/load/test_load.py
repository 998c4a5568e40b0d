"""A short, bounded load on two replicas (the long run is ``python -m bench.load``)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported
from tests.load.engine import run_load
from tests.replicas.cluster import Cluster, base_config, scope_folder, vault_config
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

#: CI-sized by default; LOAD_TEST_SECONDS / LOAD_TEST_AGENTS make it longer or wider.
SECONDS = float(os.environ.get("LOAD_TEST_SECONDS", "12"))
AGENTS = int(os.environ.get("LOAD_TEST_AGENTS", "6"))


@pytest.fixture
def cluster(
    tmp_path: Path, pg_url: str, issuer: TestIssuer, openbao: OpenBao, otlp: OtlpReceiver
) -> Iterator[Cluster]:
    upgrade(pg_url)
    config = base_config(
        database_url=pg_url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        vault=vault_config(openbao.addr, openbao.broker_token),
        otlp={"endpoint": otlp.endpoint},
    )
    nodes = Cluster(tmp_path / "cluster", config, count=2)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def test_bounded_load_on_two_replicas(
    cluster: Cluster, pg_url: str, issuer: TestIssuer, otlp: OtlpReceiver
) -> None:
    """Agents request, mint and complete in a loop on both replicas (a third of the requests
    against a scope with a per-principal rate limit). Proves: no answer but successes and
    429s (with Retry-After honoured), every issuance the agents saw is one successful
    ``broker.credential.issue`` event in the store, every stored event reached the collector
    exactly once (counted at both ends), and the replicas' memory stays bounded."""
    pids = [r.process.pid or 0 for r in cluster.replicas if r.process]
    report = asyncio.run(run_load(cluster.urls, issuer, agents=AGENTS, seconds=SECONDS, pids=pids))
    assert not report.unexpected, report.unexpected[:5]
    assert report.issued > 0 and report.completed == report.issued
    assert report.statuses["task 429"] > 0, "the rate-limited scope was exercised"

    store = Database(pg_url, pool_size=1)
    try:
        with store.read() as conn:
            issues = repo.audit_events(
                conn, name="broker.credential.issue", outcome="success", limit=1_000_000
            )
            states = repo.count_credentials_by_state(conn)
        assert len(issues) == report.issued
        assert states == {"revoked": report.issued}, states
        all_exported(store, otlp, timeout=60)
    finally:
        store.dispose()
    for replica in range(len(pids)):
        # Loose over a short run (a gross leak, tens of kB per request, shows); the long run in
        # bench/load.py reports the memory curve over minutes.
        growth = report.memory_growth_kb(replica, warmup=SECONDS / 3)
        assert growth < 40_000, f"replica {replica} grew by {growth} kB"
    print(f"load: {report.issued} issued in {report.seconds:.0f}s, {dict(report.statuses)}")
