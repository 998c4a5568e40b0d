"""The client's reading of broker answers, its wait policy, configuration and local safety rules."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.client import _protocol as proto
from broker.client.config import ClientConfig, SessionCache, check_broker_url
from broker.client.errors import (
    ApprovalPending,
    AuthenticationError,
    ConfigurationError,
    Conflict,
    InvalidRequest,
    NotFound,
    RateLimited,
    RequestDenied,
    ServiceUnavailable,
    TaskEnded,
    TaskExpired,
)
from broker.client.models import Credential, Session, Task, describe_approval
from broker.client.process import child_env, recorded_command, redact


def answer(status: int, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.Response(
        status,
        content=json.dumps(body).encode(),
        headers={"content-type": "application/problem+json", **headers},
    )


def test_denial_carries_the_reason_and_says_not_to_retry() -> None:
    """A 403 request_denied becomes RequestDenied with the broker's reason and task id."""
    err = proto.error_for(
        answer(
            403,
            {
                "code": "request_denied",
                "detail": "the request for 'x' was denied: groups lacks 'sre'",
                "reason": "groups lacks 'sre'",
                "task_id": "tsk_1",
            },
        )
    )
    assert isinstance(err, RequestDenied)
    assert (err.reason, err.task_id, err.status) == ("groups lacks 'sre'", "tsk_1", 403)
    assert "do not retry" in str(err)


def test_rate_limit_says_when_to_retry() -> None:
    """A 429 becomes RateLimited with the Retry-After seconds (header first, then body)."""
    err = proto.error_for(
        answer(429, {"code": "rate_limited", "detail": "slow down"}, **{"Retry-After": "17"})
    )
    assert isinstance(err, RateLimited)
    assert err.retry_after == 17
    assert "retry in 17s" in str(err)
    err = proto.error_for(
        answer(429, {"code": "too_many_active_tasks", "detail": "x", "retry_after": 60})
    )
    assert isinstance(err, RateLimited)
    assert err.retry_after == 60
    assert err.as_dict()["retry_after"] == 60


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (401, {"code": "invalid_session", "detail": "session ended"}, AuthenticationError),
        (404, {"code": "unknown_task", "detail": "no such task"}, NotFound),
        (
            422,
            {"code": "invalid_parameter", "detail": "parameter 'bucket' is required"},
            InvalidRequest,
        ),
        (409, {"code": "approval_expired", "detail": "the approval has expired"}, TaskExpired),
        (409, {"code": "task_not_approved", "detail": "x", "state": "expired"}, TaskExpired),
        (409, {"code": "task_not_approved", "detail": "x", "state": "cancelled"}, TaskEnded),
        (412, {"code": "template_changed", "detail": "the scope changed"}, Conflict),
        (503, {"code": "backend_unavailable", "detail": "OpenBao is down"}, ServiceUnavailable),
    ],
)
def test_each_answer_maps_to_a_typed_error_with_a_next_step(
    status: int, body: dict[str, Any], kind: type[Exception]
) -> None:
    """Every failure family has its own exception class, the broker's public detail and a next step."""
    err = proto.error_for(answer(status, body))
    assert isinstance(err, kind)
    assert body["detail"] in err.detail
    assert err.next_step
    assert err.code == body["code"]


def test_settled_states_raise_what_happened() -> None:
    """After waiting: denied raises RequestDenied with the approver's reason; expired TaskExpired;
    cancelled TaskEnded; approved returns the task."""
    base = {"id": "tsk_1", "scope": "s"}
    assert proto.settle(Task.from_json({**base, "state": "approved"})).state == "approved"
    with pytest.raises(RequestDenied) as denied:
        proto.settle(Task.from_json({**base, "state": "denied", "reason": "not today"}))
    assert denied.value.reason == "not today"
    with pytest.raises(TaskExpired):
        proto.settle(Task.from_json({**base, "state": "expired"}))
    with pytest.raises(TaskEnded):
        proto.settle(Task.from_json({**base, "state": "cancelled"}))


def test_pending_error_names_the_approvers_and_how_to_continue() -> None:
    """ApprovalPending says who may approve, when the request expires and which command resumes."""
    task = Task.from_json(
        {
            "id": "tsk_9",
            "scope": "aws-deploy",
            "state": "pending",
            "request_expires_at": time.time() + 3600,
        }
    )
    err = ApprovalPending(task, '2 distinct approvers with groups = "sre", never the requester')
    text = str(err)
    assert 'groups = "sre"' in text
    assert "expires in 59m" in text or "expires in 1h" in text
    assert "broker status tsk_9 --wait" in text


