"""The long load run, by hand: N agents for M minutes on broker replicas (loopback only).

Run: ``.venv/bin/python -m bench.load [--agents 16] [--minutes 5] [--replicas 2]``.

Checks what ``tests/load`` checks, over minutes instead of seconds: no answer but successes
and 429s; every issued credential is one issuance event; every stored audit event reached the
collector (span ids counted at both ends); the replicas' resident memory, printed every ten
seconds and summarised (first minute vs last minute). Writes ``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

from bench.stack import machine, started
from broker.store import Database, repo
from tests.load.engine import run_load

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    about = machine()
    print(f"load: {args.agents} agents, {args.minutes} min, {args.replicas} replica(s)")
    with started() as stack, stack.cluster(args.replicas) as (nodes, url):
        pids = [r.process.pid or 0 for r in nodes.replicas if r.process]
        report = asyncio.run(
            run_load(
                nodes.urls,
                stack.issuer,
                agents=args.agents,
                seconds=args.minutes * 60,
                pids=pids,
                progress=True,
            )
        )
        store = Database(url, pool_size=1)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                with store.read() as conn:
                    if repo.count_unexported(conn) == 0:
                        break
                time.sleep(0.5)
            with store.read() as conn:
                stored = {e["span_id"] for e in repo.audit_events(conn, limit=10_000_000)}
                issued_events = len(
                    repo.audit_events(
                        conn, name="broker.credential.issue", outcome="success", limit=10_000_000
                    )
                )
                backlog = repo.count_unexported(conn)
        finally:
            store.dispose()
        wire = {bytes.fromhex(s) for s in stored} & stack.sink.span_ids
    minute = 60.0
    memory: dict[str, Any] = {}
    for replica, samples in report.rss.items():
        first = [kb for t, kb in samples if minute <= t < 2 * minute] or [s[1] for s in samples]
        last = [kb for t, kb in samples if t >= report.seconds - minute] or [s[1] for s in samples]
        memory[f"replica {replica}"] = {
            "second_minute_mb": round(max(first) / 1024, 1),
            "last_minute_mb": round(max(last) / 1024, 1),
        }
    out = {
        "machine": about,
        "agents": args.agents,
        "replicas": args.replicas,
        "seconds": round(report.seconds, 1),
        "issued": report.issued,
        "issued_per_second": round(report.issued / report.seconds, 1),
        "statuses": dict(report.statuses),
        "unexpected": report.unexpected[:20],
        "issue_events": issued_events,
        "events_stored": len(stored),
        "events_on_the_wire": len(wire),
        "duplicates_on_the_wire": stack.sink.duplicates,
        "backlog_left": backlog,
        "memory": memory,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "load.json").write_text(json.dumps(out, indent=2))
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=2))
    ok = (
        not report.unexpected
        and issued_events == report.issued
        and len(wire) == len(stored)
        and backlog == 0
    )
    print("OK" if ok else "FAILED: see above")


if __name__ == "__main__":
    main()
