"""End-to-end issuance through broker replicas, side by side with the direct path.

Per backend (OpenBao child tokens, AWS STS through moto, broker-signed JWTs), at 1, 8 and 32
concurrent agents, each agent looping for a fixed time:

- **broker**: exchange an ID token for a session (RFC 8693), request a task (auto-approved),
  mint its credential, complete the task (which revokes it). Latency of each step and of the
  whole issuance, with 1 and 2 replicas (agents spread over the replicas like a load balancer).
- **direct, as an agent would do it without the broker**: OpenBao JWT login with the same ID
  token plus token create (plus revoke, the same work as the broker's complete); boto3
  AssumeRole; a local JWT signature.
- **the backend call alone**: the exact call the broker makes while minting (token create
  through the broker's token role; AssumeRole; the signature), so the broker's overhead on the
  mint is ``mint p50 - call p50``.

Run through ``python -m bench.run`` (everything) or ``python -m bench.issuance`` (this part).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.stack import DIRECT_ROLE, Stack
from broker.devstack import openbao as bao_provision
from tests.support.issuer import TestIssuer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
#: The test scope each backend is measured with (tests/replicas/cluster.py REPLICA_SCOPES).
SCOPES = {"vault": "replica-kv", "aws_sts": "replica-sts", "broker_jwt": "replica-jwt"}
STS_ROLE = "arn:aws:iam::123456789012:role/broker-s3-read"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` in milliseconds (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[rank] * 1000


@dataclass
class Series:
    """Latencies (seconds) per step of one measured run."""

    path: str  # broker | direct | call
    backend: str
    agents: int
    replicas: int = 0
    seconds: float = 0.0
    steps: dict[str, list[float]] = field(default_factory=dict)
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, step: str, value: float) -> None:
        self.steps.setdefault(step, []).append(value)

    @property
    def iterations(self) -> int:
        return len(self.steps.get("total", []))

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "backend": self.backend,
            "agents": self.agents,
            "replicas": self.replicas,
            "seconds": round(self.seconds, 2),
            "iterations": self.iterations,
            "throughput": round(self.iterations / self.seconds, 1) if self.seconds else 0.0,
            "errors": dict(self.errors),
            "steps": {
                step: {
                    "p50_ms": round(percentile(v, 0.50), 2),
                    "p99_ms": round(percentile(v, 0.99), 2),
                    "n": len(v),
                }
                for step, v in self.steps.items()
            },
        }


async def _drive(
    agents: int,
    seconds: float,
    warmup: float,
    once: Callable[[int, Series, bool], Awaitable[None]],
    series: Series,
) -> Series:
    """Run ``once`` in a loop for each agent; iterations started during ``warmup`` don't count."""
    start = time.perf_counter()
    warm_until = start + warmup
    stop_at = warm_until + seconds

    async def agent(index: int) -> None:
        while time.perf_counter() < stop_at:
            await once(index, series, time.perf_counter() >= warm_until)

    await asyncio.gather(*(agent(i) for i in range(agents)))
    series.seconds = time.perf_counter() - warm_until
    return series


# --- the broker path ---------------------------------------------------------------------------


async def broker_run(
    urls: list[str],
    issuer: TestIssuer,
    backend: str,
    agents: int,
    seconds: float,
    warmup: float,
) -> Series:
    """Agents looping exchange -> task -> mint -> complete against the replicas at ``urls``."""
    series = Series("broker", backend, agents, replicas=len(urls))
    limits = httpx.Limits(max_connections=agents + 2, max_keepalive_connections=agents + 2)
    clients = [httpx.AsyncClient(base_url=u, timeout=60, limits=limits) for u in urls]
    scope = SCOPES[backend]
    run_id = uuid.uuid4().hex[:6]

    async def once(index: int, s: Series, counted: bool) -> None:
        client = clients[index % len(clients)]
        id_token = issuer.token(f"bench-{run_id}-{index}", ttl=3600)
        t0 = time.perf_counter()
        r = await client.post(
            "/oauth2/token",
            data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
        )
        if r.status_code != 200:
            s.errors[f"exchange {r.status_code} {_code(r)}"] += 1
            return
        auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
        t1 = time.perf_counter()
        r = await client.post(
            "/v1/tasks",
            json={"scope": scope, "params": {}, "purpose": "benchmark"},
            headers=auth,
        )
        if r.status_code != 201:
            s.errors[f"task {r.status_code} {_code(r)}"] += 1
            return
        task_id = r.json()["id"]
        t2 = time.perf_counter()
        r = await client.post(f"/v1/tasks/{task_id}/credentials", headers=auth)
        if r.status_code != 201:
            s.errors[f"mint {r.status_code} {_code(r)}"] += 1
            return
        t3 = time.perf_counter()
        r = await client.post(f"/v1/tasks/{task_id}/complete", headers=auth)
        if r.status_code != 200:
            s.errors[f"complete {r.status_code} {_code(r)}"] += 1
            return
        t4 = time.perf_counter()
        if counted:
            for step, value in (
                ("exchange", t1 - t0),
                ("task", t2 - t1),
                ("mint", t3 - t2),
                ("complete", t4 - t3),
                ("issue", t3 - t0),
                ("total", t4 - t0),
            ):
                s.add(step, value)

    try:
        return await _drive(agents, seconds, warmup, once, series)
    finally:
        for client in clients:
            await client.aclose()


