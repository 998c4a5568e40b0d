"""Replicas starting together on an empty PostgreSQL database."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.store.migrate import current_tables
from tests.replicas.cluster import Cluster, base_config, login, request_task, scope_folder
from tests.support.issuer import TestIssuer

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_replicas_started_together_with_migrate_both_come_up(
    tmp_path: Path, pg_url: str, issuer: TestIssuer
) -> None:
    """``broker serve --migrate`` on three replicas at the same moment against an empty
    database: the migrations run once (an advisory lock orders them), every replica becomes
    ready, and a session opened on one works on the others."""
    config = base_config(database_url=pg_url, issuer=issuer, scopes_dir=scope_folder(tmp_path))
    nodes = Cluster(tmp_path / "cluster", config, count=3, migrate=True)
    try:
        nodes.start()
        assert "tasks" in current_tables(pg_url)
        clients = nodes.clients()
        agent = login(clients[0], issuer, "startup-agent")
        for client in clients:
            assert client.get("/v1/sessions/current", headers=agent.auth).status_code == 200
        resp = request_task(clients[2], agent, "replica-jwt")
        assert resp.status_code == 201, resp.text
        for client in clients:
            client.close()
    except Exception:
        print(nodes.logs())
        raise
    finally:
        nodes.stop()
