"""One sign-in for every command group, against a live broker over real HTTP.

An ID token command that counts its own runs proves the point of the session cache: after one
`broker login`, the agent's, approver's, auditor's and admin's commands all use the cached
session without running the command again, until the broker ends the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.agent_stack import AgentStack, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

COUNTING_COMMAND = 'echo run >> "$2"; cat "$1"'


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("signin"), issuer, openbao) as s:
        yield s


class Person:
    """Someone whose ID token comes from a command that records every time it runs."""

    def __init__(self, stack: AgentStack, home: Path, sub: str, **claims: object) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.token = home / "id-token"
        self.token.write_text(stack.issuer.token(sub, ttl=3600, **claims))
        self.runs = home / "runs"
        self.cache = home / "sessions.json"
        base = {k: v for k, v in stack.env(sub).items() if not k.startswith("BROKER_ID_TOKEN")}
        self.env = {
            **base,
            "BROKER_ID_TOKEN_COMMAND": f"sh -c '{COUNTING_COMMAND}' sh {self.token} {self.runs}",
            "BROKER_SESSION_CACHE": str(self.cache),
        }

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "broker", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    @property
    def command_runs(self) -> int:
        return len(self.runs.read_text().splitlines()) if self.runs.exists() else 0


def test_every_command_group_uses_one_cached_session(stack: AgentStack, tmp_path: Path) -> None:
    """After `broker login` (the token command runs once), `status`, `approvals list`,
    `audit search` and `scopes check --live` all answer with the cached session: the command
    does not run again. The cache entry remembers whose session it is. When the broker ends the
    session, the next command signs in again by itself (the command runs a second time)."""
    ops = Person(
        stack,
        tmp_path / "ops",
        "ops-olga",
        groups=["sre"],
        broker_roles=["agent", "approver", "auditor", "admin"],
    )
    assert ops.run("login").returncode == 0
    assert ops.command_runs == 1
    for args in (
        ("status",),
        ("approvals", "list"),
        ("audit", "search", "--limit", "3"),
        ("scopes", "check", "--live", "--scope", "vault-kv-read"),
    ):
        done = ops.run(*args)
        assert done.returncode == 0, (args, done.stderr)
        assert ops.command_runs == 1, f"{args} ran the token command again"
    entries = json.loads(ops.cache.read_text())
    assert [e["identity"] for e in entries.values()] == [[stack.issuer.url, "ops-olga"]]

    (token,) = (e["token"] for e in entries.values())
    ended = httpx.delete(
        f"{stack.url}/v1/sessions/current", headers={"Authorization": f"Bearer {token}"}
    )
    assert ended.status_code in (200, 204), ended.text
    done = ops.run("status", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["subject"] == "ops-olga"
    assert ops.command_runs == 2


def test_a_missing_role_is_said_plainly(stack: AgentStack, tmp_path: Path) -> None:
    """An agent who runs the approver's or auditor's commands is refused (exit 4) with the
    broker's detail and code, and told where roles come from."""
    agent = Person(stack, tmp_path / "agent", "agent-only", broker_roles=["agent"])
    for args, code in (
        (("approvals", "list"), "not_an_approver"),
        (("audit", "search"), "auditor_role_required"),
    ):
        done = agent.run(*args)
        assert done.returncode == 4, (args, done.stderr)
        assert code in done.stderr
        assert "next: roles come from your ID token's claims" in done.stderr
    assert agent.command_runs == 1  # the second command reused the first one's session


def test_an_id_token_file_or_a_session_token_work_for_every_group(
    stack: AgentStack, tmp_path: Path
) -> None:
    """`--id-token-file` and `--token` are accepted by the approver's and auditor's commands
    as by the agent's (the same options everywhere)."""
    auditor = Person(stack, tmp_path / "aud", "aud-ann", broker_roles=["auditor"])
    env = {k: v for k, v in auditor.env.items() if k != "BROKER_ID_TOKEN_COMMAND"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "audit",
            "search",
            "--id-token-file",
            str(auditor.token),
            "--json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert isinstance(json.loads(done.stdout), list)
    session = json.loads(auditor.cache.read_text())
    (token,) = (e["token"] for e in session.values())
    again = subprocess.run(
        [sys.executable, "-m", "broker", "audit", "status", "--token", token, "--json"],
        env={**env, "BROKER_SESSION_CACHE": str(tmp_path / "none.json")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "head" in json.loads(again.stdout)
    assert os.environ.get("BROKER_SESSION_TOKEN") is None
