"""Agent commands: ``broker login``, ``request``, ``exec``, ``status``, ``tasks``, ``complete``, ``mcp``.

Configuration comes from the environment, as for the Python client (``BROKER_URL``, the ID token
source; see docs/agents.md). The CLI keeps its session in a ``0600`` cache file
(``BROKER_SESSION_CACHE``, default ``~/.cache/broker/sessions.json``) so consecutive commands
share one session. Human output goes to standard error; standard output carries only what a
command is asked to produce (credentials, JSON), so it can be piped or ``eval``-ed.

Exit status: the command's own for ``exec`` once it ran; otherwise 0 success, 1 other error,
2 usage or configuration, 3 still pending approval, 4 denied or forbidden, 5 expired or ended,
6 rate-limited, 7 broker unreachable or unavailable, 8 authentication refused.
"""

from __future__ import annotations

import json
import shlex
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TextIO

import typer

from broker.cli import signin
from broker.cli.output import Json, Quiet, emit_json, facts, note, table
from broker.cli.signin import EXIT_DENIED, EXIT_USAGE, Url

if TYPE_CHECKING:  # the client pulls in httpx; each command imports it when it runs
    from broker.client._protocol import WaitStatus
    from broker.client.errors import BrokerClientError
    from broker.client.models import Credential, Grant, Task
    from broker.client.sync import BrokerClient

OPEN_STATES = ["pending", "approved", "active"]

tasks_app = typer.Typer(
    help="Your tasks: `broker tasks` lists them, `broker tasks show ID` shows one.",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode=None,
)

# --- shared options ------------------------------------------------------------------------

ScopeParams = Annotated[
    list[str] | None,
    typer.Option(
        "--param",
        "-p",
        help="A scope parameter as key=value (typed per the scope) or key:=JSON; repeat for more.",
    ),
]
Purpose = Annotated[
    str | None,
    typer.Option(
        "--purpose", help="What the credential is for, in one sentence (approvers read it)."
    ),
]
Ttl = Annotated[
    int | None, typer.Option("--ttl", help="Credential lifetime in seconds (capped by the scope).")
]
Wait = Annotated[
    float | None,
    typer.Option(
        "--wait",
        help="Wait at most this many seconds for an approver (default: until the request expires).",
    ),
]
NoWait = Annotated[
    bool,
    typer.Option(
        "--no-wait", help="Only open the request: print its task id and do not wait or mint."
    ),
]
TaskOpt = Annotated[
    str | None,
    typer.Option("--task", help="Use this earlier task (from `broker request --no-wait`)."),
]
JsonOut = Json


def _say(message: str, *, quiet: bool = False) -> None:
    note(f"broker: {message}", quiet=quiet)


def _fail(exc: BrokerClientError) -> NoReturn:
    signin.report(exc)


_errors = signin.errors


def _config(url: str | None = None) -> Any:
    from broker.client.config import ClientConfig

    return ClientConfig.from_env(broker_url=signin.broker_url(url))


def _client(url: str | None = None) -> BrokerClient:
    return signin.client(url)


def _when(ts: float | None) -> str:
    from broker.client.errors import format_duration

    if ts is None:
        return "-"
    left = ts - time.time()
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%SZ")
    return f"{stamp} (in {format_duration(left)})" if left > 0 else f"{stamp} (passed)"


def _parse_params(items: list[str] | None, scope: dict[str, Any] | None) -> dict[str, Any]:
    """``key=value`` typed by the scope's declared parameter type, or ``key:=JSON`` verbatim."""
    from broker.client.errors import InvalidRequest
    from broker.client.models import scope_parameters

    declared = scope_parameters(scope or {})
    out: dict[str, Any] = {}
    for item in items or []:
        if ":=" in item.split("=", 1)[0] + "=":
            key, _, raw = item.partition(":=")
            try:
                out[key] = json.loads(raw)
            except json.JSONDecodeError:
                raise InvalidRequest(
                    f"-p {key}:= takes JSON, got {raw[:40]!r}",
                    next_step="quote JSON strings: -p name:='\"text\"'",
                ) from None
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InvalidRequest(
                f"-p takes key=value, not {item!r}", next_step="write -p bucket=my-bucket"
            )
        kind = (declared.get(key) or {}).get("type", "string")
        if kind == "integer":
            try:
                out[key] = int(value)
            except ValueError:
                raise InvalidRequest(f"parameter {key!r} must be an integer") from None
        elif kind == "boolean":
            if value.lower() not in ("true", "false"):
                raise InvalidRequest(f"parameter {key!r} must be true or false")
            out[key] = value.lower() == "true"
        else:
            out[key] = value
    return out


