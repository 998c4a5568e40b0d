"""The git credential helper and its per-run agent, piece by piece (the end-to-end run with real
git is tests/cli/test_agent_exec_github.py)."""

from __future__ import annotations

import io
import json
import os
import stat

from broker.git_credential import KEY_ENV, SOCKET_ENV, CredentialAgent, GitTarget, ask, git_targets

TARGET = GitTarget.parse("https://github.com", "x-access-token")


def test_the_agent_answers_only_its_key_and_its_host() -> None:
    """The right key and github.com: the token; a wrong key, another host, another scheme, a
    store/erase or garbage: nothing (and each is recorded, except what failed the key)."""
    agent = CredentialAgent("ghs_secret", [TARGET])

    def ask_agent(**req: str) -> dict[str, str]:
        return agent.answer(json.dumps({"key": agent.key, **req}).encode())

    good = ask_agent(operation="get", protocol="https", host="github.com", path="o/r.git")
    assert good == {"username": "x-access-token", "password": "ghs_secret"}
    assert ask_agent(operation="get", protocol="https", host="github.com.evil", path="") == {}
    assert ask_agent(operation="get", protocol="http", host="github.com", path="") == {}
    assert ask_agent(operation="erase", protocol="https", host="github.com", path="o/r.git") == {}
    wrong = json.dumps(
        {"key": "nope", "operation": "get", "protocol": "https", "host": "github.com"}
    )
    assert agent.answer(wrong.encode()) == {}
    assert agent.answer(b"not json") == {}
    assert [(u["operation"], u["host"], u["outcome"]) for u in agent.uses] == [
        ("get", "github.com", "served"),
        ("get", "github.com.evil", "refused"),
        ("get", "github.com", "refused"),
        ("erase", "github.com", "rejected"),
    ]


def test_the_child_s_git_config_comes_from_the_environment_only() -> None:
    """GIT_CONFIG_* entries follow any the caller already set: an empty helper for the URL (it
    drops helpers from config files), then this helper, then useHttpPath."""
    base = {"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "core.editor", "GIT_CONFIG_VALUE_0": "vi"}
    with CredentialAgent("ghs_secret", [TARGET]) as agent:
        env = agent.child_env(base, ["/usr/bin/python3", "-m", "broker.git_credential"])
    assert env["GIT_CONFIG_COUNT"] == "4"
    assert env["GIT_CONFIG_KEY_0"] == "core.editor"
    assert [(env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"]) for i in (1, 2, 3)] == [
        ("credential.https://github.com.helper", ""),
        ("credential.https://github.com.helper", "!/usr/bin/python3 -m broker.git_credential"),
        ("credential.https://github.com.useHttpPath", "true"),
    ]
    assert "ghs_secret" not in json.dumps(env)


def test_the_helper_speaks_git_s_protocol_through_a_private_socket() -> None:
    """`get` with git's key=value lines reaches the agent over its socket (in a 0700 folder)
    and prints username/password; `store` prints nothing; the socket is gone after stop()."""
    with CredentialAgent("ghs_secret", [TARGET]) as agent:
        folder = os.path.dirname(agent.socket_path)
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
        env = {SOCKET_ENV: agent.socket_path, KEY_ENV: agent.key}
        out, err = io.StringIO(), io.StringIO()
        request = "protocol=https\nhost=github.com\npath=o/r.git\n\n"
        assert ask("get", io.StringIO(request), out, err, env) == 0
        assert out.getvalue() == "username=x-access-token\npassword=ghs_secret\n"
        out = io.StringIO()
        assert ask("store", io.StringIO(request + "password=ghs_secret\n"), out, err, env) == 0
        assert out.getvalue() == ""
        assert [u["outcome"] for u in agent.uses] == ["served", "accepted"]
    assert not os.path.exists(folder)


def test_misuse_is_answered_plainly() -> None:
    """An unknown operation exits 2; an oversized request from git is refused unread; without
    a broker exec parent the helper says so on stderr and gives nothing."""
    err = io.StringIO()
    assert ask("approve", io.StringIO(""), io.StringIO(), err, {}) == 2
    out = io.StringIO()
    assert ask("get", io.StringIO("x" * 70_000), out, io.StringIO(), {}) == 0
    assert out.getvalue() == ""
    err = io.StringIO()
    assert ask("get", io.StringIO("protocol=https\n\n"), io.StringIO(), err, {}) == 0
    assert "broker exec" in err.getvalue()


def test_targets_come_from_the_credential_s_injection_details() -> None:
    """details.inject.git names where the secret may go; credentials without it get no helper."""
    details = {
        "inject": {
            "secret": "token",
            "git": [{"url": "https://ghe.example.com/", "username": "x-access-token"}],
        }
    }
    (target,) = git_targets(details)
    assert (target.url, target.username) == ("https://ghe.example.com", "x-access-token")
    assert git_targets({}) == []
    assert git_targets({"inject": {"git": "nonsense"}}) == []
