"""`broker exec` with a GitHub App token end to end: the broker mints it from the GitHub contract
stand-in (GitHub's OpenAPI description under prism), and real `git` clones and pushes over
HTTP to a git server of the tests' own that accepts exactly that token, through
`broker git-credential`, with nothing written to disk; the helper's uses are audit spans."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.settings import GitHubAppSettings
from tests.backends.github_helpers import app_key
from tests.support.agent_stack import REPO, AgentStack, agent_stack
from tests.support.git_http import GitHttpServer, bare_repository, git
from tests.support.github_contract import EXAMPLE_TOKEN, GitHubStandIn
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

REPOSITORY = "octo-org/Hello-World.git"


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("git-root")
    bare_repository(root, REPOSITORY, tmp_path_factory.mktemp("git-seed"))
    with GitHttpServer(root, "x-access-token", EXAMPLE_TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    issuer: TestIssuer,
    openbao: OpenBao,
    github_api: GitHubStandIn,
    git_server: GitHttpServer,
) -> Iterator[AgentStack]:
    home = tmp_path_factory.mktemp("exec-github")
    (home / "scopes").mkdir()
    shutil.copy(REPO / "scopes" / "github-pull-request.yaml", home / "scopes")
    key_file, _ = app_key(home)
    github = GitHubAppSettings(
        app_id=12345, private_key_file=key_file, api_url=github_api.url, git_url=git_server.url
    )
    with agent_stack(home, issuer, openbao, github=github) as s:
        yield s


def run_exec(
    stack: AgentStack, home: Path, script: str, *, cwd: Path
) -> subprocess.CompletedProcess[str]:
    env = stack.env("git-agent", groups=["agents"])
    env.update(
        {
            "HOME": str(home),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "agent",
            "GIT_AUTHOR_EMAIL": "agent@example.com",
            "GIT_COMMITTER_NAME": "agent",
            "GIT_COMMITTER_EMAIL": "agent@example.com",
        }
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "exec",
            "github-pull-request",
            "-p",
            "repo=Hello-World",
            "--purpose",
            "push a fix branch",
            "--",
            "sh",
            "-c",
            script,
        ],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def files_containing(root: Path, needle: str) -> list[Path]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and needle.encode() in path.read_bytes():
            found.append(path)
    return found


def test_git_clones_and_pushes_with_the_task_s_token_and_nothing_on_disk(
    stack: AgentStack, git_server: GitHttpServer, tmp_path: Path
) -> None:
    """Under `broker exec github-pull-request`, git clones and pushes a branch: the server saw
    Basic auth with x-access-token and exactly the minted token, the branch arrived, GH_TOKEN and
    GITHUB_TOKEN carried the token, and a `credential.helper = store` in the user's own
    ~/.gitconfig was bypassed: no file under HOME or the clone holds the token. The task is then
    completed and the token revoked (DELETE answered by the stand-in); the helper's get and
    git's store verdict are broker.credential.use spans under the run's span."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[credential]\n\thelper = store\n")
    work = tmp_path / "work"
    work.mkdir()
    url = f"{git_server.url}/{REPOSITORY}"
    script = (
        f"git clone -q {url} repo && cd repo && git checkout -q -b agent/fix && "
        "echo fixed > FIX.md && git add FIX.md && git commit -q -m fix && "
        "git push -q origin agent/fix && "
        'test "$GH_TOKEN" = "$GITHUB_TOKEN" && printf %s "$GH_TOKEN" > ../gh-token'
    )
    git_server.seen.clear()
    done = run_exec(stack, home, script, cwd=work)
    assert done.returncode == 0, done.stderr

    authed = [s for s in git_server.seen if s[4] != 401]
    assert authed, git_server.seen
    assert {(user, password) for _, _, user, password, _ in authed} == {
        ("x-access-token", EXAMPLE_TOKEN)
    }
    assert any(method == "POST" and "git-receive-pack" in path for method, path, *_ in authed)
    branches = git("branch", "--list", cwd=git_server.root / REPOSITORY)
    assert "agent/fix" in branches
    assert (work / "gh-token").read_text() == EXAMPLE_TOKEN
    (work / "gh-token").unlink()
    assert not (home / ".git-credentials").exists()
    assert files_containing(home, EXAMPLE_TOKEN) == []
    assert files_containing(work, EXAMPLE_TOKEN) == []

    events = stack.broker_events_by_trace(_trace_of_last_run(stack))
    runs = [e for e in events if (e["attributes"] or {}).get("broker.use.source") == "exec"]
    assert len(runs) == 1
    uses = [
        e for e in events if (e["attributes"] or {}).get("broker.use.source") == "git_credential"
    ]
    ops = [
        (u["attributes"]["broker.git.operation"], u["attributes"]["broker.git.outcome"])
        for u in uses
    ]
    assert ("get", "served") in ops
    assert ("store", "accepted") in ops
    host = git_server.url.removeprefix("http://")
    for use in uses:
        assert use["parent_span_id"] == runs[0]["span_id"]
        assert use["attributes"]["broker.git.host"] == host
        assert use["attributes"]["broker.git.path"] == REPOSITORY
    task = runs[0]["task_id"]
    assert stack.task_state(task) == "completed"
    (cred,) = stack.credentials(task)
    assert cred.state.value == "revoked"
    assert cred.sealed is None
    assert cred.details["hashed_token"] == cred.handle
    for event in stack.events(task):
        assert EXAMPLE_TOKEN not in str(event)


