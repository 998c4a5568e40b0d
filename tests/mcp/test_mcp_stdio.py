"""`broker mcp` over stdio, driven by the official MCP client library, against a live broker and the
real OpenBao: the tools work, no secret ever reaches the conversation, and nothing outlives it."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp import Client, StdioServerParameters

from tests.support.agent_stack import AgentStack, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("mcp"), issuer, openbao) as s:
        yield s


def server_params(stack: AgentStack, sub: str, *extra: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=sys.executable, args=["-m", "broker", "mcp", *extra], env=stack.env(sub)
    )


class Conversation:
    """Everything the agent's model would see: every tool result, as text and structure."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.transcript: list[str] = []

    async def call(self, tool: str, **arguments: Any) -> dict[str, Any]:
        result = await self.client.call_tool(tool, arguments)
        texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        self.transcript.extend(texts)
        if result.structured_content is not None:
            self.transcript.append(json.dumps(result.structured_content))
        if result.is_error:
            return {"error": " ".join(texts)}
        data = result.structured_content
        if isinstance(data, dict) and set(data) == {"result"}:
            data = data["result"]
        return data if isinstance(data, dict) else {"result": data}


def test_tools_request_run_status_complete_without_a_secret_in_the_conversation(
    stack: AgentStack, tmp_path: Path
) -> None:
    """Over stdio with the MCP client library: `scopes` lists what may be requested; `request`
    returns an approved task; `run` executes `bao`-free Python that reads the demo secret with the
    injected token (and leaks the token to a file outside the conversation, so the test knows it);
    output containing the token comes back redacted; `status` shows the task active; `complete`
    revokes the token. The token never appears in anything the conversation received."""
    leak = tmp_path / "token"
    reader = (
        "import os, httpx; "
        f"open({str(leak)!r}, 'w').write(os.environ['VAULT_TOKEN']); "
        "r = httpx.get(os.environ['VAULT_ADDR'] + '/v1/secret/data/demo/hello', "
        "headers={'X-Vault-Token': os.environ['VAULT_TOKEN']}); "
        "print(r.json()['data']['data']['value']); "
        "print('token is', os.environ['VAULT_TOKEN'])"
    )

    async def main() -> tuple[Conversation, dict[str, Any]]:
        async with Client(server_params(stack, "mcp-agent")) as client:
            convo = Conversation(client)
            tools = {t.name for t in (await client.list_tools()).tools}
            assert {"scopes", "request", "status", "run", "complete"} <= tools
            assert "reveal_credentials" not in tools

            scopes = await convo.call("scopes")
            assert "vault-kv-read" in {s["name"] for s in scopes["result"]}

            requested = await convo.call(
                "request", scope="vault-kv-read", purpose="read the demo secret via MCP"
            )
            assert requested["state"] == "approved"
            task_id = requested["task_id"]

            ran = await convo.call("run", task_id=task_id, command=[sys.executable, "-c", reader])
            assert ran["exit_code"] == 0, ran
            assert ran["stdout"].splitlines()[0] == "world"
            assert "token is [redacted]" in ran["stdout"]
            assert ran["recorded"] is True

            again = await convo.call(
                "run", task_id=task_id, command=[sys.executable, "-c", "import sys; sys.exit(5)"]
            )
            assert again["exit_code"] == 5

            status = await convo.call("status", task_id=task_id)
            assert status["state"] == "active"
            assert status["runs"] == 2
            assert status["credential_expires_at"]

            done = await convo.call("complete", task_id=task_id)
            assert done["state"] == "completed"
            return convo, ran

    convo, ran = anyio.run(main)
    token = leak.read_text()
    assert token
    assert not stack.vault_token_alive(token)
    for text in convo.transcript:
        assert token not in text
    runs = stack.events(ran["task_id"], "broker.credential.use")
    assert [r["attributes"]["broker.use.via"] for r in runs] == ["mcp", "mcp"]
    assert [r["attributes"]["broker.exec.exit_code"] for r in runs] == [0, 5]
    for run in runs:
        assert token not in json.dumps(run)