def _code(r: httpx.Response) -> str:
    try:
        return str(r.json().get("code", ""))
    except ValueError:
        return ""


# --- the direct path ---------------------------------------------------------------------------


async def direct_vault(
    stack: Stack, agents: int, seconds: float, warmup: float, *, login: bool = True
) -> Series:
    """``login``: OpenBao JWT login with the agent's ID token, then token create and revoke as
    that token (an agent without the broker). Otherwise: the broker's own call, token create
    through its token role with its token, then revoke by accessor."""
    series = Series("direct" if login else "call", "vault", agents)
    limits = httpx.Limits(max_connections=agents + 2, max_keepalive_connections=agents + 2)
    client = httpx.AsyncClient(base_url=stack.openbao.addr, timeout=60, limits=limits)
    run_id = uuid.uuid4().hex[:6]
    broker_token = stack.openbao.broker_token

    async def once(index: int, s: Series, counted: bool) -> None:
        id_token = stack.issuer.token(f"direct-{run_id}-{index}", ttl=900)
        t0 = time.perf_counter()
        if login:
            r = await client.post("/v1/auth/jwt/login", json={"role": DIRECT_ROLE, "jwt": id_token})
            if r.status_code != 200:
                s.errors[f"login {r.status_code}"] += 1
                return
            token = r.json()["auth"]["client_token"]
            path = "/v1/auth/token/create"
        else:
            token = broker_token
            path = f"/v1/auth/token/create/{bao_provision.CHILD_ROLE}"
        t1 = time.perf_counter()
        r = await client.post(
            path,
            headers={"X-Vault-Token": token},
            json={
                "policies": ["kv-read"],
                "ttl": "600s",
                "explicit_max_ttl": "600s",
                "renewable": False,
                "type": "service",
                "display_name": "bench",
                "meta": {"broker_cluster": "bench", "broker_task": f"t-{index}"},
            },
        )
        if r.status_code != 200:
            s.errors[f"create {r.status_code}"] += 1
            return
        accessor = r.json()["auth"]["accessor"]
        t2 = time.perf_counter()
        r = await client.post(
            "/v1/auth/token/revoke-accessor",
            headers={"X-Vault-Token": token},
            json={"accessor": accessor},
        )
        if r.status_code not in (200, 204):
            s.errors[f"revoke {r.status_code}"] += 1
            return
        t3 = time.perf_counter()
        if counted:
            if login:
                s.add("login", t1 - t0)
            s.add("create", t2 - t1)
            s.add("revoke", t3 - t2)
            s.add("issue", t2 - t0)
            s.add("total", t3 - t0)

    try:
        return await _drive(agents, seconds, warmup, once, series)
    finally:
        await client.aclose()


async def _threaded(
    path: str,
    backend: str,
    agents: int,
    seconds: float,
    warmup: float,
    work: Callable[[int], None],
) -> Series:
    """Run a blocking ``work(agent)`` in a pool of ``agents`` threads, timing each call."""
    series = Series(path, backend, agents)
    loop = asyncio.get_running_loop()
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=agents) as pool:

        async def once(index: int, s: Series, counted: bool) -> None:
            def timed() -> float:
                t0 = time.perf_counter()
                work(index)
                return time.perf_counter() - t0

            try:
                value = await loop.run_in_executor(pool, timed)
            except Exception as exc:
                s.errors[type(exc).__name__] += 1
                return
            if counted:
                with lock:
                    s.add("issue", value)
                    s.add("total", value)

        return await _drive(agents, seconds, warmup, once, series)


async def direct_sts(stack: Stack, agents: int, seconds: float, warmup: float) -> Series:
    """boto3 AssumeRole with a session name, source identity and duration, one client per
    thread (what the broker's mint calls too)."""
    import boto3

    local = threading.local()

    def work(index: int) -> None:
        sts = getattr(local, "sts", None)
        if sts is None:
            sts = boto3.client("sts", endpoint_url=stack.moto.endpoint, region_name="us-east-1")
            local.sts = sts
        sts.assume_role(
            RoleArn=STS_ROLE,
            RoleSessionName=f"direct-{index}",
            DurationSeconds=900,
            SourceIdentity=f"direct-{index}",
        )

    return await _threaded("call", "aws_sts", agents, seconds, warmup, work)


