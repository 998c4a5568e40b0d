"""The Python client against a live broker and the real OpenBao: one block, one credential, revoked."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.client import (
    ApprovalPending,
    AsyncBrokerClient,
    BrokerClient,
    ClientConfig,
    FileIdToken,
    Grant,
    NotFound,
    RateLimited,
    RequestDenied,
    SessionCache,
    TaskExpired,
    credentials,
)
from broker.client._protocol import WaitStatus
from tests.support.agent_stack import AgentStack, ShiftedClock, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("sdk"), issuer, openbao) as s:
        yield s


def read_demo(stack: AgentStack, grant: Grant) -> object:
    with stack.openbao.client(grant.env["VAULT_TOKEN"]) as bao:
        return bao.get("/v1/secret/data/demo/hello").json()["data"]["data"]["value"]


def test_one_block_gets_a_working_credential_and_revokes_it(
    stack: AgentStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`with credentials(scope, purpose=...)` configured only by the environment yields a real
    OpenBao token that reads the demo secret; when the block ends the task is completed and
    OpenBao rejects the token."""
    for key, value in stack.env("sdk-agent").items():
        monkeypatch.setenv(key, value)
    with credentials("vault-kv-read", purpose="read the demo secret") as grant:
        assert read_demo(stack, grant) == "world"
        token = grant.env["VAULT_TOKEN"]
        assert grant.env["VAULT_ADDR"] == stack.openbao.addr
        assert grant.expires_at is not None
        assert grant.expires_at > time.time()
        assert token not in repr(grant)
        task_id = grant.task.id
    assert stack.task_state(task_id) == "completed"
    assert not stack.vault_token_alive(token)


def test_an_exception_in_the_block_still_revokes(stack: AgentStack) -> None:
    """An exception inside the block propagates unchanged, and the credential is revoked first."""
    held: dict[str, str] = {}

    def use_then_fail(client: BrokerClient) -> None:
        with client.task("vault-kv-read", purpose="fail half-way") as grant:
            held.update(token=grant.env["VAULT_TOKEN"], task=grant.task.id)
            assert stack.vault_token_alive(held["token"])
            raise ZeroDivisionError

    with stack.client() as client, pytest.raises(ZeroDivisionError):
        use_then_fail(client)
    assert stack.task_state(held["task"]) == "completed"
    assert not stack.vault_token_alive(held["token"])