def test_run_output_is_redacted_before_it_is_cut_and_in_its_common_encodings(
    stack: AgentStack, tmp_path: Path
) -> None:
    """`run` output 32 KiB long with the token straddling the cut, then its base64 and URL
    encodings: the conversation gets neither the token, nor a prefix of it, nor an encoding,
    and is told the output was cut. A reversed token does pass: redaction is against accidents
    (documented), the command holds the credential."""
    leak = tmp_path / "token"
    limit = 32 * 1024
    printer = (
        "import base64, os, sys, urllib.parse; t = os.environ['VAULT_TOKEN']; "
        f"open({str(leak)!r}, 'w').write(t); "
        f"sys.stderr.write(base64.b64encode(t.encode()).decode() + ' ' + "
        "urllib.parse.quote(t, safe='') + ' ' + t[::-1]); "
        f"sys.stdout.write('A' * ({limit} - 6) + t + 'tail')"
    )

    async def main() -> tuple[Conversation, dict[str, Any]]:
        async with Client(server_params(stack, "mcp-redact")) as client:
            convo = Conversation(client)
            task = await convo.call("request", scope="vault-kv-read", purpose="redaction check")
            ran = await convo.call(
                "run", task_id=task["task_id"], command=[sys.executable, "-c", printer]
            )
            await convo.call("complete", task_id=task["task_id"])
            return convo, ran

    convo, ran = anyio.run(main)
    token = leak.read_text()
    assert ran["exit_code"] == 0, ran
    assert ran["truncated"] is True
    assert len(ran["stdout"]) == limit
    assert ran["stdout"].endswith("[redac")  # the marker is what the cut split
    assert ran["stderr"].count("[redacted]") == 2
    assert token[::-1] in ran["stderr"]
    for text in convo.transcript:
        assert token not in text
        assert token[:6] not in text


def test_errors_tell_the_agent_what_to_do(stack: AgentStack) -> None:
    """A pending task names its approvers and the next call; a denied scope says why; running a
    command on a pending task is refused with the way forward."""

    async def main() -> list[dict[str, Any]]:
        async with Client(server_params(stack, "mcp-waiting")) as client:
            convo = Conversation(client)
            pending = await convo.call(
                "request", scope="agent-test-manual", purpose="needs an SRE", wait_seconds=1
            )
            refused = await convo.call("run", task_id=pending["task_id"], command=["env"])
            denied = await convo.call("request", scope="agent-test-admins", purpose="not mine")
            await convo.call("complete", task_id=pending["task_id"])
            return [pending, refused, denied]

    pending, refused, denied = anyio.run(main)
    assert pending["state"] == "pending"
    assert pending["approvers"] == "1 approver with groups equals 'sre', never the requester"
    assert "status" in pending["next_step"]
    assert "approval_pending:" in refused["error"]
    assert "Next:" in refused["error"]
    assert "request_denied:" in denied["error"]
    assert "groups" in denied["error"]
    assert stack.task_state(pending["task_id"]) == "cancelled"


def test_disconnecting_completes_what_the_server_opened(stack: AgentStack, tmp_path: Path) -> None:
    """When the MCP client goes away without calling `complete`, the server completes the tasks it
    opened on its way out, so their credentials are revoked."""
    leak = tmp_path / "token"

    async def main() -> str:
        async with Client(server_params(stack, "mcp-forgetful")) as client:
            convo = Conversation(client)
            requested = await convo.call("request", scope="vault-kv-read", purpose="forget me")
            await convo.call(
                "run",
                task_id=requested["task_id"],
                command=[
                    sys.executable,
                    "-c",
                    f"import os; open({str(leak)!r}, 'w').write(os.environ['VAULT_TOKEN'])",
                ],
            )
            return str(requested["task_id"])

    task_id = anyio.run(main)
    assert stack.task_state(task_id) == "completed"
    assert not stack.vault_token_alive(leak.read_text())


