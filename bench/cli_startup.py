"""How long the CLI takes: `broker version`, `broker --help`, and `broker status` with a cached
session, next to the interpreter's floor, the libraries' import floor and the same two HTTP
calls made with curl (the direct path), in one interleaved run.

Run: ``.venv/bin/python -m bench.cli_startup [--runs 15]``; writes ``bench/results/cli.json``
(the figures in docs/performance.md come from there).

``broker status`` is measured two ways: with the session cached by ``broker login`` (what a
person runs all day; the ID token command is not run), and with an empty cache each time (the
token command runs and its token is exchanged: what every ``broker status`` cost before the cache
was found by its token source). The token command is a Python one-liner printing a token from a
file, about what ``broker dev token`` or a cloud CLI costs at the least.

Commands run with bytecode caching on (``PYTHONDONTWRITEBYTECODE`` removed), as an installed
package runs; one warm-up run of each comes first.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stack import machine
from broker.settings import Settings
from broker.store.migrate import upgrade
from tests.support.issuer import TestIssuer
from tests.support.services import live_broker

RESULTS = Path(__file__).parent / "results"


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall time, and the CPU time (user + system) the command and its children used: the CPU
    figure hardly moves with other processes' load, the wall figure does."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, timeout=120, check=False)
    took = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv} failed: {done.stderr.decode(errors='replace')[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return took, cpu


def _summary(samples: list[tuple[float, float]]) -> dict[str, float]:
    wall = sorted(w for w, _ in samples)
    cpu = sorted(c for _, c in samples)
    return {
        "p50_ms": round(statistics.median(wall) * 1000, 1),
        "p90_ms": round(wall[max(0, int(len(wall) * 0.9) - 1)] * 1000, 1),
        "min_ms": round(wall[0] * 1000, 1),
        "cpu_p50_ms": round(statistics.median(cpu) * 1000, 1),
        "runs": len(wall),
    }


def run(runs: int) -> dict[str, Any]:
    python = sys.executable
    broker_cli = [python, "-m", "broker"]
    with tempfile.TemporaryDirectory(prefix="broker-cli-bench-") as tmp:
        base = Path(tmp)
        issuer = TestIssuer().start()
        try:
            settings = Settings(
                dev_mode=True,
                data_dir=base / "data",
                scopes_dir=Path(__file__).resolve().parents[1] / "scopes",
                issuers=[issuer.issuer_config()],
            )
            upgrade(settings.effective_database_url)
            with live_broker(settings) as (server, _broker):
                token = base / "id-token"
                token.write_text(issuer.token("bench-agent", ttl=7200))
                env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                env.update(
                    {
                        "BROKER_URL": server.url,
                        "BROKER_ID_TOKEN_COMMAND": f"{python} -c \"print(open('{token}').read())\"",
                        "BROKER_SESSION_CACHE": str(base / "sessions.json"),
                    }
                )
                subprocess.run([*broker_cli, "login"], env=env, check=True, capture_output=True)
                session = next(iter(json.loads((base / "sessions.json").read_text()).values()))
                curl = shutil.which("curl")
                auth = f"Authorization: Bearer {session['token']}"
                cases: dict[str, tuple[list[str], dict[str, str]]] = {
                    "python -c pass (interpreter floor)": ([python, "-c", "pass"], env),
                    "import typer, httpx (library floor)": (
                        [python, "-c", "import typer, httpx"],
                        env,
                    ),
                    "broker version": ([*broker_cli, "version"], env),
                    "broker --help": ([*broker_cli, "--help"], env),
                    "broker status (cached session)": ([*broker_cli, "status"], env),
                    "broker status (empty cache: token command + exchange)": (
                        [*broker_cli, "status"],
                        {**env, "BROKER_SESSION_CACHE": str(base / "never-kept.json")},
                    ),
                }
                if curl:
                    script = (
                        f"{curl} -sf -H '{auth}' {server.url}/v1/sessions/current >/dev/null && "
                        f"{curl} -sf -H '{auth}' '{server.url}/v1/tasks' >/dev/null"
                    )
                    cases["curl, the same two calls (direct path)"] = (["sh", "-c", script], env)
                samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
                for argv, case_env in cases.values():  # warm-up: bytecode, caches
                    _timed(argv, case_env)
                for _ in range(runs):  # interleaved, so load drift hits every case alike
                    for name, (argv, case_env) in cases.items():
                        samples[name].append(_timed(argv, case_env))
                        Path(base / "never-kept.json").unlink(missing_ok=True)
        finally:
            issuer.stop()
    return {
        "machine": machine(),
        "runs": runs,
        "cases": {name: _summary(s) for name, s in samples.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    results = run(args.runs)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli.json").write_text(json.dumps(results, indent=2) + "\n")
    width = max(len(n) for n in results["cases"])
    print(f"{'case'.ljust(width)}  {'p50 ms':>8}  {'p90 ms':>8}  {'min ms':>8}  {'CPU ms':>8}")
    for name, s in results["cases"].items():
        print(
            f"{name.ljust(width)}  {s['p50_ms']:>8}  {s['p90_ms']:>8}  {s['min_ms']:>8}  "
            f"{s['cpu_p50_ms']:>8}"
        )
    print(
        f"load average (1, 5, 15 min) when measured: {results['machine'].get('load_average_at_start')}"
    )


if __name__ == "__main__":
    main()
