"""`broker approvals`: approvers decide pending tasks from a terminal.

Approvers sign in like every other command (see `broker.cli.signin`): the cached session of an
earlier `broker login`, a session token (`--token` / `BROKER_SESSION_TOKEN`), or an ID token that
is exchanged for a session (`--id-token-file`, `BROKER_ID_TOKEN_COMMAND`, ...), at `--url` /
`BROKER_URL`. `broker tasks list|show` (the agent commands) show a requester's own tasks.

Exit status: 0 done, 4 refused (not an approver, the requester, ...), 5 already decided or
expired, 2 usage errors, and the others of `broker.cli.signin`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli import signin
from broker.cli.output import Json, Quiet, emit_json, note, shorten, table, when
from broker.cli.signin import IdTokenFile, SessionToken, Url

if TYPE_CHECKING:
    from broker.client.sync import BrokerClient

approvals_app = typer.Typer(
    no_args_is_help=True, help="Approvers: list, show, approve, deny.", rich_markup_mode=None
)

TaskId = Annotated[str, typer.Argument(help="The task id.", metavar="TASK")]
Reason = Annotated[
    str, typer.Option("--reason", "-r", help="Why (recorded and shown to the requester).")
]


def _client(url: str | None, token: str | None, id_token_file: Any) -> BrokerClient:
    return signin.client(url, token, id_token_file)


def _who(item: dict[str, Any]) -> str:
    task = item["task"]
    return str(item.get("requester_display_name") or task["requester"]["subject"])


def _show(item: dict[str, Any]) -> None:
    task = item["task"]
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(task["params"].items()))
    who = item.get("requester_display_name") or task["requester"]["subject"]
    lines = [
        f"task      {task['id']}  ({task['state']})",
        f"scope     {task['scope']}  risk {item.get('risk') or '?'}  ttl {task['ttl']} s",
        f"requester {who}  <{task['requester']['issuer']}|{task['requester']['subject']}>",
        f"purpose   {task['purpose']}",
        f"params    {params or '(none)'}",
        f"approvals {item['approvals_counted']} of {item['approvals_required']}"
        f"  (request expires {when(task['request_expires_at'])})",
    ]
    lines.extend(_grant_lines(item.get("grant"), item.get("template_backend")))
    for a in item["approvals"]:
        mark = "" if a["counts"] else "  [no longer counts]"
        lines.append(f"  {a['decision']:7} {a['subject']}: {a['reason']}{mark}")
    if item.get("template_changed"):
        lines.append("warning   the scope template changed since the request")
    if not item.get("may_decide"):
        lines.append(f"you may not decide: {item.get('why_not')}")
    typer.echo("\n".join(lines))


def _grant_lines(grant: dict[str, Any] | None, template: dict[str, Any] | None) -> list[str]:
    """What the credential will grant for these parameters, then the template as written."""
    if not grant:
        return []
    lines = ["grants    (the template rendered for these parameters)"]
    if grant.get("error"):
        lines.append(f"  cannot be rendered: {grant['error']}")
    for key, value in grant.items():
        if key == "error" or value is None:
            continue
        if isinstance(value, (dict, list)):
            text = json.dumps(value, indent=2, sort_keys=True).splitlines()
            lines.append(f"  {key:16} {text[0]}")
            lines.extend(f"  {'':16} {rest}" for rest in text[1:])
        else:
            lines.append(f"  {key:16} {value}")
    if template:
        lines.append("template  (backend as written)")
        lines.extend(f"  {row}" for row in json.dumps(template, sort_keys=True).splitlines())
    return lines


@approvals_app.command("list")
def list_pending(
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """The pending tasks you may decide, oldest first."""
    with signin.errors(), _client(url, token, id_token_file) as client:
        items = client.request("GET", "/v1/approvals")
    if as_json:
        emit_json(items)
        return
    rows = [
        (
            item["task"]["id"],
            item["task"]["scope"],
            item.get("risk") or "?",
            f"{item['approvals_counted']}/{item['approvals_required']}",
            _who(item),
            shorten(item["task"]["purpose"], 60),
        )
        for item in items
    ]
    table(
        ("TASK", "SCOPE", "RISK", "APPROVALS", "REQUESTER", "PURPOSE"),
        rows,
        empty="nothing waits for you",
    )


@approvals_app.command("show")
def show(
    task_id: TaskId,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Everything about one task awaiting approvers: what, who, why, who decided so far."""
    with signin.errors(), _client(url, token, id_token_file) as client:
        item = client.request("GET", f"/v1/approvals/{_segment(task_id)}")
    if as_json:
        emit_json(item)
    else:
        _show(item)


def _segment(task_id: str) -> str:
    if not task_id or any(c in task_id for c in "/?#") or task_id in (".", ".."):
        from broker.cli.output import fail

        fail(f"{task_id!r} is not a task id")
    return task_id


def _decide(
    verb: str,
    task_id: str,
    reason: str,
    url: str | None,
    token: str | None,
    id_token_file: Any,
    as_json: bool,
    quiet: bool,
) -> None:
    with signin.errors(), _client(url, token, id_token_file) as client:
        task: dict[str, Any] = client.request(
            "POST", f"/v1/approvals/{_segment(task_id)}/{verb}", body={"reason": reason}
        )
    if as_json:
        emit_json(task)
        return
    typer.echo(f"{task['id']}  {task['state']}")
    if task["state"] == "pending":
        note("your decision is recorded; the task waits for more approvers", quiet=quiet)


@approvals_app.command("approve")
def approve(
    task_id: TaskId,
    reason: Reason,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Approve a task (it is approved once enough distinct approvers have)."""
    _decide("approve", task_id, reason, url, token, id_token_file, as_json, quiet)


@approvals_app.command("deny")
def deny(
    task_id: TaskId,
    reason: Reason,
    url: Url = None,
    token: SessionToken = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Deny a task (one denial ends the request)."""
    _decide("deny", task_id, reason, url, token, id_token_file, as_json, quiet)