def test_reveal_is_opt_in(stack: AgentStack) -> None:
    """Only with --reveal-secrets does a tool hand the credential to the conversation."""

    async def main() -> tuple[dict[str, Any], str]:
        async with Client(server_params(stack, "mcp-revealer", "--reveal-secrets")) as client:
            convo = Conversation(client)
            requested = await convo.call("request", scope="vault-kv-read", purpose="hold it myself")
            revealed = await convo.call("reveal_credentials", task_id=requested["task_id"])
            await convo.call("complete", task_id=requested["task_id"])
            return revealed, str(requested["task_id"])

    revealed, task_id = anyio.run(main)
    token = revealed["env"]["VAULT_TOKEN"]
    assert token
    assert not stack.vault_token_alive(token)
    assert stack.task_state(task_id) == "completed"


def test_a_pending_task_runs_once_a_human_approves(stack: AgentStack) -> None:
    """`status` with wait_seconds picks up an SRE's approval of a pending task; `run` then works."""

    async def main() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with Client(server_params(stack, "mcp-patient")) as client:
            convo = Conversation(client)
            pending = await convo.call(
                "request", scope="agent-test-manual", purpose="needs an SRE", wait_seconds=0
            )
            await anyio.to_thread.run_sync(stack.approve, pending["task_id"])
            status = await convo.call("status", task_id=pending["task_id"], wait_seconds=10)
            ran = await convo.call(
                "run",
                task_id=pending["task_id"],
                command=[sys.executable, "-c", "import os; print(os.environ['BROKER_TASK_ID'])"],
            )
            await convo.call("complete", task_id=pending["task_id"])
            return pending, status, ran

    pending, status, ran = anyio.run(main)
    assert pending["state"] == "pending"
    assert status["state"] == "approved"
    assert ran["exit_code"] == 0
    assert ran["stdout"].strip() == pending["task_id"]
    assert stack.task_state(pending["task_id"]) == "completed"


def test_one_conversation_keeps_its_session_and_another_reaches_nothing(
    stack: AgentStack,
) -> None:
    """Every tool call of one MCP server (request, status, run, complete) works on its task with
    one session: the request, the issuance and the run are all recorded under the same session.
    A second server of the same identity with its own session (another conversation) cannot
    read, run with or complete that task: each tool answers that there is no such task."""
    sibling_env = stack.env("mcp-steps")
    sibling_env["BROKER_SESSION_CACHE"] = str(stack.home / "mcp-sibling-sessions.json")
    sibling = StdioServerParameters(
        command=sys.executable, args=["-m", "broker", "mcp"], env=sibling_env
    )

    async def main() -> tuple[str, list[dict[str, Any]]]:
        async with Client(server_params(stack, "mcp-steps")) as client:
            convo = Conversation(client)
            pending = await convo.call(
                "request", scope="agent-test-manual", purpose="several steps", wait_seconds=0
            )
            task_id = str(pending["task_id"])
            async with Client(sibling) as other:
                intruder = Conversation(other)
                refused = [
                    await intruder.call("status", task_id=task_id),
                    await intruder.call("run", task_id=task_id, command=["true"]),
                    await intruder.call("complete", task_id=task_id),
                ]
            await anyio.to_thread.run_sync(stack.approve, task_id)
            assert (await convo.call("status", task_id=task_id, wait_seconds=10))["state"] == (
                "approved"
            )
            ran = await convo.call("run", task_id=task_id, command=["true"])
            assert ran["exit_code"] == 0, ran
            assert (await convo.call("complete", task_id=task_id))["state"] == "completed"
            return task_id, refused

    task_id, refused = anyio.run(main)
    for answer in refused:
        assert "no such task" in answer["error"], answer
    owner = {
        e["session_id"]
        for e in stack.events(task_id)
        if e["name"] in ("broker.task.request", "broker.credential.issue", "broker.credential.use")
    }
    assert len(owner) == 1 and None not in owner
    denied = stack.events(task_id, "broker.request.denied")
    assert {e["attributes"]["broker.refusal.reason"] for e in denied} == {"another_session"}
    assert {e["session_id"] for e in denied}.isdisjoint(owner)