def _scope_info(client: BrokerClient, name: str) -> dict[str, Any] | None:
    from broker.client.errors import BrokerClientError

    try:
        for scope in client.scopes():
            if scope.get("name") == name:
                return scope
    except BrokerClientError:
        return None  # the broker validates anyway; typing the values is a convenience
    return None


# --- waiting for approvers -----------------------------------------------------------------


class Progress:
    """Shows who may approve while a task waits: a live line on a terminal, a note every 30 s elsewhere."""

    FRAMES = "|/-\\"

    def __init__(self, stream: TextIO | None = None, *, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.status: WaitStatus | None = None
        self._since = time.monotonic()
        self._printed_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def line(self, frame: str = "") -> str:
        from broker.client.errors import format_duration

        status = self.status
        if status is None:
            return ""
        task = status.task
        who = status.approvers or "an approver named by the scope's approval rule"
        waited = format_duration(time.monotonic() - self._since)
        text = f"{frame}{' ' if frame else ''}waiting for approval of {task.id} ({task.scope}) by {who}; {waited}"
        if task.request_expires_at:
            text += f", request expires in {format_duration(task.request_expires_at - time.time())}"
        return text

    def __call__(self, status: WaitStatus) -> None:
        if self.quiet:
            return
        first = self.status is None
        self.status = status
        if first:
            self._since = time.monotonic() - status.waited
            if self.tty:
                self._thread = threading.Thread(target=self._spin, daemon=True)
                self._thread.start()
            else:
                self._print(self.line())
        elif not self.tty and time.monotonic() - self._printed_at >= 30:
            self._print(self.line())

    def _print(self, text: str) -> None:
        self._printed_at = time.monotonic()
        self.stream.write(f"broker: {text}\n")
        self.stream.flush()

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.25):
            self.stream.write("\r\x1b[K" + self.line(self.FRAMES[i % len(self.FRAMES)]))
            self.stream.flush()
            i += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self.stream.write("\r\x1b[K")
            self.stream.flush()


@contextmanager
def _progress(quiet: bool) -> Iterator[Progress]:
    progress = Progress(quiet=quiet)
    try:
        yield progress
    finally:
        progress.close()


def _wait_timeout(wait: float | None, no_wait: bool) -> float | None:
    from broker.client.errors import InvalidRequest

    if no_wait:
        return 0.0
    if wait is not None and wait < 0:
        raise InvalidRequest("--wait takes a number of seconds >= 0")
    return wait


# --- login / logout ------------------------------------------------------------------------