def _trace_of_last_run(stack: AgentStack) -> str:
    from broker.store import repo

    with stack.broker.db.read() as conn:
        events = repo.audit_events(conn, name="broker.credential.use", limit=100_000)
    runs = [e for e in events if (e["attributes"] or {}).get("broker.use.source") == "exec"]
    return str(max(runs, key=lambda e: e["time"])["trace_id"])


def test_the_helper_serves_only_the_credential_s_own_host(
    stack: AgentStack, git_server: GitHttpServer, tmp_path: Path
) -> None:
    """The same server named as localhost instead of 127.0.0.1 is another URL: the helper is not
    installed for it and the agent would refuse it, so git gets no token and fails with 401;
    asked directly (a process under `broker exec` calling the helper by hand for another host),
    the agent answers nothing and records a refused use."""
    home = tmp_path / "home"
    home.mkdir()
    other = git_server.url.replace("127.0.0.1", "localhost") + f"/{REPOSITORY}"
    script = (
        f"git ls-remote {other} >/dev/null 2>&1; echo ls=$? > out; "
        "printf 'protocol=http\\nhost=evil.example\\npath=x\\n\\n' | "
        f"{sys.executable} -m broker.git_credential get >> out"
    )
    git_server.seen.clear()
    done = run_exec(stack, home, script, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = (tmp_path / "out").read_text()
    assert out.startswith("ls=")
    assert out.strip() != "ls=0"
    assert "password" not in out
    assert all(password is None for _, _, _, password, _ in git_server.seen)
    events = stack.broker_events_by_trace(_trace_of_last_run(stack))
    refused = [
        e["attributes"]
        for e in events
        if (e["attributes"] or {}).get("broker.git.outcome") == "refused"
    ]
    assert [(a["broker.git.host"], a["broker.git.operation"]) for a in refused] == [
        ("evil.example", "get")
    ]


def test_outside_broker_exec_the_helper_has_nothing_to_give(tmp_path: Path) -> None:
    """`broker git-credential get` without a broker exec parent prints no credential and tells
    the user why on stderr (git then prompts or fails as without a helper)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    done = subprocess.run(
        [sys.executable, "-m", "broker", "git-credential", "get"],
        input="protocol=https\nhost=github.com\n\n",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert done.stdout == ""
    assert "broker exec" in done.stderr
