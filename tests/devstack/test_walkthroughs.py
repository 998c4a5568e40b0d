"""The per-role walkthroughs in docs/ run as written against `broker dev` (real OpenBao, moto and
PostgreSQL), so the pages and the broker cannot drift apart.

Each page's ```sh blocks are taken out of the markdown, in order, and run in one bash session
(``set -euo pipefail``) from a copy of the repository's scope folder, exactly as a reader would
run them after ``./scripts/dev``. A line ending in ``# exits N`` must exit with N (the pages show
refusals and checks that fail on purpose); every other command must succeed. Each test also
checks that the outcome the page describes is in the output.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.devstack.processes import free_port

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
_FENCE = re.compile(r"^```(\w*)\s*$")
_EXITS = re.compile(r"^(?P<cmd>.*?)\s+#\s*exits\s+(?P<code>\d+)\b.*$")
_HEREDOC = re.compile(r"<<-?\s*'?\"?(?P<word>[A-Za-z_]+)'?\"?")


def shell_blocks(markdown: str) -> list[str]:
    """The bodies of the page's ```sh blocks, in order (other fenced blocks are output)."""
    blocks: list[str] = []
    current: list[str] | None = None
    other = False
    for line in markdown.splitlines():
        fence = _FENCE.match(line)
        if current is None and not other and fence:
            if fence.group(1) in ("sh", "bash"):
                current = []
            else:
                other = True
            continue
        if line.startswith("```"):
            if current is not None:
                blocks.append("\n".join(current))
            current, other = None, False
            continue
        if current is not None:
            current.append(line)
    return blocks


def script_of(markdown: str) -> str:
    """One bash script running every shell block; ``# exits N`` lines assert their status."""
    lines = ["set -euo pipefail"]
    for number, block in enumerate(shell_blocks(markdown), start=1):
        lines.append(f"printf '\\n### block {number}\\n' >&2")
        lines.extend(_expect_statuses(block))
    return "\n".join(lines) + "\n"


def _expect_statuses(block: str) -> list[str]:
    out: list[str] = []
    logical: list[str] = []
    heredoc: str | None = None
    for line in block.splitlines():
        if heredoc is not None:
            out.append(line)
            if line.strip() == heredoc:
                heredoc = None
            continue
        logical.append(line)
        if line.endswith("\\"):
            continue
        command = "\n".join(logical)
        logical = []
        found = _HEREDOC.search(command)
        if found:
            heredoc = found.group("word")
        expected = _EXITS.match(command.replace("\\\n", " "))
        if expected and heredoc is None:
            cmd, code = expected.group("cmd"), expected.group("code")
            out.append(
                f'set +e; {cmd}; rc=$?; set -e; if [ "$rc" -ne {code} ]; then '
                f"echo 'expected exit {code}, got '$rc': {cmd.strip()[:80]}' >&2; exit 1; fi"
            )
        else:
            out.append(command)
    return out


@dataclass
class DevStack:
    root: Path
    process: subprocess.Popen[bytes]
    env: dict[str, str]


def _clean_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BROKER_", "VAULT_", "AWS_"))}
    env["HOME"] = str(home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


@pytest.fixture(scope="module")
def dev_stack(tmp_path_factory: pytest.TempPathFactory, pg_admin_ok: None) -> Iterator[DevStack]:
    """`broker dev` started as a reader would, in a folder holding a copy of the scopes."""
    root = tmp_path_factory.mktemp("walkthrough")
    shutil.copytree(REPO / "scopes", root / "scopes")
    home = root / "home"
    home.mkdir()
    env = _clean_env(home)
    ports = [free_port() for _ in range(4)]
    log = (root / "broker-dev.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "dev",
            "--port",
            str(ports[0]),
            "--openbao-port",
            str(ports[1]),
            "--moto-port",
            str(ports[2]),
            "--issuer-port",
            str(ports[3]),
        ],
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    env_file = root / ".dev" / "env"
    deadline = time.monotonic() + 180
    try:
        while not env_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    "broker dev did not become ready: "
                    + (root / "broker-dev.log").read_text(errors="replace")[-3000:]
                )
            time.sleep(0.2)
        yield DevStack(root, process, env)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def run_page(stack: DevStack, page: str) -> str:
    """Run a page's shell blocks; returns everything they printed (stdout and stderr)."""
    script = stack.root / f"{Path(page).stem}.sh"
    script.write_text(script_of((DOCS / page).read_text()))
    done = subprocess.run(
        ["bash", str(script)],
        cwd=stack.root,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, in the order a reader would see it
        text=True,
        timeout=900,
        check=False,
    )
    output = done.stdout
    assert done.returncode == 0, f"{page} failed as written:\n{output[-6000:]}"
    return output


