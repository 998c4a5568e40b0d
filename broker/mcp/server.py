"""The broker as MCP tools over stdio: request, status, run, complete (and scopes).

The conversation never sees a secret by default. Credentials are minted into this server's
memory and handed only to the processes that ``run`` starts (as environment variables, exactly
like ``broker exec``); tools return ids, states, approvers and expiry times. Output of those
processes is returned with every credential value (and its base64 and URL encodings) redacted as
it streams, before it is cut to size. That guards against accidents only: the process holds the
credential and can print it transformed (see ``broker.client.redact``). ``--reveal-secrets``
adds a ``reveal_credentials`` tool for agents that must hold a credential themselves.

When the MCP client disconnects (stdin closes) or the server gets SIGTERM/SIGHUP, every task this
server opened and did not complete is completed, so its credentials are revoked.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

import broker
from broker.client import (
    AsyncBrokerClient,
    BrokerClientError,
    ClientConfig,
    Conflict,
    Credential,
    SessionCache,
    Task,
)
from broker.client.process import child_env, new_span_id, recorded_command, run
from broker.git_credential import agent_for

log = logging.getLogger("broker.mcp")

T = TypeVar("T")

INSTRUCTIONS = """\
Short-lived credentials for one task at a time, from the credential broker.
1. `scopes` lists what you may request, with parameters and who approves.
2. `request` asks for a scope with a one-sentence purpose; it returns a task id and its state
   (approved, or pending with the approvers to ask).
3. `run` runs a command with the task's credential in its environment (VAULT_TOKEN, AWS_*,
   PG*, ...). You never see the credential; the command does.
