"""Two real broker processes on one fresh PostgreSQL database, with the session's OpenBao."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.store import Database
from broker.store.migrate import upgrade
from tests.replicas.cluster import Cluster, base_config, scope_folder, vault_config
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao, pg_database


@pytest.fixture(scope="module")
def pg_store(pg_admin_ok: None) -> Iterator[str]:
    """One migrated PostgreSQL database for the module's replicas."""
    with pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture(scope="module")
def otlp_module() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: str,
    issuer: TestIssuer,
    openbao: OpenBao,
    otlp_module: OtlpReceiver,
) -> Iterator[Cluster]:
    """Replicas 0 and 1. Their background reapers wait an hour between passes, so a test runs
    passes itself (``POST /v1/admin/reaper/run``) and knows which replica did what."""
    base: Path = tmp_path_factory.mktemp("replicas")
    config = base_config(
        database_url=pg_store,
        issuer=issuer,
        scopes_dir=scope_folder(base),
        issuers=[issuer.issuer_config(claims={"roles": "broker_roles"}, require_jti=True)],
        vault=vault_config(openbao.addr, openbao.broker_token),
        otlp={"endpoint": otlp_module.endpoint},
        reaper_interval=3600.0,
        reaper_batch=4,
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
def clients(cluster: Cluster) -> Iterator[list[httpx.Client]]:
    """One HTTP client per replica."""
    made = cluster.clients()
    yield made
    for client in made:
        client.close()


@pytest.fixture(scope="module")
def store(pg_store: str) -> Iterator[Database]:
    """The replicas' store, read directly by the test."""
    db = Database(pg_store, pool_size=2)
    yield db
    db.dispose()
