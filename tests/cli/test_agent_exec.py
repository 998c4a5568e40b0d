"""`broker exec` end to end: a real program (OpenBao's own `bao` CLI) uses the injected credential
against the real OpenBao; exit status passes through; the credential is revoked once it exits;
the run is an audit span."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.devstack.processes import bao_binary
from broker.store import repo
from tests.support.agent_stack import AgentStack, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("exec"), issuer, openbao) as s:
        yield s


def broker_cli(
    stack: AgentStack, *args: str, sub: str = "exec-agent", home: Path | None = None, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = stack.env(sub)
    if home is not None:
        env["HOME"] = str(home)  # bao keeps no token helper state of ours
    env["PATH"] = os.path.dirname(bao_binary()) + os.pathsep + env.get("PATH", "")
    return subprocess.run(
        [sys.executable, "-m", "broker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kw,  # type: ignore[arg-type]
    )


def test_exec_runs_bao_with_the_injected_token_and_revokes_it(
    stack: AgentStack, tmp_path: Path
) -> None:
    """`broker exec vault-kv-read -- sh -c 'bao kv get ...'`: the real bao CLI reads the demo secret
    with VAULT_ADDR/VAULT_TOKEN from its environment; the agent's own identity is not passed on;
    after the command the token is dead; the run is recorded as a broker.credential.use span
    that is the parent of the child's TRACEPARENT and carries the command, not the token."""
    seen = tmp_path / "seen"
    script = (
        "bao kv get -field=value secret/demo/hello && "
        f'printf "%s\\n%s\\n%s\\n" "$VAULT_TOKEN" "$TRACEPARENT" "${{BROKER_ID_TOKEN_FILE:-none}}" > {seen}'
    )
    done = broker_cli(
        stack,
        "exec",
        "vault-kv-read",
        "--purpose",
        "read the demo secret with bao",
        "--",
        "sh",
        "-c",
        script,
        home=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "world"
    token, traceparent, id_token_file = seen.read_text().splitlines()
    assert token.startswith(("s.", "hvs."))
    assert id_token_file == "none"
    assert not stack.vault_token_alive(token)

    _, trace_id, span_id, _ = traceparent.split("-")
    runs = [
        e
        for e in stack.broker_events_by_trace(trace_id)
        if e["name"] == "broker.credential.use"
        and e["attributes"].get("broker.use.source") == "exec"
    ]
    assert len(runs) == 1
    run = runs[0]
    assert run["span_id"] == span_id
    assert run["outcome"] == "success"
    attrs = run["attributes"]
    assert attrs["broker.exec.exit_code"] == 0
    assert attrs["broker.exec.executable"] == "sh"
    assert attrs["broker.exec.command"][:2] == ["sh", "-c"]
    assert attrs["broker.use.via"] == "cli"
    task_id = run["task_id"]
    assert stack.task_state(task_id) == "completed"
    names = [e["name"] for e in stack.events(task_id)]
    assert names.index("broker.credential.issue") < names.index("broker.credential.use")
    assert names.index("broker.credential.use") < names.index("broker.credential.revoke")
    for event in stack.events(task_id):
        assert token not in str(event)


def test_exec_redacts_the_credential_in_output_an_agent_reads(
    stack: AgentStack, tmp_path: Path
) -> None:
    """When `broker exec`'s output is not a terminal (an agent capturing it), the token and its
    base64 and URL encodings in the command's stdout and stderr become `[redacted]`, the rest
    passes byte for byte; `--no-redact` passes everything (the person asked for it)."""
    leak = tmp_path / "token"
    printer = (
        "import base64, os, sys, urllib.parse; t = os.environ['VAULT_TOKEN']; "
        f"open({str(leak)!r}, 'w').write(t); "
        "print('token', t); print('b64', base64.b64encode(t.encode()).decode()); "
        "sys.stderr.write('url ' + urllib.parse.quote(t, safe='') + '\\n')"
    )
    done = broker_cli(
        stack,
        "exec",
        "vault-kv-read",
        "--purpose",
        "redaction",
        "-q",
        "--",
        sys.executable,
        "-c",
        printer,
    )
    assert done.returncode == 0, done.stderr
    token = leak.read_text()
    assert done.stdout == "token [redacted]\nb64 [redacted]\n"
    assert "url [redacted]" in done.stderr
    assert token not in done.stdout + done.stderr
    raw = broker_cli(
        stack,
        "exec",
        "vault-kv-read",
        "--purpose",
        "no redaction",
        "-q",
        "--no-redact",
        "--",
        sys.executable,
        "-c",
        printer,
    )
    assert raw.returncode == 0, raw.stderr
    assert raw.stdout.splitlines()[0] == f"token {leak.read_text()}"


def test_exec_on_a_terminal_leaves_the_output_and_the_tty_alone(
    stack: AgentStack, tmp_path: Path
) -> None:
    """On a terminal (a person watching) `broker exec` does not pipe the command's output: the
    command still sees a TTY, and what it prints reaches the terminal unchanged."""
    import pty

    leak = tmp_path / "token"
    printer = (
        "import os, sys; t = os.environ['VAULT_TOKEN']; "
        f"open({str(leak)!r}, 'w').write(t); "
        "print('tty', sys.stdout.isatty(), sys.stderr.isatty(), 'token', t)"
    )
    env = stack.env("exec-agent")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "exec",
            "vault-kv-read",
            "--purpose",
            "on a tty",
            "-q",
            "--",
            sys.executable,
            "-c",
            printer,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=60) == 0, seen
    assert f"tty True True token {leak.read_text()}" in seen.decode()