async def direct_jwt(agents: int, seconds: float, warmup: float) -> Series:
    """A local EdDSA JWT signature with the claims a broker-signed token carries."""
    import jwt
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()

    def work(index: int) -> None:
        now = int(time.time())
        jwt.encode(
            {
                "iss": "http://broker.example",
                "sub": f"agent-{index}",
                "aud": "https://demo-api.example",
                "iat": now,
                "nbf": now,
                "exp": now + 600,
                "jti": uuid.uuid4().hex,
                "scope": "replica-jwt",
            },
            key,
            algorithm="EdDSA",
            headers={"kid": "bench"},
        )

    return await _threaded("call", "broker_jwt", agents, seconds, warmup, work)


# --- the whole comparison ------------------------------------------------------------------------


def run(
    stack: Stack,
    *,
    backends: list[str],
    levels: list[int],
    replica_counts: list[int],
    seconds: float,
    warmup: float,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every series; returns the summaries plus JWKS fetch counts and replica memory.

    All clusters run side by side (each on its own database) and the series are interleaved:
    for each backend and number of agents, the direct path, then the broker with each replica
    count back to back, so a change in the machine's load hits them alike.
    """
    from contextlib import ExitStack

    from bench.stack import rss_kb

    results: list[dict[str, Any]] = []

    def record(series: Series) -> None:
        summary = series.summary()
        results.append(summary)
        progress(_line(summary))

    with ExitStack() as running:
        clusters = {n: running.enter_context(stack.cluster(n))[0] for n in replica_counts}
        rss_start = {
            n: [rss_kb(r.process.pid or 0) for r in c.replicas if r.process]
            for n, c in clusters.items()
        }
        exchanges = dict.fromkeys(replica_counts, 0)
        jwks_fetches = dict.fromkeys(replica_counts, 0)
        discovery_fetches = dict.fromkeys(replica_counts, 0)
        for backend in backends:
            for agents in levels:
                if backend == "vault":
                    record(asyncio.run(direct_vault(stack, agents, seconds, warmup, login=True)))
                    record(asyncio.run(direct_vault(stack, agents, seconds, warmup, login=False)))
                elif backend == "aws_sts":
                    record(asyncio.run(direct_sts(stack, agents, seconds, warmup)))
                else:
                    record(asyncio.run(direct_jwt(agents, seconds, warmup)))
                for replicas, nodes in clusters.items():
                    before = _fetches(stack.issuer)
                    series = asyncio.run(
                        broker_run(nodes.urls, stack.issuer, backend, agents, seconds, warmup)
                    )
                    after = _fetches(stack.issuer)
                    record(series)
                    exchanges[replicas] += len(series.steps.get("exchange", []))
                    exchanges[replicas] += sum(series.errors.values())
                    jwks_fetches[replicas] += after["/jwks"] - before["/jwks"]
                    discovery_fetches[replicas] += (
                        after["/.well-known/openid-configuration"]
                        - before["/.well-known/openid-configuration"]
                    )
        memory = [
            {
                "replicas": n,
                "rss_kb_start": rss_start[n],
                "rss_kb_end": [rss_kb(r.process.pid or 0) for r in c.replicas if r.process],
            }
            for n, c in clusters.items()
        ]
    jwks = [
        {
            "replicas": n,
            "exchanges_measured": exchanges[n],
            "jwks_fetches": jwks_fetches[n],
            "discovery_fetches": discovery_fetches[n],
        }
        for n in replica_counts
    ]
    return {"series": results, "jwks": jwks, "memory": memory}


def _fetches(issuer: TestIssuer) -> dict[str, int]:
    return {
        "/jwks": issuer.fetch_count("/jwks"),
        "/.well-known/openid-configuration": issuer.fetch_count(
            "/.well-known/openid-configuration"
        ),
    }


def _line(s: dict[str, Any]) -> str:
    total = s["steps"].get("total", {})
    where = f"{s['replicas']} replica(s)" if s["path"] == "broker" else s["path"]
    errors = f"  errors {s['errors']}" if s["errors"] else ""
    return (
        f"  {s['backend']:<10} {where:<13} {s['agents']:>3} agents  "
        f"p50 {total.get('p50_ms', float('nan')):7.2f} ms  p99 {total.get('p99_ms', float('nan')):7.2f} ms  "
        f"{s['throughput']:8.1f}/s{errors}"
    )


def main() -> None:
    import argparse

    from bench.stack import started

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--agents", default="1,8,32")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--backends", default="vault,aws_sts,broker_jwt")
    args = parser.parse_args()
    with started() as stack:
        out = run(
            stack,
            backends=args.backends.split(","),
            levels=[int(x) for x in args.agents.split(",")],
            replica_counts=[int(x) for x in args.replicas.split(",")],
            seconds=args.seconds,
            warmup=args.warmup,
        )
    print(out["jwks"])


if __name__ == "__main__":
    main()
