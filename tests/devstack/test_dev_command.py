"""`broker dev` starts the whole stack within 60 s, every URL answers, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from broker.devstack.processes import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def read_env(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def descendants(pid: int) -> set[int]:
    """Every process whose ancestry includes ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] != "Z":
                out.add(pid)
        except (ProcessLookupError, FileNotFoundError):
            continue
    return out


def test_broker_dev_up_answers_and_stops_clean(tmp_path: Path) -> None:
    """The one-command stack: ready in time, URLs in the env file answer, a token flows, SIGINT cleans up."""
    env_file = tmp_path / "env"
    ports = [free_port() for _ in range(4)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    started = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "dev",
            "--env-file",
            str(env_file),
            "--state-dir",
            str(tmp_path / "state"),
            "--scopes",
            str(REPO / "scopes"),
            "--port",
            str(ports[0]),
            "--openbao-port",
            str(ports[1]),
            "--moto-port",
            str(ports[2]),
            "--issuer-port",
            str(ports[3]),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        while not env_file.exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() - started < 60, "broker dev was not ready within 60 s"
            time.sleep(0.1)
        urls = read_env(env_file)
        for key in ("BROKER_URL", "VAULT_ADDR", "AWS_ENDPOINT_URL", "OIDC_ISSUER_URL"):
            assert key in urls
        assert httpx.get(urls["BROKER_URL"] + "/readyz").json()["status"] == "ready"
        assert httpx.get(urls["VAULT_ADDR"] + "/v1/sys/health").status_code == 200
        assert httpx.get(urls["AWS_ENDPOINT_URL"] + "/moto-api/").status_code == 200
        discovery = httpx.get(urls["OIDC_ISSUER_URL"] + "/.well-known/openid-configuration").json()
        assert discovery["issuer"] == urls["OIDC_ISSUER_URL"]
        # The console signs people in at the dev issuer's sign-in page.
        login = httpx.get(urls["BROKER_CONSOLE_URL"] + "/login")
        assert login.status_code == 303
        assert login.headers["location"].startswith(urls["OIDC_ISSUER_URL"] + "/authorize?")

        token = subprocess.run(
            [
                sys.executable,
                "-m",
                "broker",
                "dev",
                "token",
                "--sub",
                "ci-agent",
                "--claim",
                "team=platform",
                "--issuer",
                urls["OIDC_ISSUER_URL"],
            ],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        ).stdout
        assert token.count("\n") == 1 and token.count(".") == 2  # the token alone on stdout
        resp = httpx.post(
            urls["BROKER_URL"] + "/oauth2/token",
            data={
                "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                "subject_token": token.strip(),
            },
        )
        assert resp.status_code == 200, resp.text

        children = descendants(proc.pid)
        assert len(children) >= 4
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(children), "processes of the stack were left behind"
    assert not env_file.exists()