def test_the_exit_status_passes_through_and_failure_is_recorded(
    stack: AgentStack, tmp_path: Path
) -> None:
    """A command exiting 7 makes `broker exec` exit 7; the run span says failure with exit code 7,
    and the credential is revoked all the same."""
    seen = tmp_path / "token"
    done = broker_cli(
        stack,
        "exec",
        "vault-kv-read",
        "--purpose",
        "fail on purpose",
        "--",
        "sh",
        "-c",
        f'printf %s "$VAULT_TOKEN" > {seen}; echo $BROKER_TASK_ID; exit 7',
    )
    assert done.returncode == 7, done.stderr
    task_id = done.stdout.strip()
    assert not stack.vault_token_alive(seen.read_text())
    assert stack.task_state(task_id) == "completed"
    (run,) = stack.events(task_id, "broker.credential.use")
    assert run["outcome"] == "failure"
    assert run["attributes"]["broker.exec.exit_code"] == 7


def test_sigterm_is_relayed_to_the_command_and_the_task_completed(
    stack: AgentStack, tmp_path: Path
) -> None:
    """SIGTERM to `broker exec` reaches the command; broker exits 143 like the command, records the
    signal, and revokes the credential."""
    seen = tmp_path / "token"
    child = (
        "import os, sys, time; "
        f"open({str(seen)!r}, 'w').write(os.environ['VAULT_TOKEN'] + '\\n' + os.environ['BROKER_TASK_ID']); "
        "time.sleep(60)"
    )
    env = stack.env("term-agent")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "exec",
            "vault-kv-read",
            "--purpose",
            "be terminated",
            "--",
            sys.executable,
            "-c",
            child,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (seen.exists() and "\n" in seen.read_text()):
            assert time.monotonic() < deadline, "the command never started"
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        token, task_id = seen.read_text().splitlines()
        assert stack.vault_token_alive(token)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.communicate()
    assert not stack.vault_token_alive(token)
    assert stack.task_state(task_id) == "completed"
    (run,) = stack.events(task_id, "broker.credential.use")
    assert run["attributes"]["broker.exec.signal"] == signal.SIGTERM


