"""The OpenTelemetry collector down while agents keep working."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.store import Database
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported, chain_verifies
from tests.replicas.cluster import (
    Cluster,
    base_config,
    complete,
    login,
    mint,
    request_task,
    scope_folder,
    wait_until,
)
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_collector_down_loses_nothing(
    tmp_path: Path, pg_url: str, issuer: TestIssuer, otlp: OtlpReceiver
) -> None:
    """With the collector answering 503, issuance goes on unaffected (the store is the record),
    the audit status shows the export failing with a growing backlog; once the collector is
    back the backlog drains and every event arrives exactly once, in one piece."""
    upgrade(pg_url)
    config = base_config(
        database_url=pg_url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        otlp={"endpoint": otlp.endpoint},
    )
    nodes = Cluster(tmp_path / "cluster", config, count=2)
    store = Database(pg_url, pool_size=1)
    try:
        nodes.start()
        clients = nodes.clients()
        agent = login(clients[0], issuer, "otlp-agent")
        auditor = login(clients[1], issuer, "otlp-auditor", broker_roles=["auditor"])

        def issue(n: int) -> None:
            for i in range(n):
                client = clients[i % 2]
                task_id = request_task(client, agent, "replica-jwt").json()["id"]
                assert mint(client, agent, task_id).status_code == 201
                assert complete(client, agent, task_id).status_code == 200

        issue(2)
        all_exported(store, otlp)
        received = len(otlp.spans)

        otlp.fail = True
        issue(6)

        def failing() -> dict[str, object] | None:
            status = clients[0].get("/v1/audit/status", headers=auditor.auth).json()
            export = status["export"]
            return status if export["consecutive_failures"] > 0 and export["backlog"] else None

        status = wait_until(failing, timeout=20, what="the export to report failures")
        assert "503" in str(status["export"]["last_error"])  # type: ignore[index]
        assert len(otlp.spans) == received, "nothing was accepted while the collector was down"

        otlp.fail = False
        total = all_exported(store, otlp)
        assert total > received
        exports = [
            c.get("/v1/audit/status", headers=auditor.auth).json()["export"] for c in clients
        ]
        assert all(e["backlog"] == 0 for e in exports)
        # The replica that drained the backlog reports healthy again.
        assert any(e["consecutive_failures"] == 0 for e in exports), exports
        chain_verifies(clients[0], auditor)
        for client in clients:
            client.close()
    except Exception:
        print(nodes.logs())
        raise
    finally:
        store.dispose()
        nodes.stop()