def test_the_script_runs_every_shell_block_and_checks_expected_failures(tmp_path: Path) -> None:
    """Only sh blocks run; heredocs stay verbatim; a continued line ending in `# exits N` must
    exit with exactly N: the script passes when it does and fails when it does not."""
    page = (
        "intro\n```sh\nsh -c 'exit 3' \\\n  --   # exits 3\necho after\n```\n"
        "```text\necho never-run\n```\n"
        "```sh\ncat > f <<'EOF'\nliteral # exits 9\nEOF\ncat f\n```\n"
    )
    script = script_of(page)
    assert "never-run" not in script
    ok = subprocess.run(
        ["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["after", "literal # exits 9"]
    assert ok.stderr.count("### block") == 2
    wrong = subprocess.run(
        ["bash", "-c", script_of(page.replace("exit 3", "exit 2"))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert wrong.returncode == 1 and "expected exit 3, got 2" in wrong.stderr


def test_the_admin_page_adds_a_scope_end_to_end(dev_stack: DevStack) -> None:
    """docs/admin.md: lint and tests pass; `scopes check --live` names the missing OpenBao policy
    and the token role that does not allow it; an agent is told the scope is misconfigured (exit 9)
    while /readyz shows the cause; once created, check passes and the agent reads the secret."""
    out = run_page(dev_stack, "admin.md")
    assert "MISSING  OpenBao/Vault has the ACL policy 'kv-team-payments'" in out
    assert (
        "MISSING  the broker's token role 'broker-child' allows the policy 'kv-team-payments'"
        in out
    )
    assert "the scope 'vault-kv-team' is misconfigured at its backend" in out
    assert '"vault-kv-team"' in out and "no policy named 'kv-team-payments'" in out
    last = out.rsplit("### block", 1)[-1]
    assert "payments-team" in last, "the agent did not read the secret"


def test_the_approver_page_decides_from_the_cli(dev_stack: DevStack) -> None:
    """docs/approver.md: the approver signs in once, lists, shows and approves; an identity
    without the role is refused with not_an_approver (exit 4); the agent then uses the approved
    task against the real PostgreSQL (two rows in demo.items)."""
    out = run_page(dev_stack, "approver.md")
    assert re.search(r"^tsk_\S+  approved$", out, re.MULTILINE)
    assert "not_an_approver" in out
    assert re.search(r"^2$", out, re.MULTILINE), "the agent's query did not run"
    assert "nothing waits for you" in out


def test_the_auditor_page_follows_exports_and_verifies_offline(dev_stack: DevStack) -> None:
    """docs/auditor.md: the trace shows the request, issuance, use, revocation and end; the
    task's export verifies with no other flag (and with the broker's published keys); one edited
    byte makes it TAMPERED, naming the edited event."""
    out = run_page(dev_stack, "auditor.md")
    assert "REQUEST  agent-9" in out and "ISSUE" in out and "REVOKE" in out
    assert "OK: " in out and "a filtered export (task=" in out
    assert "TAMPERED" in out
    assert re.search(r"edited\s+seq \d+ \(evt_\S+\) broker\.task\.request", out)


def test_a_template_that_fails_to_load_is_shown_in_the_dev_terminal(dev_stack: DevStack) -> None:
    """Saving a broken template makes `broker dev` say so in its own terminal (file, line,
    field, the did-you-mean), and fixing it makes it say the file loads again."""
    log = dev_stack.root / "broker-dev.log"
    path = dev_stack.root / "scopes" / "typo-scope.yaml"
    good = (
        (REPO / "scopes" / "vault-kv-read.yaml")
        .read_text()
        .replace("name: vault-kv-read", "name: typo-scope")
    )
    assert "policies:" in good
    path.write_text(good.replace("policies:", "polices:", 1))

    def wait_for(text: str) -> str:
        deadline = time.monotonic() + 30
        while True:
            seen = log.read_text(errors="replace")
            if text in seen:
                return seen
            assert time.monotonic() < deadline, f"{text!r} never appeared:\n{seen[-2000:]}"
            time.sleep(0.1)

    seen = wait_for("scopes: typo-scope.yaml was refused; the broker does not serve it:")
    assert "unknown field 'polices'; did you mean 'policies'?" in seen
    path.write_text(good)
    wait_for("scopes: typo-scope.yaml loads again")
    path.unlink()