def login(
    force: Annotated[
        bool, typer.Option(help="Exchange a fresh ID token even if a session is cached.")
    ] = True,
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Exchange your ID token for a broker session (cached for the next commands)."""
    with _errors(), _client(url) as client:
        session = client.login(force=force)
        me = client.whoami()
        source = client.id_token_source().description
        if as_json:
            emit_json(
                {
                    "issuer": me.issuer,
                    "subject": me.subject,
                    "display_name": me.display_name,
                    "groups": me.groups,
                    "roles": me.roles,
                    "session_id": me.session_id,
                    "expires_at": session.expires_at,
                    "id_token_source": source,
                }
            )
            return
        roles = ", ".join(me.roles) or "none"
        note(
            f"logged in as {me.subject} ({me.issuer}) with {source}; roles: {roles}; "
            f"session ends {_when(session.expires_at)}",
            quiet=quiet,
        )


def logout(url: Url = None, as_json: JsonOut = False, quiet: Quiet = False) -> None:
    """End the session: its open tasks are completed and their credentials revoked."""
    with _errors(), _client(url) as client:
        client.logout()
    if as_json:
        emit_json({"logged_out": True})
    note("logged out", quiet=quiet)


# --- request -------------------------------------------------------------------------------


def _env_lines(credential: Credential) -> str:
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(credential.env.items()))


def _grant_json(grant: Grant) -> str:
    cred = grant.credential
    return json.dumps(
        {
            "task": {
                "id": grant.task.id,
                "scope": grant.task.scope,
                "state": "active",
                "trace_id": grant.task.trace_id,
            },
            "credential": {
                "id": cred.id,
                "backend": cred.backend,
                "kind": cred.kind,
                "expires_at": cred.expires_at,
                "env": cred.env,
                "secret": cred.secret,
            },
        }
    )


def request(  # noqa: PLR0912, PLR0915  # one branch per way a request ends
    scope: Annotated[
        str | None, typer.Argument(help="The scope to request.", metavar="SCOPE")
    ] = None,
    param: ScopeParams = None,
    purpose: Purpose = None,
    ttl: Ttl = None,
    wait: Wait = None,
    no_wait: NoWait = False,
    task_id: TaskOpt = None,
    output: Annotated[
        str,
        typer.Option(
            "--format",
            "-o",
            help="env (export lines for eval), json, or credential-process (AWS SDKs).",
        ),
    ] = "env",
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Request a scope, wait for approval, and print the credential.

    The task stays active until `broker complete TASK` or its TTL ends; prefer `broker exec`,
    which completes it for you. With --no-wait the request is only opened: its task id is
    printed on standard output (pick it up later with `broker request --task ID`).

    For AWS SDKs, put this in ~/.aws/config:

    \b
        credential_process = broker request aws-s3-read -p bucket=B --purpose "..." -o credential-process
    """
    from broker.client.errors import ApprovalPending, InvalidRequest
    from broker.client.models import Grant
    from broker.client.signals import guard

    if as_json:
        output = "json"
    if output not in ("env", "json", "credential-process"):
        _fail(InvalidRequest("--format is env, json or credential-process"))
    if no_wait and task_id:
        _fail(InvalidRequest("--no-wait opens a new request; --task continues an earlier one"))
    quiet = quiet or output == "credential-process"
    with _errors(), _client(url) as client, _progress(quiet) as progress:
        created = False
        if task_id:
            task = client.get_task(task_id)
        else:
            if not scope or not purpose:
                raise InvalidRequest(
                    "give a SCOPE and --purpose (or --task ID for an earlier request)",
                    next_step='broker request vault-kv-read --purpose "read the demo secret"',
                )
            info = _scope_info(client, scope) if param or output == "credential-process" else None
            if output == "credential-process" and info and info.get("backend") != "aws_sts":
                raise InvalidRequest(
                    f"{scope!r} is not an AWS scope (its backend is {info.get('backend')})",
                    next_step="use -o credential-process only with aws_sts scopes",
                )
            params = _parse_params(param, info)
            task = client.request_task(scope, purpose=purpose, params=params, ttl=ttl)
            created = True
        if no_wait:
            _opened(client, task, output, quiet)
            return
        with guard():  # SIGTERM/SIGHUP unwind like Ctrl-C, so the cleanup below runs
            try:
                task = client.wait(task, timeout=_wait_timeout(wait, no_wait), on_wait=progress)
            except ApprovalPending as exc:
                progress.close()
                exc.next_step = (
                    f"ask {exc.approvers or 'an approver'} to approve {exc.task.id}; then "
                    f"`broker status {exc.task.id} --wait` and `broker request --task {exc.task.id}`"
                )
                raise  # the request stays open on purpose: it can be picked up later
            except (KeyboardInterrupt, SystemExit):
                if created:
                    _end_quietly(client, task.id)  # nobody is waiting for this request any more
                raise
            progress.close()
            credential = client.mint(task.id)
            try:
                if output == "credential-process":
                    rendered = json.dumps(credential.aws_credential_process()) + "\n"
                elif output == "json":
                    rendered = _grant_json(Grant(task, credential)) + "\n"
                else:
                    rendered = _env_lines(credential)
            except BaseException:
                _end_quietly(client, task.id)  # a credential nobody will see must not live on
                raise
        typer.echo(rendered, nl=False)
        _say(
            f"task {task.id} is active; its credential expires {_when(credential.expires_at)}; "
            f"end it sooner with `broker complete {task.id}`",
            quiet=quiet,
        )


def _opened(client: BrokerClient, task: Task, output: str, quiet: bool) -> None:
    """``--no-wait``: the task id on standard output (the task as JSON with --json), and how to
    go on, on standard error. A denial has already raised; pending and approved both exit 0."""
    approvers = client.approvers(task) if task.pending else None
    if output == "json":
        emit_json(_task_json(task, approvers))
    else:
        typer.echo(task.id)
    if task.pending:
        _say(
            f"task {task.id} waits for {approvers or 'an approver'}; then "
            f"`broker status {task.id} --wait` and `broker request --task {task.id}`",
            quiet=quiet,
        )
    else:
        _say(
            f"task {task.id} is {task.state}; get its credential with "
            f"`broker request --task {task.id}` or `broker exec --task {task.id} -- CMD`",
            quiet=quiet,
        )


def _end_quietly(client: BrokerClient, task_id: str) -> None:
    from broker.client.errors import BrokerClientError

    try:
        client.complete(task_id)
    except BrokerClientError as exc:
        _say(f"warning: could not end task {task_id}: {exc.detail}")


# --- exec ----------------------------------------------------------------------------------


def exec_(
    ctx: typer.Context,
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="SCOPE, then -- and the command with its arguments.",
            metavar="SCOPE -- CMD [ARGS]...",
        ),
    ] = None,
    param: ScopeParams = None,
    purpose: Purpose = None,
    ttl: Ttl = None,
    wait: Wait = None,
    task_id: TaskOpt = None,
    url: Url = None,
    as_json: Annotated[
        bool,
        typer.Option(
            "--json",
            help="At the end, print a JSON summary on stderr (stdout belongs to the command).",
        ),
    ] = False,
    quiet: Quiet = False,
    redact: Annotated[
        bool | None,
        typer.Option(
            "--redact/--no-redact",
            help="Replace the credential's values (and their base64/URL encodings) in CMD's "
            "output. Default: when the output is not a terminal (an agent reading it). Against "
            "accidents only: CMD can read and transform its own environment.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run a command with a scope's credential in its environment; revoke it when the command ends.

    \b
        broker exec SCOPE -p key=value --purpose TEXT -- CMD ARGS...

    Only CMD sees the credential (as VAULT_TOKEN, AWS_*, PG* ... variables). Its exit status
    becomes broker's; the task is completed afterwards, also on Ctrl-C or SIGTERM (relayed to
    CMD first), and the run is recorded on the broker as a span with the command and its status.
    When CMD's output is not a terminal, the credential's values in it are redacted.
    """
    from broker.client.errors import CompletionFailed, InvalidRequest

    argv = list(args or [])
    if task_id:
        scope, command = None, argv
    else:
        scope, command = (argv[0], argv[1:]) if argv else (None, [])
    if not command:
        _fail(
            InvalidRequest(
                "no command to run",
                next_step='broker exec vault-kv-read --purpose "..." -- env',
            )
        )
    if not task_id and not purpose:
        _fail(InvalidRequest("--purpose is required", next_step="say what the command does"))
    status = 0
    with _errors(), _client(url) as client:
        progress = Progress(quiet=quiet)
        if task_id:
            holder = client.resume(task_id, wait_timeout=wait, on_wait=progress)
        else:
            assert scope is not None
            assert purpose is not None
            params = _parse_params(param, _scope_info(client, scope) if param else None)
            holder = client.task(
                scope, purpose=purpose, params=params, ttl=ttl, wait_timeout=wait, on_wait=progress
            )
        ran: int | None = None
        try:
            with holder as grant:
                progress.close()
                ran = status = _run_with(client, grant, command, quiet=quiet, redact=redact)
        except CompletionFailed as exc:
            if ran is None:
                raise
            # The command ran: its status is the answer; the broker trouble is reported beside it.
            typer.echo(f"error: {exc.detail}", err=True)
            typer.echo(f"next: {exc.next_step}", err=True)
            raise typer.Exit(ran) from None
        finally:
            progress.close()
        pending = _revoke_pending(client, grant.task.id)
        if pending:
            _say(
                f"task {grant.task.id} completed, but its credential is NOT revoked yet: "
                + "; ".join(pending),
                quiet=False,
            )
        else:
            _say(f"task {grant.task.id} completed; its credential is revoked", quiet=quiet)
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "task": grant.task.id,
                        "exit_code": status,
                        "revoked": not pending,
                        "revoke_pending": pending,
                    }
                ),
                err=True,
            )
    raise typer.Exit(status)


def _revoke_pending(client: BrokerClient, task_id: str) -> list[str]:
    """Sentences for the task's credentials the broker could not take back yet."""
    from broker.client.errors import BrokerClientError

    try:
        task = client.get_task(task_id)
    except BrokerClientError:
        return []
    return [_pending_sentence(c) for c in task.revoke_pending]


def _pending_sentence(cred: dict[str, Any]) -> str:
    text = f"{cred.get('id')} is revoke_pending (the broker keeps retrying)"
    if cred.get("expires_at"):
        text += f"; it expires on its own at {_when(cred.get('expires_at'))}"
    return text


def _run_with(
    client: BrokerClient, grant: Grant, command: list[str], *, quiet: bool, redact: bool | None
) -> int:
    from broker.client.errors import BrokerClientError
    from broker.client.process import child_env, new_span_id, recorded_command, run
    from broker.git_credential import agent_for

    span_id = new_span_id()
    base = child_env(grant.credential, grant.task, span_id)
    if redact is None:
        # A terminal is a person watching; anything else (a pipe, a file) may be an agent's
        # transcript. Redacting a terminal's output would also take the TTY from CMD.
        redact = not (sys.stdout.isatty() and sys.stderr.isatty())
    # A credential git may present (a GitHub token): git asks this process for it through
    # `broker git-credential`; nothing is written to disk.
    with agent_for(grant.credential.secret, grant.credential.details, base) as (env, agent):
        result = run(
            command,
            env,
            span_id=span_id,
            secret_values=grant.credential.secret_values(),
            redact_output=redact,
        )
    uses = list(agent.uses) if agent is not None else []
    if result.exit_code == 127 and result.ended_at - result.started_at < 1 and result.stderr:
        typer.echo(f"error: {command[0]}: command {result.stderr}", err=True)
    try:
        client.report_run(
            grant.task.id,
            command=recorded_command(command, grant.credential.secret_values()),
            exit_code=result.exit_code,
            signal=result.signal,
            started_at=result.started_at,
            ended_at=result.ended_at,
            credential_id=grant.credential.id,
            span_id=span_id,
            via="cli",
            uses=[{"source": "git_credential", **use} for use in uses] or None,
        )
    except BrokerClientError as exc:
        # The run happened either way; losing its record must not hide its exit status.
        _say(f"warning: the run could not be recorded: {exc.detail}", quiet=False)
    return result.status


# --- status / tasks / complete ---------------------------------------------------------------


def _task_json(task: Task, approvers: str | None = None) -> dict[str, Any]:
    out = {
        k: v
        for k, v in task.raw.items()
        if k
        in (
            "id",
            "scope",
            "state",
            "params",
            "purpose",
            "ttl",
            "reason",
            "decided_by_rule",
            "created_at",
            "request_expires_at",
            "approval_expires_at",
            "ends_at",
            "trace_id",
            "credentials",
        )
    }
    if approvers:
        out["approvers"] = approvers
    return out


def _show_task(task: Task, approvers: str | None) -> None:
    rows: list[tuple[str, Any]] = [
        ("task", task.id),
        ("scope", task.scope),
        ("state", task.state),
        ("purpose", task.purpose),
    ]
    if task.params:
        rows.append(("params", json.dumps(task.params, sort_keys=True)))
    if task.pending:
        rows.append(("approvers", approvers or "named by the scope's approval rule"))
        rows.append(("request expires", _when(task.request_expires_at)))
    if task.state == "approved":
        rows.append(("approved by", task.decided_by_rule or "-"))
        rows.append(("approval expires", _when(task.approval_expires_at)))
    if task.state == "active":
        rows.append(("credential expires", _when(task.ends_at)))
    if task.reason:
        rows.append(("reason", task.reason))
    for cred in task.credentials:
        state = cred.get("state")
        if state == "failed":
            state = f"failed ({cred.get('error_code') or 'backend_error'}): nothing was issued"
        elif state == "revoke_pending":
            state = "revoke_pending: NOT revoked yet; " + _pending_sentence(cred).split("; ", 1)[-1]
        rows.append((f"credential {cred.get('id')}", state))
    if task.trace_id:
        rows.append(("trace", task.trace_id))
    facts(rows)


def _table(tasks: list[Task]) -> None:
    rows = []
    for t in tasks:
        ends = t.ends_at if t.state == "active" else t.request_expires_at if t.pending else None
        rows.append((t.id, t.scope, t.state, _when(ends), _short(t.purpose, 40)))
    table(("TASK", "SCOPE", "STATE", "ENDS / EXPIRES", "PURPOSE"), rows, empty="no tasks")


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status(
    task_id: Annotated[
        str | None, typer.Argument(help="A task id; without one, your session.", metavar="TASK")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait until the task's approval is decided.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option(help="With --wait: wait at most this many seconds.")
    ] = None,
    scopes: Annotated[
        bool, typer.Option("--scopes", help="List the scopes you may request.")
    ] = False,
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Your session and open tasks, one task's state, or the scopes you may request."""
    with _errors(), _client(url) as client:
        if scopes:
            _show_scopes(client.scopes(), as_json)
            return
        if task_id is None:
            me = client.whoami()
            open_tasks = client.tasks(states=OPEN_STATES)
            if as_json:
                emit_json(
                    {
                        "subject": me.subject,
                        "issuer": me.issuer,
                        "roles": me.roles,
                        "session_id": me.session_id,
                        "expires_at": me.expires_at,
                        "tasks": [_task_json(t) for t in open_tasks],
                    }
                )
                return
            facts(
                [
                    ("session", f"{me.session_id} as {me.subject} ({me.issuer})"),
                    ("roles", ", ".join(me.roles) or "none"),
                    ("ends", _when(me.expires_at)),
                ]
            )
            typer.echo("")
            _table(open_tasks)
            return
        task = client.get_task(task_id)
        if wait and task.pending:
            with _progress(quiet) as progress:
                task = client.wait(task, timeout=timeout, on_wait=progress)
        approvers = client.approvers(task) if task.pending else None
        if as_json:
            emit_json(_task_json(task, approvers))
        else:
            _show_task(task, approvers)
        if wait and task.state == "denied":
            raise typer.Exit(EXIT_DENIED)


def _show_scopes(scopes: list[dict[str, Any]], as_json: bool) -> None:
    from broker.client.models import describe_approval, scope_parameters

    if as_json:
        emit_json(scopes)
        return
    if not scopes:
        note("no scopes you may request")
    for scope in scopes:
        approval = scope.get("approval") or {}
        rule = describe_approval(approval) if isinstance(approval, dict) else None
        typer.echo(f"{scope.get('name')}  ({scope.get('backend')}, risk {scope.get('risk')})")
        typer.echo(f"  {scope.get('description', '')}")
        typer.echo(f"  approval: {rule or 'automatic'}")
        for name, spec in scope_parameters(scope).items():
            need = "required" if spec["required"] else "optional"
            extra = f", one of {spec['enum']}" if spec.get("enum") else ""
            desc = f": {spec['description']}" if spec.get("description") else ""
            typer.echo(f"  -p {name}=<{spec.get('type', 'string')}> ({need}{extra}){desc}")


StateFilter = Annotated[
    list[str] | None, typer.Option("--state", help="Only tasks in this state (repeatable).")
]
OpenOnly = Annotated[bool, typer.Option("--open", help="Only pending, approved and active tasks.")]


@tasks_app.callback()
def tasks_default(
    ctx: typer.Context,
    state: StateFilter = None,
    open_only: OpenOnly = False,
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Your tasks, newest first."""
    if ctx.invoked_subcommand is not None:
        return
    _list_tasks(state, open_only, url, as_json)


@tasks_app.command("list")
def tasks_list(
    state: StateFilter = None,
    open_only: OpenOnly = False,
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """Your tasks, newest first."""
    _list_tasks(state, open_only, url, as_json)


def _list_tasks(state: list[str] | None, open_only: bool, url: str | None, as_json: bool) -> None:
    states = list(state or []) + (OPEN_STATES if open_only else [])
    with _errors(), _client(url) as client:
        tasks = client.tasks(states=states or None)
        if as_json:
            emit_json([_task_json(t) for t in tasks])
        else:
            _table(tasks)


@tasks_app.command("show")
def tasks_show(
    task_id: Annotated[str, typer.Argument(metavar="TASK")],
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """One task's state, approvers, credentials and trace id."""
    status(
        task_id=task_id,
        wait=False,
        timeout=None,
        scopes=False,
        url=url,
        as_json=as_json,
        quiet=True,
    )


def complete(
    task_ids: Annotated[list[str], typer.Argument(help="One or more task ids.", metavar="TASK...")],
    url: Url = None,
    as_json: JsonOut = False,
    quiet: Quiet = False,
) -> None:
    """End tasks now: their credentials are revoked (a pending task is cancelled).

    A task whose mints all failed ends failed; a credential the broker could not revoke yet is
    named (it stays revoke_pending and the broker keeps retrying).
    """
    results = []
    with _errors(), _client(url) as client:
        for task_id in task_ids:
            task = client.complete(task_id)
            results.append(_task_json(task))
            pending = [_pending_sentence(c) for c in task.revoke_pending]
            if pending:
                note(f"{task.id}  {task.state}, NOT revoked yet: " + "; ".join(pending))
            elif not as_json:
                note(f"{task.id}  {task.state}", quiet=quiet)
    if as_json:
        emit_json(results)


# --- git-credential --------------------------------------------------------------------------


def git_credential(
    operation: Annotated[str, typer.Argument(help="get, store or erase (git passes it).")],
) -> None:
    """git's credential helper for the task's token under `broker exec` (never writes it to disk).

    `broker exec` installs it for the credential's git URL through GIT_CONFIG_* variables; you
    do not configure it yourself. See docs/agents.md.
    """
    from broker.git_credential import ask

    raise typer.Exit(ask(operation, sys.stdin, sys.stdout, sys.stderr))


# --- mcp -----------------------------------------------------------------------------------


def mcp(
    reveal_secrets: Annotated[
        bool,
        typer.Option(
            "--reveal-secrets",
            help="Also offer a tool that returns credentials into the conversation (off by default).",
        ),
    ] = False,
    url: Url = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Accepted for uniformity: MCP speaks JSON-RPC already.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Serve the broker's tools to an MCP client over stdio (request, status, run, complete)."""
    try:
        from broker.mcp.server import serve
    except ImportError as exc:  # the mcp package is an optional extra
        typer.echo(
            f"error: the MCP server needs the `mcp` package ({exc.name} is missing)", err=True
        )
        typer.echo("next: pip install 'broker[mcp]'", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    from broker.client.config import SessionCache, default_cache_path

    with _errors():
        serve(_config(url), SessionCache(default_cache_path()), reveal_secrets=reveal_secrets)


# --- registration --------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add the agent commands to the root ``broker`` command."""
    app.command("login")(login)
    app.command("logout")(logout)
    app.command("request")(request)
    app.command(
        "exec",
        context_settings={"allow_interspersed_args": True, "ignore_unknown_options": False},
    )(exec_)
    app.command("status")(status)
    app.command("complete")(complete)
    app.command("mcp")(mcp)
    app.command("git-credential")(git_credential)
    # `broker tasks` is built on demand (broker.cli.main.LAZY_GROUPS).
