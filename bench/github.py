"""GitHub App tokens: the broker's backend next to the direct path, in one run, on this machine.

Run: ``.venv/bin/python -m bench.github`` (about a minute). Against the GitHub contract stand-in
(GitHub's OpenAPI description under prism, tests/support/github_contract.py), so the times are
prism's plus the broker's, not GitHub's; what they show is what the broker adds.

- direct: one ``POST /app/installations/{id}/access_tokens`` with an app JWT (what a script with
  the App's key does; no checks, no revocation);
- backend, warm: the broker's mint with the installation and its repositories cached (the same
  one POST, plus GitHub's rules and the answer's checks, sealing);
- backend, cold: with nothing cached (installation lookup, a listing token, the listing, its
  deletion, then the POST);
- the git credential helper: one request answered in process, and as git runs it (a new
  Python process per request).
"""

from __future__ import annotations

import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from broker.git_credential import KEY_ENV, SOCKET_ENV, CredentialAgent, GitTarget, ask
from tests.backends.github_helpers import github_backend, mint_request, spec
from tests.support.github_contract import github_stand_in


def summary(samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    return {
        "n": len(samples),
        "p50_ms": round(statistics.median(samples), 2),
        "p99_ms": round(samples[min(len(samples) - 1, int(len(samples) * 0.99))], 2),
    }


def interleaved(series: dict[str, Callable[[int], object]], n: int) -> dict[str, dict[str, float]]:
    """Each series sampled in turn, so load drift on a shared machine hits them alike."""
    samples: dict[str, list[float]] = {name: [] for name in series}
    for i in range(n):
        for name, fn in series.items():
            start = time.perf_counter()
            fn(i)
            samples[name].append((time.perf_counter() - start) * 1000)
    return {name: summary(values) for name, values in samples.items()}


def main() -> None:
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        with github_stand_in(folder) as gh:
            warm = github_backend(gh.url, folder / "warm")
            cold = github_backend(gh.url, folder / "cold", cache_seconds=0)
            warm.mint(mint_request(spec(), "crd_first"))
            body = {"permissions": {"contents": "write"}, "repositories": ["Hello-World"]}
            with httpx.Client(base_url=gh.url) as http:

                def direct(i: int) -> object:
                    return http.post(
                        "/app/installations/1/access_tokens",
                        json=body,
                        headers={"Authorization": f"Bearer {warm.app_token()}"},
                    )

                results.update(
                    interleaved(
                        {
                            "direct POST access_tokens": direct,
                            "backend mint, warm": lambda i: warm.mint(
                                mint_request(spec(), f"w{i}")
                            ),
                            "backend mint, cold": lambda i: cold.mint(
                                mint_request(spec(), f"c{i}")
                            ),
                        },
                        40,
                    )
                )
    with CredentialAgent("ghs_bench", [GitTarget.parse("https://github.com", "x")]) as agent:
        env = {SOCKET_ENV: agent.socket_path, KEY_ENV: agent.key}
        request = "protocol=https\nhost=github.com\n\n"
        results.update(
            interleaved(
                {
                    "git helper, in process": lambda i: ask(
                        "get", io.StringIO(request), io.StringIO(), io.StringIO(), env
                    ),
                    "git helper, as git runs it": lambda i: subprocess.run(
                        [sys.executable, "-m", "broker.git_credential", "get"],
                        input=request,
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    ),
                },
                15,
            )
        )
    width = max(len(k) for k in results)
    for name, row in results.items():
        print(f"{name.ljust(width)}  p50 {row['p50_ms']:8.2f} ms  p99 {row['p99_ms']:8.2f} ms")


if __name__ == "__main__":
    main()