4. `complete` ends the task and revokes its credential as soon as you are done.
"""

#: Most output returned from one run, per stream.
MAX_OUTPUT = 32 * 1024
#: Longest a run may take before it is killed.
MAX_RUN_SECONDS = 3600.0
#: Longest one tool call waits for an approver (MCP clients time out long calls).
MAX_WAIT_SECONDS = 120.0


@dataclass
class Held:
    """A task this server opened or used, and its credential when minted here."""

    task: Task
    credential: Credential | None = field(default=None, repr=False)
    runs: int = 0
    completed: bool = False


class Holder:
    """The tasks and credentials of this server process."""

    def __init__(self) -> None:
        self.tasks: dict[str, Held] = {}

    def track(self, task: Task) -> Held:
        held = self.tasks.get(task.id)
        if held is None:
            held = self.tasks[task.id] = Held(task)
        else:
            held.task = task
        return held

    async def complete_all(self, client: AsyncBrokerClient) -> list[str]:
        """Complete every task still open here; returns their ids."""
        done = []
        for task_id, held in list(self.tasks.items()):
            if held.completed or held.task.terminal:
                continue
            try:
                await client.complete(task_id)
            except Conflict:
                pass  # already ended on the broker
            except BrokerClientError as exc:
                log.warning("could not complete task %s on shutdown: %s", task_id, exc.detail)
                continue
            held.completed = True
            held.credential = None
            done.append(task_id)
        return done


def _tool_error(exc: BrokerClientError) -> ToolError:
    text = f"{exc.code}: {exc.detail}"
    if exc.next_step:
        text += f". Next: {exc.next_step}"
    return ToolError(text)


async def _call(pending: Awaitable[T]) -> T:
    """Await a client call; its typed error becomes a tool error the agent can act on."""
    try:
        return await pending
    except BrokerClientError as exc:
        raise _tool_error(exc) from None


def _summary(task: Task, held: Held | None, approvers: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task_id": task.id,
        "scope": task.scope,
        "state": task.state,
        "purpose": task.purpose,
    }
    if task.params:
        out["params"] = task.params
    if task.pending:
        out["approvers"] = approvers or "named by the scope's approval rule"
        out["request_expires_at"] = task.request_expires_at
        out["next_step"] = (
            f"ask {out['approvers']} to approve {task.id}, then call `status` with wait_seconds"
        )
    elif task.state == "approved":
        out["approval_expires_at"] = task.approval_expires_at
        out["next_step"] = "call `run` with a command; the credential is minted on first use"
    elif task.state == "active":
        out["credential_expires_at"] = task.ends_at
        if held is not None and held.credential is not None:
            out["credential_id"] = held.credential.id
            out["credential_expires_at"] = held.credential.expires_at
            out["next_step"] = "call `run` again as needed, then `complete` when done"
    elif task.state == "denied":
        out["reason"] = task.reason
        out["next_step"] = "do not retry the same request; read the reason"
    elif task.state == "failed":
        out["reason"] = task.reason
        out["next_step"] = "no credential was issued; tell the scope's owner, or request anew"
    pending = [c.get("id") for c in task.revoke_pending]
    if pending:
        out["revoke_pending"] = pending
        out["warning"] = "not revoked yet: the broker keeps retrying until it is revoked or expires"
    if held is not None:
        out["runs"] = held.runs
    return out


class BrokerTools:
    """The tools, bound to one client and one :class:`Holder`."""

    def __init__(self, client: AsyncBrokerClient, holder: Holder) -> None:
        self.client = client
        self.holder = holder

    async def scopes(self) -> list[dict[str, Any]]:
        listed = await _call(self.client.scopes())
        keep = ("name", "description", "backend", "risk", "parameters", "ttl", "approval")
        return [{k: s[k] for k in keep if k in s} for s in listed]

    async def request(
        self,
        scope: str,
        purpose: str,
        params: dict[str, Any] | None = None,
        ttl_seconds: int | None = None,
        wait_seconds: float = 30.0,
    ) -> dict[str, Any]:
        task = await _call(
            self.client.request_task(scope, purpose=purpose, params=params, ttl=ttl_seconds)
        )
        held = self.holder.track(task)
        held.task = task = await self._settle(task, wait_seconds)
        return await self._summary(task)

    async def status(self, task_id: str, wait_seconds: float = 0.0) -> dict[str, Any]:
        task = await _call(self.client.get_task(task_id))
        if task.pending and wait_seconds > 0:
            task = await self._settle(task, wait_seconds)
        held = self.holder.tasks.get(task.id)
        if held is not None:
            held.task = task
        return await self._summary(task)

    async def run(
        self,
        task_id: str,
        command: list[str],
        cwd: str | None = None,
        timeout_seconds: float = 300.0,
    ) -> dict[str, Any]:
        if not command or not command[0]:
            raise ToolError("invalid_request: command is an argv list, e.g. ['env']")
        held, credential = await self._credential(task_id)
        span_id = new_span_id()
        base = child_env(credential, held.task, span_id)
        timeout = max(1.0, min(float(timeout_seconds), MAX_RUN_SECONDS))
        hidden = credential.secret_values()
        # As under `broker exec`: git gets the token through `broker git-credential`.
        with agent_for(credential.secret, credential.details, base) as (env, agent):
            result = await anyio.to_thread.run_sync(
                lambda: run(
                    command,
                    env,
                    span_id=span_id,
                    cwd=cwd,
                    capture=True,
                    timeout=timeout,
                    max_output=MAX_OUTPUT,
                    # Redacted while streaming, before the cut to MAX_OUTPUT.
                    secret_values=hidden,
                )
            )
        uses = [{"source": "git_credential", **use} for use in agent.uses] if agent else []
        held.runs += 1
        recorded = True
        try:
            await self.client.report_run(
                task_id,
                command=recorded_command(command, hidden),
                exit_code=result.exit_code,
                signal=result.signal,
                started_at=result.started_at,
                ended_at=result.ended_at,
                credential_id=credential.id,
                span_id=span_id,
                via="mcp",
                uses=uses or None,
            )
        except BrokerClientError as exc:
            log.warning("run of task %s not recorded: %s", task_id, exc.detail)
            recorded = False
        return {
            "task_id": task_id,
            "credential_id": credential.id,
            "credential_expires_at": credential.expires_at,
            "exit_code": result.exit_code,
            "signal": result.signal,
            "timed_out": result.timed_out,
            "stdout": result.stdout or "",
            "stderr": result.stderr or "",
            "truncated": result.truncated,
            "recorded": recorded,
        }

    async def complete(self, task_id: str) -> dict[str, Any]:
        task = await _call(self.client.complete(task_id))
        held = self.holder.track(task)
        held.credential = None
        held.completed = True
        out: dict[str, Any] = {"task_id": task.id, "state": task.state, "runs": held.runs}
        pending = [c.get("id") for c in task.revoke_pending]
        if pending:
            out["revoke_pending"] = pending
            out["warning"] = (
                "not revoked yet: the broker keeps retrying until it is revoked or expires"
            )
        return out

    async def reveal_credentials(self, task_id: str) -> dict[str, Any]:
        _, credential = await self._credential(task_id)
        return {
            "task_id": task_id,
            "credential_id": credential.id,
            "expires_at": credential.expires_at,
            "env": credential.env,
        }

    # --- helpers ----------------------------------------------------------------------------

    async def _settle(self, task: Task, wait_seconds: float) -> Task:
        """Wait for a decision up to ``wait_seconds``; a denial or expiry is an answer, not an error."""
        deadline = time.monotonic() + max(0.0, min(float(wait_seconds), MAX_WAIT_SECONDS))
        task_id = task.id
        while task.pending and time.monotonic() < deadline:
            wait = max(1.0, deadline - time.monotonic())
            task = await _call(self.client.get_task(task_id, wait=wait))
            if task.pending and time.monotonic() < deadline:
                await anyio.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        return task

    async def _summary(self, task: Task) -> dict[str, Any]:
        approvers = await self.client.approvers(task) if task.pending else None
        return _summary(task, self.holder.tasks.get(task.id), approvers)

    async def _credential(self, task_id: str) -> tuple[Held, Credential]:
        """The credential held for ``task_id``, minted here on first use."""
        task = await _call(self.client.get_task(task_id))
        held = self.holder.track(task)
        if held.credential is not None:
            expires = held.credential.expires_at
            if task.state == "active" and (expires is None or expires > time.time()):
                return held, held.credential
            held.credential = None
            raise ToolError(
                f"task_ended: the credential of {task_id} is no longer valid "
                f"(task {task.state}). Next: request a new task"
            )
        if task.pending:
            approvers = await self.client.approvers(task)
            raise ToolError(
                f"approval_pending: task {task_id} waits for {approvers or 'an approver'}. "
                "Next: ask them, then call `status` with wait_seconds"
            )
        if task.state == "active":
            raise ToolError(
                f"already_issued: the credential of {task_id} was issued to another process "
                "and is shown once. Next: request a new task here"
            )
        if task.state != "approved":
            raise ToolError(f"task_ended: task {task_id} is {task.state}. Next: request a new task")
        credential = await _call(self.client.mint(task_id))
        held.credential = credential
        held.task = await _call(self.client.get_task(task_id))
        return held, credential


def build_server(
    client: AsyncBrokerClient,
    *,
    holder: Holder | None = None,
    reveal_secrets: bool = False,
) -> MCPServer:
    """The MCP server for one agent identity (``client``)."""
    tools = BrokerTools(client, holder or Holder())
    server: MCPServer = MCPServer(
        name="broker",
        instructions=INSTRUCTIONS,
        version=broker.__version__,
        log_level="WARNING",
    )
    server.add_tool(
        tools.scopes,
        name="scopes",
        description="The scopes you may request: description, parameters, TTL and approval rule.",
    )
    server.add_tool(
        tools.request,
        name="request",
        description=(
            "Request a scope for one task. `purpose` is one sentence an approver will read. "
            "Waits up to wait_seconds for approval; returns the task id, its state and, when "
            "pending, who may approve. Never returns a secret."
        ),
    )
    server.add_tool(
        tools.status,
        name="status",
        description=(
            "A task's state (pending, approved, active, denied, expired, completed...), "
            "approvers and expiry. With wait_seconds, waits for a pending task's decision."
        ),
    )
    server.add_tool(
        tools.run,
        name="run",
        description=(
            "Run a command (argv list, no shell) with the task's credential in its environment "
            "only. Returns exit code and output (each stream at most 32 KiB) with credential "
            "values and their base64/URL encodings redacted, against accidents only: the "
            "command itself can read and transform its environment. The first run "
            "mints the credential."
        ),
    )
    server.add_tool(
        tools.complete,
        name="complete",
        description="End the task now: its credential is revoked. Call it as soon as you are done.",
    )
    if reveal_secrets:
        server.add_tool(
            tools.reveal_credentials,
            name="reveal_credentials",
            description=(
                "Return the task's credential as environment variables INTO THE CONVERSATION. "
                "Prefer `run`: a revealed secret stays in the transcript."
            ),
        )
    return server


def serve(
    config: ClientConfig, session_cache: SessionCache | None, *, reveal_secrets: bool = False
) -> None:
    """Run the MCP server on stdio until the client disconnects or a termination signal arrives."""

    async def main() -> None:
        holder = Holder()
        async with AsyncBrokerClient(config, session_cache=session_cache) as client:
            server = build_server(client, holder=holder, reveal_secrets=reveal_secrets)
            try:
                async with anyio.create_task_group() as tg:

                    async def stop_on_signal() -> None:
                        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                            async for _ in signals:
                                tg.cancel_scope.cancel()
                                return

                    tg.start_soon(stop_on_signal)
                    await server.run_stdio_async()
                    tg.cancel_scope.cancel()
            finally:
                with anyio.CancelScope(shield=True):
                    await holder.complete_all(client)

    anyio.run(main)
