"""`POST /v1/tasks/{id}/exec`: an agent's report of a run becomes a `broker.credential.use` span of
the task's trace (over OTLP), and every report the broker refuses is refused safely and audited."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.client import BrokerClient, Credential, Task
from broker.settings import OtlpSettings
from tests.support.agent_stack import AgentStack, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("runs"), issuer, openbao) as s:
        yield s


def minted(client: BrokerClient) -> tuple[Task, Credential]:
    task = client.request_task("vault-kv-read", purpose="run something")
    return task, client.mint(task.id)


def report(stack: AgentStack, client: BrokerClient, task_id: str, **body: Any) -> httpx.Response:
    values: dict[str, Any] = {
        "command": ["make", "deploy"],
        "exit_code": 0,
        "started_at": time.time() - 2,
        "ended_at": time.time(),
        "via": "sdk",
    }
    values.update(body)
    token = client.login().token
    return httpx.post(
        f"{stack.url}/v1/tasks/{task_id}/exec",
        json=values,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_a_run_is_exported_as_a_child_span_of_its_task(
    tmp_path: Path, issuer: TestIssuer, openbao: OpenBao, otlp: OtlpReceiver
) -> None:
    """The reported run reaches the OTLP collector as `broker.credential.use`, in the task's trace,
    child of the task's request span, with the span id the agent chose (the one its process got in
    TRACEPARENT), the command, the exit code and the times the agent measured."""
    exported = OtlpSettings(endpoint=otlp.endpoint, interval=0.05)
    with (
        agent_stack(tmp_path, issuer, openbao, otlp=exported) as stack,
        stack.client("reporter") as client,
    ):
        task, cred = minted(client)
        span_id = secrets.token_hex(8)
        started = time.time() - 3
        resp = report(
            stack, client, task.id, span_id=span_id, started_at=started, credential_id=cred.id
        )
        assert resp.status_code == 201, resp.text
        assert resp.json()["span_id"] == span_id
        assert resp.json()["trace_id"] == task.trace_id
        client.complete(task.id)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(s.span_id == span_id for s in otlp.spans):
        time.sleep(0.05)
    (span,) = [s for s in otlp.spans if s.span_id == span_id]
    (request_span,) = [
        s
        for s in otlp.spans
        if s.name == "broker.task.request" and s.attributes.get("broker.task.id") == task.id
    ]
    assert span.name == "broker.credential.use"
    assert span.trace_id == task.trace_id
    assert span.parent_span_id == request_span.span_id
    assert span.attributes["broker.use.source"] == "exec"
    assert span.attributes["broker.exec.command"] == ["make", "deploy"]
    assert span.attributes["broker.exec.exit_code"] == 0
    assert span.attributes["broker.credential.id"] == cred.id
    assert abs(span.start_ns / 1e9 - started) < 0.01


def test_a_retried_report_is_one_event(stack: AgentStack) -> None:
    """The same report sent twice (same span id) is recorded once and answered the same way."""
    with stack.client("retrier") as client:
        task, _ = minted(client)
        span_id = secrets.token_hex(8)
        first = report(stack, client, task.id, span_id=span_id)
        second = report(stack, client, task.id, span_id=span_id)
        assert first.status_code == second.status_code == 201
        assert first.json()["event_id"] == second.json()["event_id"]
        assert len(stack.events(task.id, "broker.credential.use")) == 1
        client.complete(task.id)


def test_impossible_times_are_clamped_and_marked(stack: AgentStack) -> None:
    """Times the broker knows to be impossible (before the credential existed, in the future)
    are clamped to what is possible, and the span says so."""
    with stack.client("clock-skewed") as client:
        task, cred = minted(client)
        resp = report(stack, client, task.id, started_at=1_000_000.0, ended_at=time.time() + 86_400)
        assert resp.status_code == 201, resp.text
        (event,) = stack.events(task.id, "broker.credential.use")
        assert event["attributes"]["broker.exec.times_clamped"] is True
        assert event["time"] >= (cred.issued_at or 0) - 60
        assert event["end_time"] <= time.time() + 1
        client.complete(task.id)


def test_reports_the_broker_refuses_are_audited(stack: AgentStack) -> None:
    """Another principal's task looks like no task (404); a task without a credential cannot
    have been used (409); both refusals are audited and record nothing else."""
    with stack.client("owner") as owner, stack.client("intruder") as intruder:
        task, _ = minted(owner)
        resp = report(stack, intruder, task.id)
        assert (resp.status_code, resp.json()["code"]) == (404, "unknown_task")
        assert resp.headers["content-type"].startswith("application/problem+json")
        pending = owner.request_task("agent-test-manual", purpose="not minted yet")
        resp = report(stack, owner, pending.id)
        assert (resp.status_code, resp.json()["code"]) == (409, "no_credential")
        owner.complete(task.id)
        owner.complete(pending.id)
    assert stack.events(task.id, "broker.credential.use") == []
    with stack.broker.db.read() as conn:
        from broker.store import repo

        refusals = [
            e["attributes"]
            for e in repo.audit_events(conn, name="broker.request.denied", limit=100)
            if e["attributes"].get("broker.request.kind") == "exec_report"
        ]
    assert {(r["broker.request.task_id"], r["broker.refusal.code"]) for r in refusals} == {
        (task.id, "unknown_task"),
        (pending.id, "no_credential"),
    }


@pytest.mark.parametrize(
    "body",
    [
        {"exit_code": 0, "signal": 15},
        {"exit_code": None, "signal": None},
        {"exit_code": 300},
        {"span_id": "0" * 16},
        {"span_id": "not-hex"},
        {"command": []},
        {"started_at": 10.0, "ended_at": 5.0},
        {"via": "shell"},
        {"surprise": True},
    ],
)
def test_malformed_reports_are_422_and_record_nothing(
    stack: AgentStack, body: dict[str, Any]
) -> None:
    """A report that does not fit the schema is a 422 problem, never a 5xx, and records nothing."""
    with stack.client("sloppy") as client:
        task, _ = minted(client)
        resp = report(stack, client, task.id, **body)
        assert resp.status_code == 422, resp.text
        assert resp.json()["code"] == "validation_failed"
        assert stack.events(task.id, "broker.credential.use") == []
        client.complete(task.id)


def git_use(**overrides: Any) -> dict[str, Any]:
    use = {
        "source": "git_credential",
        "at": time.time() - 1,
        "operation": "get",
        "protocol": "https",
        "host": "github.com",
        "path": "octo-org/Hello-World.git",
        "outcome": "served",
    }
    use.update(overrides)
    return use


def test_tool_uses_become_child_spans_of_the_run(stack: AgentStack) -> None:
    """Uses a run's tools report (the git credential helper's) are recorded as
    broker.credential.use events under the run's span, with host, path and git's verdict; a
    replayed report does not record them twice."""
    with stack.client("tool-uses") as client:
        task, cred = minted(client)
        span_id = secrets.token_hex(8)
        uses = [git_use(), git_use(operation="store", outcome="accepted")]
        for _ in range(2):
            resp = report(stack, client, task.id, span_id=span_id, uses=uses)
            assert resp.status_code == 201, resp.text
        recorded = [
            e
            for e in stack.events(task.id, "broker.credential.use")
            if e["attributes"].get("broker.use.source") == "git_credential"
        ]
        assert sorted(e["attributes"]["broker.git.operation"] for e in recorded) == [
            "get",
            "store",
        ]
        assert {e["parent_span_id"] for e in recorded} == {span_id}
        assert {e["credential_id"] for e in recorded} == {cred.id}
        client.complete(task.id)


@pytest.mark.parametrize(
    "uses",
    [
        [git_use()] * 101,
        [git_use(source="curl")],
        [git_use(operation="approve")],
        [git_use(host="h" * 256)],
    ],
)
def test_malformed_tool_uses_are_refused(stack: AgentStack, uses: list[dict[str, Any]]) -> None:
    """More than 100 uses, an unknown source or operation, an overlong host: 422 problem+json,
    nothing recorded."""
    with stack.client("tool-uses-bad") as client:
        task, _ = minted(client)
        resp = report(stack, client, task.id, uses=uses)
        assert resp.status_code == 422
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert stack.events(task.id, "broker.credential.use") == []
        client.complete(task.id)