def test_approval_rules_read_as_text() -> None:
    """An approval rule from the broker (condition sets included) becomes a readable phrase."""
    rule = {
        "mode": "manual",
        "count": 2,
        "approvers": {
            "all": [{"claim": "groups", "equals": "sre"}],
            "any": [{"claim": "sub", "glob": "alice*"}],
        },
    }
    assert describe_approval(rule) == (
        '2 distinct approvers with groups = "sre" and sub matches "alice*", never the requester'
    )
    # The broker may send the conditions already in words.
    worded = {
        "mode": "manual",
        "count": 1,
        "approvers": {"all": ["groups equals 'sre'"], "none": ["sub equals 'bot'"]},
    }
    assert describe_approval(worded) == (
        "1 approver with groups equals 'sre' and not sub equals 'bot', never the requester"
    )
    assert describe_approval({"mode": "auto"}) is None
    assert describe_approval({"mode": "manual", "count": 1}) == "1 approver, never the requester"


def test_poller_sleeps_only_when_the_broker_does_not_hold_requests() -> None:
    """A quick answer to a long-poll means no long-poll support: back off 1, 2, 4 ... 10 s; once a
    request is held, no sleep is added and the backoff resets."""
    now = [0.0]
    poller = proto.Poller(deadline=None, clock=lambda: now[0])
    assert poller.long_poll() == proto.LONG_POLL_MAX
    assert [poller.pause(25, 0.01) for _ in range(6)] == [1, 2, 4, 8, 10, 10]
    assert poller.pause(25, 25) == 0
    assert poller.pause(25, 0.01) == 1
    bounded = proto.Poller(deadline=3.0, clock=lambda: now[0])
    assert bounded.long_poll() == 3.0
    now[0] = 3.5
    assert bounded.expired()


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://broker.example.com/", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost:8080", True),
        ("http://broker.example.com", False),
        ("ftp://broker.example.com", False),
        ("https://user:pw@broker.example.com", False),
        ("broker.example.com", False),
    ],
)
def test_the_broker_url_must_protect_tokens_in_transit(url: str, ok: bool) -> None:
    """Plain http is refused except to this machine (ID tokens and secrets would travel in clear)."""
    if ok:
        assert not check_broker_url(url).endswith("/")
    else:
        with pytest.raises(ConfigurationError):
            check_broker_url(url)
    assert check_broker_url("http://10.0.0.5", allow_insecure=True) == "http://10.0.0.5"


def test_config_reads_the_environment_and_hides_the_session_token() -> None:
    """ClientConfig comes from BROKER_* variables; a bad TRACEPARENT is ignored; no token in repr."""
    cfg = ClientConfig.from_env(
        {
            "BROKER_URL": "https://b.example.com/",
            "BROKER_AUDIENCE": "aud-1",
            "BROKER_SESSION_TOKEN": "brk_sess_secretsecretsecret",
            "TRACEPARENT": "garbage",
            "BROKER_CONVERSATION_ID": "conv-7",
        }
    )
    assert (cfg.broker_url, cfg.audience, cfg.conversation_id) == (
        "https://b.example.com",
        "aud-1",
        "conv-7",
    )
    assert cfg.traceparent is None
    assert "brk_sess" not in repr(cfg)
    with pytest.raises(ConfigurationError) as err:
        ClientConfig.from_env({})
    assert "BROKER_URL" in err.value.detail


def test_session_cache_is_private_and_drops_expired_sessions(tmp_path: Path) -> None:
    """The CLI's session cache is 0600 in a 0700 folder, one entry per broker and identity;
    expired entries vanish."""
    cache = SessionCache(tmp_path / "cache" / "sessions.json")
    cache.save("https://a", Session("tok-a", time.time() + 600))
    cache.save("https://b", Session("tok-b", time.time() + 5))  # inside the 30 s margin
    assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache.path.parent).st_mode) == 0o700
    loaded = cache.load("https://a")
    assert loaded is not None
    assert loaded.token == "tok-a"
    assert cache.load("https://b") is None
    cache.forget("https://a")
    assert cache.load("https://a") is None


def cred(**env: str) -> Credential:
    return Credential.from_json(
        {
            "credential_id": "crd_1",
            "task_id": "tsk_1",
            "backend": "aws_sts",
            "kind": "aws_sts",
            "expires_at": 1_900_000_000,
            "env": env,
            "secret": {k.lower(): v for k, v in env.items() if "SECRET" in k or "TOKEN" in k},
        }
    )