def test_sigterm_in_the_block_revokes_and_exits_143(stack: AgentStack, tmp_path: Path) -> None:
    """A process killed with SIGTERM while holding a credential completes its task first and exits
    with status 143 (128 + SIGTERM)."""
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, sys, time
            from broker.client import credentials
            with credentials("vault-kv-read", purpose="wait to be killed") as grant:
                print(json.dumps({"task": grant.task.id, "token": grant.env["VAULT_TOKEN"]}), flush=True)
                time.sleep(60)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        env=stack.env("sigterm-agent"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        held = json.loads(proc.stdout.readline())
        assert stack.vault_token_alive(held["token"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 143
    finally:
        proc.kill()
    assert stack.task_state(held["task"]) == "completed"
    assert not stack.vault_token_alive(held["token"])


def test_the_async_client_holds_and_revokes(stack: AgentStack) -> None:
    """`async with client.task(...)` gives the same guarantees as the sync form."""

    async def main() -> tuple[str, str]:
        config = ClientConfig(broker_url=stack.url, timeout=20)
        source = FileIdToken(stack.token_file("async-agent"))
        async with (
            AsyncBrokerClient(config, id_token_source=source) as client,
            client.task("vault-kv-read", purpose="async read") as grant,
        ):
            assert read_demo(stack, grant) == "world"
            me = await client.whoami()
            assert me.subject == "async-agent"
            return grant.task.id, grant.env["VAULT_TOKEN"]

    task_id, token = asyncio.run(main())
    assert stack.task_state(task_id) == "completed"
    assert not stack.vault_token_alive(token)


def test_a_denial_says_why(stack: AgentStack) -> None:
    """A scope the agent's claims do not allow raises RequestDenied with the broker's reason and
    advice not to retry as is; nothing is minted."""
    with (
        stack.client("plain-agent", groups=["developers"]) as client,
        pytest.raises(RequestDenied) as err,
    ):
        client.request_task("agent-test-admins", purpose="try an admin scope")
    assert err.value.reason
    assert "groups" in err.value.reason
    assert err.value.task_id
    assert "do not retry" in str(err.value)
    assert stack.task_state(err.value.task_id) == "denied"


def test_pending_names_the_approvers_and_the_block_cancels_its_request(stack: AgentStack) -> None:
    """Waiting on a manual scope reports who may approve through on_wait and in ApprovalPending;
    a `with` block that never started cancels its pending task on the way out."""
    seen: list[WaitStatus] = []
    with (
        stack.client("waiting-agent") as client,
        pytest.raises(ApprovalPending) as err,
        client.task(
            "agent-test-manual", purpose="needs an SRE", wait_timeout=1.5, on_wait=seen.append
        ),
    ):
        pytest.fail("the block must not start without an approval")
    pending = err.value
    assert pending.task.scope == "agent-test-manual"
    assert seen
    assert seen[0].task.id == pending.task.id
    assert pending.approvers == "1 approver with groups equals 'sre', never the requester"
    assert pending.cancelled
    assert "request again" in str(pending.next_step)
    assert stack.task_state(pending.task.id) == "cancelled"


def test_waiting_ends_when_a_human_approves(stack: AgentStack) -> None:
    """The client waits (long-poll) while a task is pending and returns it approved as soon as an
    SRE approves through the approval API; the minted token works and dies on completion."""
    with stack.client("approved-agent") as client:
        task = client.request_task("agent-test-manual", purpose="wait for my approver")
        assert task.pending
        approver = threading.Timer(0.5, stack.approve, args=(task.id,))
        approver.start()
        try:
            approved = client.wait(task, timeout=30)
        finally:
            approver.join()
        assert approved.state == "approved"
        credential = client.mint(approved.id)
        assert stack.vault_token_alive(credential.env["VAULT_TOKEN"])
        client.complete(approved.id)
        assert not stack.vault_token_alive(credential.env["VAULT_TOKEN"])


def test_too_many_open_tasks_is_rate_limited_with_a_retry_time(stack: AgentStack) -> None:
    """Past a scope's open-task quota the client raises RateLimited with when to retry."""
    with stack.client("busy-agent") as client:
        first = client.request_task("agent-test-single", purpose="the one allowed")
        try:
            with pytest.raises(RateLimited) as err:
                client.request_task("agent-test-single", purpose="one too many")
            assert err.value.retry_after > 0
            assert "retry in" in str(err.value)
        finally:
            client.complete(first.id)


def test_an_expired_approval_is_reported_as_expired(
    tmp_path: Path, issuer: TestIssuer, openbao: OpenBao
) -> None:
    """An approval not used within the scope's approval_ttl (300 s here) cannot mint: the client
    raises TaskExpired and advises a new task."""
    clock = ShiftedClock()
    with agent_stack(tmp_path, issuer, openbao, clock=clock) as late, late.client("late") as client:
        task = client.request_task("agent-test-manual", purpose="come back too late")
        late.approve(task.id)
        assert client.get_task(task.id).state == "approved"
        clock.offset = 400
        with pytest.raises(TaskExpired) as err:
            client.mint(task.id)
    assert "new task" in str(err.value.next_step)


def test_a_session_ended_elsewhere_is_renewed_transparently(stack: AgentStack) -> None:
    """When the broker refuses the session (ended or expired), the client exchanges its ID token
    again once and carries on."""
    source = FileIdToken(stack.token_file("renew-agent"))
    with BrokerClient(ClientConfig(broker_url=stack.url), id_token_source=source) as client:
        first = client.login()
        # End the session behind the client's back: its next call gets a 401.
        gone = httpx.delete(
            f"{stack.url}/v1/sessions/current",
            headers={"Authorization": f"Bearer {first.token}"},
        )
        assert gone.status_code == 204
        me = client.whoami()
        assert me.subject == "renew-agent"
        assert client.login().token != first.token


def test_steps_across_clients_keep_one_session_and_a_sibling_reaches_nothing(
    stack: AgentStack,
) -> None:
    """An agent asks in one client, and a second client of the same agent (another process,
    the same session cache) resumes the task once approved: one session serves both. A client of
    the same identity with its own session (a sibling job) gets ``NotFound`` for the task, its
    listing does not show it, and it cannot complete it; the task is completed by its owner."""
    with stack.client("stepwise") as first:
        task = first.request_task("agent-test-manual", purpose="in two steps")
        session = first.login()
    stack.approve(task.id)
    with stack.client("stepwise") as second:
        assert second.login().token == session.token
        with second.resume(task.id, wait_timeout=30) as grant:
            assert read_demo(stack, grant) == "world"
            sibling = BrokerClient(
                ClientConfig(broker_url=stack.url, timeout=20),
                id_token_source=FileIdToken(stack.token_file("stepwise")),
                session_cache=SessionCache(stack.home / "sibling-sdk.json"),
            )
            with sibling:
                assert sibling.login().token != session.token
                assert task.id not in {t.id for t in sibling.tasks()}
                for step in (sibling.get_task, sibling.mint, sibling.complete):
                    with pytest.raises(NotFound):
                        step(task.id)
            assert stack.task_state(task.id) == "active"
    assert stack.task_state(task.id) == "completed"
