"""Every benchmark in one command, on this machine, against the real parts.

Run: ``.venv/bin/python -m bench.run`` (about ten minutes; ``--quick`` for a smoke run).

1. end-to-end issuance per backend through 1 and 2 broker replicas at 1, 8 and 32 concurrent
   agents, next to the direct path and the bare backend call (``bench/issuance.py``);
2. audit append and export throughput on PostgreSQL (``bench/audit_export.py``);
3. JWKS and discovery fetches of the issuer during all the issuance above;
4. PostgreSQL round trips per step of one issuance (``bench/roundtrips.py``: a count, steady
   on a busy machine where times are not).

Prints the tables and the ratios against the goals, and writes everything to
``bench/results/issuance.json`` (the numbers in docs/performance.md come from there).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from bench import audit_export, issuance, roundtrips
from bench.stack import machine, started

RESULTS = Path(__file__).parent / "results"


def _find(series: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for s in series:
        if all(s.get(k) == v for k, v in match.items()):
            return s
    return None


def _p50(s: dict[str, Any] | None, step: str = "total") -> float:
    if s is None or step not in s["steps"]:
        return math.nan
    return float(s["steps"][step]["p50_ms"])


def _p99(s: dict[str, Any] | None, step: str = "total") -> float:
    if s is None or step not in s["steps"]:
        return math.nan
    return float(s["steps"][step]["p99_ms"])


def report(results: dict[str, Any]) -> list[str]:
    """The comparison as text lines (printed, and kept in the JSON)."""
    series = results["issuance"]["series"]
    lines = []
    direct_name = {
        "vault": "OpenBao JWT login + token create (+ revoke)",
        "aws_sts": "boto3 AssumeRole",
        "broker_jwt": "local EdDSA JWT signature",
    }
    for backend in results["backends"]:
        lines.append(f"\n== {backend}: direct path = {direct_name[backend]}")
        lines.append(
            "agents | to the credential: direct p50 | broker p50 1 replica (ratio) | 2 replicas "
            "(ratio) || with revocation: direct p50 | broker p50 1 replica (ratio) || "
            "issuances/s: direct | 1 replica | 2 replicas"
        )
        for agents in results["levels"]:
            path = "direct" if backend == "vault" else "call"
            direct = _find(series, path=path, backend=backend, agents=agents)
            one = _find(series, path="broker", backend=backend, agents=agents, replicas=1)
            two = _find(series, path="broker", backend=backend, agents=agents, replicas=2)
            # "issue": until the agent holds the credential (direct: login + create; broker:
            # exchange + task + mint). "total": with taking it back (revoke; the broker's complete).
            d_issue, d_total = _p50(direct, "issue"), _p50(direct, "total")
            lines.append(
                f"{agents:>6} | {d_issue:8.2f} | {_p50(one, 'issue'):8.2f} "
                f"({_p50(one, 'issue') / d_issue:5.1f}x) | {_p50(two, 'issue'):8.2f} "
                f"({_p50(two, 'issue') / d_issue:5.1f}x) || {d_total:8.2f} | {_p50(one):8.2f} "
                f"({_p50(one) / d_total:5.1f}x) || {(direct or {}).get('throughput', math.nan)} | "
                f"{(one or {}).get('throughput', math.nan)} | {(two or {}).get('throughput', math.nan)}"
            )
        call = _find(series, path="call", backend=backend, agents=1)
        one = _find(series, path="broker", backend=backend, agents=1, replicas=1)
        if one is not None:
            steps = ", ".join(
                f"{k} {v['p50_ms']:.2f}"
                for k, v in one["steps"].items()
                if k in ("exchange", "task", "mint", "complete")
            )
            lines.append(f"one agent, 1 replica, p50 per step (ms): {steps}")
            lines.append(
                f"broker overhead on the mint at one agent: mint p50 {_p50(one, 'mint'):.2f} ms - "
                f"backend call p50 {_p50(call, 'issue'):.2f} ms = "
                f"{_p50(one, 'mint') - _p50(call, 'issue'):.2f} ms (goal: <= 2 ms)"
            )
    audit = results.get("audit")
    if audit:
        lines.append(
            f"\n== audit on PostgreSQL: append {audit['append_per_second']}/s (one event per "
            f"transaction, one writer); export {audit['export_per_second_one_exporter']}/s with "
            f"one exporter, {audit['export_per_second_two_exporters']}/s with two "
            f"(batches of {audit['batch_size']}, {audit['compression']})"
        )
    if results.get("roundtrips"):
        lines.append(
            "== PostgreSQL round trips per step (counted, not timed): "
            + ", ".join(f"{k} {v}" for k, v in results["roundtrips"].items())
        )
    for j in results["issuance"]["jwks"]:
        lines.append(
            f"== JWKS: {j['replicas']} replica(s): {j['exchanges_measured']} token exchanges, "
            f"{j['jwks_fetches']} JWKS fetches, {j['discovery_fetches']} discovery fetches"
        )
    for m in results["issuance"]["memory"]:
        lines.append(
            f"== memory: {m['replicas']} replica(s): RSS kB at start {m['rss_kb_start']}, "
            f"after all runs {m['rss_kb_end']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per series")
    parser.add_argument("--warmup", type=float, default=1.5)
    parser.add_argument("--agents", default="1,8,32")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--backends", default="vault,aws_sts,broker_jwt")
    parser.add_argument("--audit-events", type=int, default=5000)
    parser.add_argument("--quick", action="store_true", help="2 s per series, 1 and 8 agents")
    parser.add_argument("--out", type=Path, default=RESULTS / "issuance.json")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.warmup, args.agents, args.audit_events = 2.0, 0.5, "1,8", 1000
    results: dict[str, Any] = {
        "machine": machine(),
        "backends": args.backends.split(","),
        "levels": [int(x) for x in args.agents.split(",")],
        "replica_counts": [int(x) for x in args.replicas.split(",")],
        "seconds_per_series": args.seconds,
    }
    print(json.dumps(results["machine"], indent=1))
    with started() as stack:
        results["issuance"] = issuance.run(
            stack,
            backends=results["backends"],
            levels=results["levels"],
            replica_counts=results["replica_counts"],
            seconds=args.seconds,
            warmup=args.warmup,
        )
        results["audit"] = audit_export.run(stack.sink.endpoint, events=args.audit_events)
    results["roundtrips"] = roundtrips.run()
    results["load_average_at_end"] = machine()["load_average_at_start"]
    lines = report(results)
    results["report"] = lines
    print("\n".join(lines))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
