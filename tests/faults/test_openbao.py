"""OpenBao hanging, then stopped, then restarted (sealed, unsealed) under two broker replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported, chain_verifies, problem
from tests.faults.parts import DiskOpenBao
from tests.replicas.cluster import (
    Cluster,
    base_config,
    complete,
    live_tokens,
    login,
    mint,
    request_task,
    scope_folder,
    vault_config,
    wait_until,
)
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@pytest.fixture
def bao(tmp_path: Path) -> Iterator[DiskOpenBao]:
    server = DiskOpenBao(tmp_path / "openbao").start()
    yield server
    server.stop()


def test_openbao_down_then_back(
    tmp_path: Path, pg_url: str, issuer: TestIssuer, otlp: OtlpReceiver, bao: DiskOpenBao
) -> None:
    """While OpenBao hangs, a mint ends in a clear 503 ``backend_outcome_unknown`` after the
    timeout and readiness says so; while it is down, mints fail at once (503
    ``backend_unavailable``, nothing issued, the approval kept) and completing a task still
    ends it, its revocation left for the reaper. Once OpenBao is back (restarted, unsealed):
    the pending revocation and any token a hung request made are revoked, the failed mint
    succeeds on retry with the same Idempotency-Key, no token is left alive, every audit event
    was exported once and the chain verifies."""
    upgrade(pg_url)
    config = base_config(
        database_url=pg_url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        vault={**vault_config(bao.addr, bao.broker_token), "timeout": 2.0},
        otlp={"endpoint": otlp.endpoint},
        reaper_interval=0.5,
        reaper_mint_grace=3.0,
        reaper_orphan_interval=2.0,
    )
    cluster_name = config["cluster_name"]
    nodes = Cluster(tmp_path / "cluster", config, count=2)
    nodes.start()
    a, b = clients = nodes.clients()
    try:
        agent = login(a, issuer, "fault-agent")
        auditor = login(b, issuer, "fault-auditor", broker_roles=["auditor"])
        held = request_task(a, agent, "replica-kv").json()["id"]
        minted = mint(b, agent, held)
        assert minted.status_code == 201, minted.text
        held_accessor = minted.json()["details"]["accessor"]

        # 1. OpenBao hangs: the mint times out, and says it cannot know what happened.
        bao.pause()
        hung = request_task(a, agent, "replica-kv").json()["id"]
        problem(mint(a, agent, hung), 503, "backend_outcome_unknown")
        ready = b.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["backend:vault"] != "ok"
        bao.resume()

        # 2. OpenBao is gone: clear errors at once, nothing issued, nothing lost.
        bao.kill()
        later = request_task(b, agent, "replica-kv").json()["id"]
        problem(mint(b, agent, later, key="retry-me"), 503, "backend_unavailable")
        assert b.get(f"/v1/tasks/{later}", headers=agent.auth).json()["state"] == "approved"
        ended = complete(a, agent, held)
        assert ended.status_code == 200, ended.text
        assert ended.json()["state"] == "completed"

        # 3. Back (sealed after the restart, then unsealed by the operator).
        bao.start()
        wait_until(
            lambda: all(c.get("/readyz").status_code == 200 for c in clients),
            timeout=30,
            what="both replicas ready",
        )
        again = mint(a, agent, later, key="retry-me")
        assert again.status_code == 201, again.text
        assert complete(b, agent, later).status_code == 200

        store = Database(pg_url, pool_size=1)
        try:

            def settled() -> bool:
                with store.read() as conn:
                    live = repo.list_credentials(conn, states=None, limit=100)
                pending = [c for c in live if c.state.value in ("revoke_pending", "minting")]
                return not pending and not live_tokens(bao.addr, bao.root_token, cluster_name)

            wait_until(settled, timeout=60, interval=0.5, what="every token revoked")
            assert not bao.token_alive(held_accessor)
            with store.read() as conn:
                states = {c.task_id: c.state.value for c in repo.list_credentials(conn)}
                revokes = repo.audit_events(conn, name="broker.credential.revoke", limit=1000)
            assert states[held] == "revoked"
            assert any(e["task_id"] == held and e["outcome"] == "failure" for e in revokes), (
                "the failed attempt while OpenBao was down is on record"
            )
            assert any(e["task_id"] == held and e["outcome"] == "success" for e in revokes)
            chain_verifies(a, auditor)
            all_exported(store, otlp)
        finally:
            store.dispose()
    except Exception:
        print(nodes.logs())
        raise
    finally:
        for client in clients:
            client.close()
        nodes.stop()