def test_aws_credential_process_output() -> None:
    """An STS credential renders as the Version 1 JSON that AWS SDKs read from credential_process."""
    c = cred(
        AWS_ACCESS_KEY_ID="ASIAEXAMPLE",
        AWS_SECRET_ACCESS_KEY="s3cr3t-value",
        AWS_SESSION_TOKEN="sess-token-1",
    )
    assert c.aws_credential_process() == {
        "Version": 1,
        "AccessKeyId": "ASIAEXAMPLE",
        "SecretAccessKey": "s3cr3t-value",
        "SessionToken": "sess-token-1",
        "Expiration": "2030-03-17T17:46:40Z",
    }
    with pytest.raises(InvalidRequest):
        cred(VAULT_TOKEN="s.abcdefgh").aws_credential_process()
    assert "s3cr3t" not in repr(c)


def test_child_env_carries_the_credential_not_the_agents_identity() -> None:
    """The child gets the credential, task id and a TRACEPARENT under the task's trace; the
    agent's session token and ID token sources are removed."""
    c = cred(VAULT_ADDR="http://127.0.0.1:8200", VAULT_TOKEN="s.childtoken123")
    task = Task.from_json({"id": "tsk_1", "scope": "s", "state": "active", "trace_id": "a" * 32})
    env = child_env(
        c,
        task,
        "b" * 16,
        base={
            "PATH": "/bin",
            "BROKER_SESSION_TOKEN": "brk_sess_x",
            "BROKER_ID_TOKEN": "eyJ",
            "HOME": "/h",
        },
    )
    assert env["VAULT_TOKEN"] == "s.childtoken123"
    assert env["BROKER_TASK_ID"] == "tsk_1"
    assert env["TRACEPARENT"] == f"00-{'a' * 32}-{'b' * 16}-01"
    assert "BROKER_SESSION_TOKEN" not in env
    assert "BROKER_ID_TOKEN" not in env
    assert env["PATH"] == "/bin"


def test_recorded_commands_and_output_never_carry_the_credential() -> None:
    """Secret values are redacted from recorded command lines and returned output; addresses stay."""
    c = cred(VAULT_ADDR="http://127.0.0.1:8200", VAULT_TOKEN="s.childtoken123")
    hidden = c.secret_values()
    assert "http://127.0.0.1:8200" not in hidden
    line = recorded_command(
        ["curl", "-H", "X-Vault-Token: s.childtoken123", "http://127.0.0.1:8200"], hidden
    )
    assert line == ["curl", "-H", "X-Vault-Token: [redacted]", "http://127.0.0.1:8200"]
    assert redact("token=s.childtoken123\n", hidden) == "token=[redacted]\n"
    assert len(recorded_command(["x"] * 100, hidden)) == 65


def test_scope_parameters_read_either_listing_form() -> None:
    """Parameters from GET /v1/scopes as a JSON Schema object or as a plain mapping of specs both
    give each parameter's type and whether it is required (the CLI types -p values with them)."""
    from broker.client.models import scope_parameters

    schema = {
        "parameters": {
            "type": "object",
            "properties": {"bucket": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["bucket"],
        }
    }
    assert scope_parameters(schema) == {
        "bucket": {"type": "string", "required": True},
        "days": {"type": "integer", "required": False},
    }
    plain = {
        "parameters": {"bucket": {"type": "string"}, "days": {"type": "integer", "default": 7}}
    }
    assert scope_parameters(plain)["bucket"]["required"] is True
    assert scope_parameters(plain)["days"]["required"] is False


def test_cache_keys_separate_identities() -> None:
    """Two agents (or one agent at two brokers) never map to the same cached session; the key
    comes from the ID token's issuer and subject and holds no part of the token."""
    from broker.client.config import cache_key
    from broker.client.tokens import unverified_identity

    token = "eyJhbGciOiJFUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lzcyIsInN1YiI6ImFnZW50LTEifQ.c2ln"
    assert unverified_identity(token) == ("https://iss", "agent-1")
    assert unverified_identity("not.a-jwt.x") is None
    keys = {
        cache_key("https://b", ("https://iss", "agent-1")),
        cache_key("https://b", ("https://iss", "agent-2")),
        cache_key("https://b", ("https://other", "agent-1")),
        cache_key("https://c", ("https://iss", "agent-1")),
    }
    assert len(keys) == 4
    assert all("agent" not in k for k in keys)


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("token_expired", AuthenticationError),
        ("unknown_issuer", AuthenticationError),
        ("invalid_request", InvalidRequest),
        ("unsupported_token_type", InvalidRequest),
    ],
)
def test_a_refused_id_token_is_an_authentication_error(code: str, kind: type[Exception]) -> None:
    """RFC 8693 answers a refused ID token with 400; the client still says 'log in again', while a
    malformed exchange form stays an InvalidRequest."""
    request = httpx.Request("POST", "http://broker.test/oauth2/token")
    resp = httpx.Response(
        400, json={"code": code, "error": "invalid_request", "detail": "refused"}, request=request
    )
    assert isinstance(proto.error_for(resp), kind)
