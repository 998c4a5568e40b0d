"""A bounded loopback load: N agents for M seconds against broker replicas.

Each agent keeps a session (exchanging a fresh ID token every ``session_every`` issuances, as a
real agent re-authenticates) and loops: request a task, mint, complete. Every third request is
for a scope with a per-principal rate limit, so 429s are part of the load and must be the only
refusals. The replicas' resident memory is sampled once a second.

Used by ``tests/load`` (a CI-sized run) and ``bench/load.py`` (minutes, by hand).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.issuer import TestIssuer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
MAIN_SCOPE = "replica-kv"
LIMITED_SCOPE = "replica-jwt-limited"


@dataclass
class LoadReport:
    """What the agents saw, and the replicas' memory over time."""

    seconds: float = 0.0
    issued: int = 0
    completed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    #: Anything that is neither a success nor a 429 (must stay empty).
    unexpected: list[str] = field(default_factory=list)
    #: Per replica: (seconds since start, resident kB) samples.
    rss: dict[int, list[tuple[float, int]]] = field(default_factory=dict)

    def memory_growth_kb(self, replica: int, warmup: float) -> int:
        """Resident memory at the end minus just after ``warmup`` (medians of three samples)."""
        samples = [kb for t, kb in self.rss.get(replica, []) if t >= warmup]
        if len(samples) < 6:
            return 0
        first = sorted(samples[:3])[1]
        last = sorted(samples[-3:])[1]
        return last - first


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def run_load(
    urls: list[str],
    issuer: TestIssuer,
    *,
    agents: int,
    seconds: float,
    pids: list[int],
    session_every: int = 20,
    progress: bool = False,
) -> LoadReport:
    """Drive the load; returns once every agent finished its last iteration."""
    report = LoadReport(rss={i: [] for i in range(len(pids))})
    limits = httpx.Limits(max_connections=agents + 2, max_keepalive_connections=agents + 2)
    clients = [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]
    start = time.monotonic()
    stop_at = start + seconds

    def note(step: str, resp: httpx.Response, ok: int) -> bool:
        report.statuses[f"{step} {resp.status_code}"] += 1
        if resp.status_code == ok:
            return True
        if resp.status_code != 429:
            report.unexpected.append(f"{step} {resp.status_code}: {resp.text[:300]}")
        return False

    async def agent(index: int) -> None:
        client = clients[index % len(clients)]
        auth: dict[str, str] = {}
        for n in range(1_000_000_000):
            if time.monotonic() >= stop_at:
                return
            if n % session_every == 0:
                resp = await client.post(
                    "/oauth2/token",
                    data={
                        "grant_type": GRANT,
                        "subject_token_type": ID_TOKEN,
                        "subject_token": issuer.token(f"load-{index}", ttl=3600),
                    },
                )
                if not note("exchange", resp, 200):
                    await asyncio.sleep(0.1)
                    continue
                auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
            scope = LIMITED_SCOPE if n % 3 == 2 else MAIN_SCOPE
            resp = await client.post(
                "/v1/tasks",
                json={"scope": scope, "params": {}, "purpose": "load test"},
                headers=auth,
            )
            if not note("task", resp, 201):
                if resp.status_code == 429:
                    await asyncio.sleep(min(0.2, float(resp.headers.get("Retry-After", 1))))
                continue
            task_id = resp.json()["id"]
            resp = await client.post(f"/v1/tasks/{task_id}/credentials", headers=auth)
            if not note("mint", resp, 201):
                continue
            report.issued += 1
            resp = await client.post(f"/v1/tasks/{task_id}/complete", headers=auth)
            if note("complete", resp, 200):
                report.completed += 1

    async def sample() -> None:
        while time.monotonic() < stop_at:
            now = time.monotonic() - start
            for i, pid in enumerate(pids):
                report.rss[i].append((now, rss_kb(pid)))
            if progress:
                print(
                    f"  {now:6.0f}s issued {report.issued:6d}  "
                    f"rss {[s[-1][1] // 1024 for s in report.rss.values() if s]} MB  "
                    f"unexpected {len(report.unexpected)}",
                    flush=True,
                )
            await asyncio.sleep(1.0 if not progress else 10.0)

    try:
        await asyncio.gather(sample(), *(agent(i) for i in range(agents)))
    finally:
        for client in clients:
            await client.aclose()
    report.seconds = time.monotonic() - start
    return report
