"""A replica killed with SIGKILL between the backend's mint and the issuance record."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported, chain_verifies
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
from tests.support.services import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def test_replica_killed_mid_issuance(
    tmp_path: Path, pg_url: str, issuer: TestIssuer, otlp: OtlpReceiver, openbao: OpenBao
) -> None:
    """Replica 0 mints an OpenBao token and is SIGKILLed before recording it. The agent sees
    the connection drop; retrying the same Idempotency-Key on replica 1 is a 409
    ``mint_in_progress`` naming the credential; replica 1's reaper finds the stale intent and
    revokes the token by its metadata (audited as a repair). The agent then gets a new task
    minted, replica 0 comes back, nothing is left alive, every audit event (replica 0's
    included) was exported once and the chain verifies."""
    upgrade(pg_url)
    config = base_config(
        database_url=pg_url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        vault=vault_config(openbao.addr, openbao.broker_token),
        otlp={"endpoint": otlp.endpoint},
        reaper_interval=0.5,
        reaper_mint_grace=2.0,
    )
    cluster_name = config["cluster_name"]
    nodes = Cluster(
        tmp_path / "cluster",
        config,
        count=2,
        replica_env={0: {"BROKER_DEV_FAULT": "pause_after_mint"}},
    )
    store = Database(pg_url, pool_size=1)
    try:
        nodes.start()
        a, b = nodes.clients()
        agent = login(b, issuer, "kill-agent")
        auditor = login(b, issuer, "kill-auditor", broker_roles=["auditor"])
        task_id = request_task(b, agent, "replica-kv").json()["id"]

        outcome: list[BaseException | httpx.Response] = []

        def doomed() -> None:
            try:
                outcome.append(mint(a, agent, task_id, key="once"))
            except httpx.TransportError as exc:
                outcome.append(exc)

        thread = threading.Thread(target=doomed)
        thread.start()
        faults = nodes.replicas[0].data_dir / "faults"
        marker = wait_until(
            lambda: next(iter(faults.glob("*.paused")), None), timeout=30, what="the pause"
        )
        credential_id = marker.name.removesuffix(".paused")
        assert credential_id in live_tokens(openbao.addr, openbao.root_token, cluster_name)

        nodes.kill(0)
        thread.join(timeout=30)
        assert len(outcome) == 1 and isinstance(outcome[0], httpx.TransportError), outcome

        retry = mint(b, agent, task_id, key="once")
        assert retry.status_code == 409, retry.text
        assert retry.json()["code"] == "mint_in_progress"
        assert retry.json()["credential_id"] == credential_id

        def repaired() -> bool:
            with store.read() as conn:
                cred = repo.get_credential(conn, credential_id)
            return cred is not None and cred.state.value == "revoked"

        wait_until(repaired, timeout=30, what="replica 1's reaper to repair the mint")
        assert credential_id not in live_tokens(openbao.addr, openbao.root_token, cluster_name)
        with store.read() as conn:
            revokes = repo.audit_events(conn, credential_id=credential_id)
        repair = [e for e in revokes if e["name"] == "broker.credential.revoke"]
        assert [e["outcome"] for e in repair] == ["success"]
        assert "unfinished mint" in repair[0]["attributes"]["broker.revoke.reason"]

        again = mint(b, agent, task_id, key="once")
        assert again.status_code == 409 and again.json()["code"] == "already_issued"

        nodes.replica_env[0] = {}
        nodes.restart(0)
        fresh = request_task(a, agent, "replica-kv").json()["id"]
        assert mint(a, agent, fresh).status_code == 201
        assert complete(a, agent, fresh).status_code == 200
        assert not live_tokens(openbao.addr, openbao.root_token, cluster_name)
        chain_verifies(a, auditor)
        chain_verifies(b, auditor)
        all_exported(store, otlp)
        a.close()
        b.close()
    except Exception:
        print(nodes.logs())
        raise
    finally:
        store.dispose()
        nodes.stop()
