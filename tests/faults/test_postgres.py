"""PostgreSQL stopped and started again under two replicas while agents keep issuing.

The store is a private PostgreSQL cluster made for this test (initdb, pg_ctl on a free port):
the machine's shared server is never restarted.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported, chain_verifies, problem
from tests.faults.parts import PrivateCluster, pg_bin_dir
from tests.replicas.cluster import (
    Agent,
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

pytestmark = [pytest.mark.integration]

#: Codes a request may fail with while the store is down (all 503 problem documents).
OUTAGE_CODES = {"store_unavailable", "audit_unavailable", "service_unavailable"}


@pytest.fixture
def private_pg() -> Iterator[PrivateCluster]:
    if pg_bin_dir() is None:
        pytest.skip("no PostgreSQL server binaries under /usr/lib/postgresql")
    base = Path(tempfile.mkdtemp(prefix="broker-fault-pg-"))
    cluster = PrivateCluster(base)
    try:
        cluster.init().start()
        yield cluster
    finally:
        with contextlib.suppress(RuntimeError):  # already stopped
            cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)


class Traffic:
    """Agents issuing in a loop (exchange -> task -> mint -> complete), every answer counted."""

    def __init__(self, clients: list[httpx.Client], issuer: TestIssuer, agents: int) -> None:
        self.clients = clients
        self.issuer = issuer
        self.agents = agents
        self.statuses: Counter[str] = Counter()
        self.bad: list[str] = []
        self.completed_after: list[float] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _note(self, step: str, resp: httpx.Response) -> bool:
        with self._lock:
            self.statuses[f"{step} {resp.status_code}"] += 1
            if resp.status_code >= 500:
                kind = resp.headers.get("content-type", "")
                code = resp.json().get("code") if kind.startswith("application/") else None
                if resp.status_code != 503 or code not in OUTAGE_CODES:
                    self.bad.append(f"{step}: {resp.status_code} {resp.text[:300]}")
        return resp.status_code < 300

    def _agent(self, index: int) -> None:
        client = self.clients[index % len(self.clients)]
        while not self._stop.is_set():
            try:
                token = self.issuer.token(f"pg-agent-{index}", ttl=3600)
                resp = client.post(
                    "/oauth2/token",
                    data={
                        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                        "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                        "subject_token": token,
                    },
                )
                if not self._note("exchange", resp):
                    time.sleep(0.05)
                    continue
                agent = Agent(resp.json()["access_token"], f"pg-agent-{index}")
                resp = request_task(client, agent, "replica-kv")
                if not self._note("task", resp):
                    continue
                task_id = resp.json()["id"]
                if not self._note("mint", mint(client, agent, task_id)):
                    continue
                if self._note("complete", complete(client, agent, task_id)):
                    with self._lock:
                        self.completed_after.append(time.monotonic())
            except httpx.TransportError as exc:  # the broker itself must stay up
                with self._lock:
                    self.bad.append(f"transport: {exc!r}")

    def start(self) -> Traffic:
        self._threads = [
            threading.Thread(target=self._agent, args=(i,), daemon=True) for i in range(self.agents)
        ]
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def test_postgres_restart_under_traffic(
    tmp_path: Path,
    private_pg: PrivateCluster,
    issuer: TestIssuer,
    otlp: OtlpReceiver,
    openbao: OpenBao,
) -> None:
    """Three agents issue OpenBao tokens through two replicas while the store goes down for a
    couple of seconds and comes back. While it is down every failing answer is a 503 problem
    (``store_unavailable`` or ``audit_unavailable``), never a 500 or a dropped connection, and
    readiness says the store is unavailable; afterwards both replicas serve again without a
    restart, mints cut off halfway are repaired by the reaper, every live OpenBao token belongs
    to an active credential, every audit event was exported once and the chain verifies."""
    url = private_pg.create_database("broker")
    upgrade(url)
    config = base_config(
        database_url=url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        vault=vault_config(openbao.addr, openbao.broker_token),
        otlp={"endpoint": otlp.endpoint},
        reaper_interval=0.5,
        reaper_mint_grace=3.0,
    )
    cluster_name = config["cluster_name"]
    nodes = Cluster(tmp_path / "cluster", config, count=2)
    store = Database(url, pool_size=1)
    traffic: Traffic | None = None
    try:
        nodes.start()
        clients = nodes.clients()
        auditor = login(clients[0], issuer, "pg-auditor", broker_roles=["auditor"])
        traffic = Traffic(clients, issuer, agents=3).start()
        wait_until(lambda: traffic.completed_after, timeout=30, what="traffic to flow")

        private_pg.stop("fast")
        down = clients[1].get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["store"] == "unavailable"
        problem(clients[0].get("/v1/sessions/current", headers=auditor.auth), 503, *OUTAGE_CODES)
        time.sleep(1.5)
        private_pg.start()
        back = time.monotonic()

        wait_until(
            lambda: all(c.get("/readyz").status_code == 200 for c in clients),
            timeout=30,
            what="both replicas ready again",
        )
        wait_until(
            lambda: sum(1 for t in traffic.completed_after if t > back) >= 6,
            timeout=60,
            what="issuance to resume",
        )
        traffic.stop()
        assert not traffic.bad, traffic.bad[:5]
        assert any(k.endswith(" 503") for k in traffic.statuses), traffic.statuses

        def settled() -> bool:
            with store.read() as conn:
                creds = repo.list_credentials(conn, limit=10_000)
            unsettled = [c for c in creds if c.state.value in ("minting", "revoke_pending")]
            active = {c.id for c in creds if c.state.value == "active"}
            alive = set(live_tokens(openbao.addr, openbao.root_token, cluster_name))
            return not unsettled and alive <= active

        wait_until(settled, timeout=60, interval=0.5, what="no orphaned credential")
        chain_verifies(clients[1], auditor)
        # A batch the collector accepted just before the store went away cannot be marked
        # exported: it is sent again, as the very same spans (same ids), never lost.
        all_exported(store, otlp, duplicates_up_to=2 * 512)
        for client in clients:
            client.close()
    except Exception:
        print(nodes.logs())
        if traffic is not None:
            print(traffic.statuses, traffic.bad[:5])
        raise
    finally:
        if traffic is not None:
            traffic.stop()
        store.dispose()
        nodes.stop()