def test_request_prints_credentials_and_complete_revokes_them(stack: AgentStack) -> None:
    """`broker request -o json` prints the credential (and only it) on stdout; the task stays active
    until `broker complete`, which revokes it."""
    done = broker_cli(stack, "request", "vault-kv-read", "--purpose", "read by hand", "-o", "json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    token = body["credential"]["env"]["VAULT_TOKEN"]
    task_id = body["task"]["id"]
    assert stack.vault_token_alive(token)
    assert f"broker complete {task_id}" in done.stderr
    env_form = broker_cli(stack, "request", "vault-kv-read", "--purpose", "eval me", "-q")
    assert env_form.returncode == 0, env_form.stderr
    assert "export VAULT_TOKEN=" in env_form.stdout
    assert env_form.stderr == ""

    done = broker_cli(stack, "complete", task_id)
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stderr
    assert not stack.vault_token_alive(token)


def test_waiting_shows_who_may_approve_and_gives_up_cleanly(stack: AgentStack) -> None:
    """On a scope that needs an SRE, `broker exec --wait 2` shows a progress line naming the
    approver rule, exits 3 (pending) without running the command, and cancels its request."""
    done = broker_cli(
        stack,
        "exec",
        "agent-test-manual",
        "--purpose",
        "needs a human",
        "--wait",
        "2",
        "--",
        "sh",
        "-c",
        "echo should-not-run",
    )
    assert done.returncode == 3, done.stderr
    assert "should-not-run" not in done.stdout
    assert "waiting for approval of tsk_" in done.stderr
    assert "by 1 approver with groups equals 'sre', never the requester" in done.stderr
    assert "request expires in" in done.stderr
    assert "next:" in done.stderr
    task_id = done.stderr.split("waiting for approval of ")[1].split()[0]
    assert stack.task_state(task_id) == "cancelled"


def test_exec_waits_for_a_human_and_then_runs(stack: AgentStack) -> None:
    """`broker exec` on a scope that needs an SRE shows who may approve while it waits; when the
    SRE approves through the approval API, the command runs with the credential and its status
    comes back."""
    env = stack.env("waits-for-sam")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "broker",
            "exec",
            "agent-test-manual",
            "--purpose",
            "read the demo secret once approved",
            "--",
            sys.executable,
            "-c",
            "import os; print(os.environ['BROKER_TASK_ID'], bool(os.environ['VAULT_TOKEN']))",
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "waiting for approval of tsk_" in line
        assert "groups equals 'sre'" in line
        task_id = line.split("waiting for approval of ")[1].split()[0]
        stack.approve(task_id)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.split() == [task_id, "True"]
    assert stack.task_state(task_id) == "completed"


def test_no_wait_leaves_the_request_pending_with_the_way_forward(stack: AgentStack) -> None:
    """`broker request --no-wait` on a manual scope prints the task id alone on stdout (exit 0)
    and says on stderr how to continue; the task stays pending and `broker status TASK --json`
    reports it with its approvers; once approved, `broker exec --task TASK` runs with it and
    completes it."""
    done = broker_cli(
        stack, "request", "agent-test-manual", "--purpose", "later", "--no-wait", sub="patient"
    )
    assert done.returncode == 0, done.stderr
    task_id = done.stdout.strip()
    assert task_id.startswith("tsk_") and "\n" not in task_id
    assert f"broker request --task {task_id}" in done.stderr
    status = broker_cli(stack, "status", task_id, "--json", sub="patient")
    assert status.returncode == 0, status.stderr
    body = json.loads(status.stdout)
    assert body["state"] == "pending"
    assert body["approvers"] == "1 approver with groups equals 'sre', never the requester"

    # Later: the SRE approves; the agent picks the decision up and runs with that task.
    stack.approve(task_id)
    status = broker_cli(stack, "status", task_id, "--wait", "--json", sub="patient")
    assert json.loads(status.stdout)["state"] == "approved"
    done = broker_cli(
        stack, "exec", "--task", task_id, "--", "sh", "-c", 'echo "$BROKER_TASK_ID"', sub="patient"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == task_id
    assert stack.task_state(task_id) == "completed"


def test_a_multi_step_agent_keeps_its_session_and_a_sibling_reaches_nothing(
    stack: AgentStack,
) -> None:
    """One agent's separate `broker` processes reuse its cached session: `request --no-wait`,
    then (once approved) `request --task` mints the task the first process asked for and
    `complete` ends it. The same principal with another session cache (a sibling job on a
    shared image) gets "no such task" from `status`, `request --task`, `exec --task` and
    `complete`, and runs nothing. Each side opened exactly one session."""
    asked = broker_cli(
        stack, "request", "agent-test-manual", "--purpose", "step one", "--no-wait", sub="stepper"
    )
    # --no-wait opens the request and prints its id on stdout (docs/agents.md).
    assert asked.returncode == 0, asked.stderr
    task_id = asked.stdout.strip()
    assert task_id.startswith("tsk_") and f"broker request --task {task_id}" in asked.stderr
    stack.approve(task_id)

    sibling = stack.env("stepper")
    sibling["BROKER_SESSION_CACHE"] = str(stack.home / "sibling-sessions.json")
    for args in (
        ("status", task_id),
        ("request", "--task", task_id),
        ("exec", "--task", task_id, "--", "touch", str(stack.home / "sibling-ran")),
        ("complete", task_id),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "broker", *args],
            env=sibling,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0, (args, done.stdout)
        assert "no such task" in done.stderr, (args, done.stderr)
        assert "session (or CI run) that requested it" in done.stderr
    assert not (stack.home / "sibling-ran").exists()
    assert stack.task_state(task_id) == "approved"

    minted = broker_cli(stack, "request", "--task", task_id, "-o", "json", sub="stepper")
    assert minted.returncode == 0, minted.stderr
    assert json.loads(minted.stdout)["task"]["id"] == task_id
    assert broker_cli(stack, "complete", task_id, sub="stepper").returncode == 0
    assert stack.task_state(task_id) == "completed"
    with stack.broker.db.read() as conn:
        starts = repo.audit_events(conn, name="broker.session.start", subject="stepper")
    assert len(starts) == 2  # the agent's one session, and the sibling's one


def test_a_denied_exec_says_why_and_runs_nothing(stack: AgentStack, tmp_path: Path) -> None:
    """A scope the agent may not request: exit 4, the reason and the next step on stderr, and the
    command never runs."""
    marker = tmp_path / "ran"
    done = broker_cli(
        stack,
        "exec",
        "agent-test-admins",
        "--purpose",
        "not mine",
        "--",
        "touch",
        str(marker),
    )
    assert done.returncode == 4, done.stderr
    assert "denied" in done.stderr
    assert "next:" in done.stderr
    assert not marker.exists()


def test_login_status_and_tasks(stack: AgentStack) -> None:
    """`broker login` names the identity and token source; `broker status` shows the session and
    open tasks; `broker tasks --json` lists the agent's tasks."""
    login = broker_cli(stack, "login", sub="lister")
    assert login.returncode == 0, login.stderr
    assert "logged in as lister" in login.stderr
    assert "token file" in login.stderr
    requested = broker_cli(
        stack, "request", "vault-kv-read", "--purpose", "list me", "-o", "json", sub="lister"
    )
    task_id = json.loads(requested.stdout)["task"]["id"]
    status = broker_cli(stack, "status", sub="lister")
    assert status.returncode == 0, status.stderr
    assert "lister" in status.stdout
    assert task_id in status.stdout
    listed = broker_cli(stack, "tasks", "--json", sub="lister")
    assert listed.returncode == 0, listed.stderr
    assert task_id in {t["id"] for t in json.loads(listed.stdout)}
    broker_cli(stack, "complete", task_id, sub="lister")
    shown = broker_cli(stack, "tasks", "show", task_id, sub="lister")
    assert "completed" in shown.stdout


def test_agents_sharing_a_session_cache_keep_their_own_sessions(stack: AgentStack) -> None:
    """Two agent identities with one cache file (one home on a shared runner) each get their own
    session: the cache is keyed by the ID token's identity, never by the broker URL alone."""
    shared = str(stack.home / "shared-sessions.json")
    for sub in ("runner-job-a", "runner-job-b", "runner-job-a"):
        env = stack.env(sub)
        env["BROKER_SESSION_CACHE"] = shared
        done = subprocess.run(
            [sys.executable, "-m", "broker", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["subject"] == sub


def test_credential_process_refuses_a_non_aws_scope_before_asking(stack: AgentStack) -> None:
    """`-o credential-process` on a Vault scope is a usage error (exit 2) and no task is opened,
    so no credential exists that nobody would use."""
    done = broker_cli(
        stack,
        "request",
        "vault-kv-read",
        "--purpose",
        "x",
        "-o",
        "credential-process",
        sub="aws-ish",
    )
    assert done.returncode == 2, done.stderr
    assert "not an AWS scope" in done.stderr
    assert done.stdout == ""
    listed = broker_cli(stack, "tasks", "--json", sub="aws-ish")
    assert json.loads(listed.stdout) == []


def test_sigterm_while_waiting_withdraws_the_request(stack: AgentStack) -> None:
    """`broker request` killed with SIGTERM while it waits for an approver withdraws its request
    (nobody is waiting for it any more) and exits 143."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "broker", "request", "agent-test-manual", "--purpose", "then quit"],
        env=stack.env("quitter"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        task_id = line.split("waiting for approval of ")[1].split()[0]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
        proc.communicate()
    assert stack.task_state(task_id) == "cancelled"
