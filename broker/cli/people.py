"""``broker approvals``: approvers decide pending tasks from a terminal.

Talks to a running broker over HTTP (``--url`` / ``BROKER_URL``) with the approver's own session
token (``--token`` / ``BROKER_SESSION_TOKEN``), or exchanges the approver's ID token first
(``--id-token-file`` / ``BROKER_ID_TOKEN_FILE``). ``broker tasks list|show`` (the agent commands)
show a requester's own tasks the same way.

Exit status: 0 done, 1 the broker refused (its problem detail is printed), 2 usage errors.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

approvals_app = typer.Typer(no_args_is_help=True, help="Approvers: list, show, approve, deny.")

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105  # a token type name, not a secret

Url = Annotated[str, typer.Option("--url", envvar="BROKER_URL", help="The broker's address.")]
Token = Annotated[
    str | None,
    typer.Option(
        "--token", envvar="BROKER_SESSION_TOKEN", help="Your session token.", show_default=False
    ),
]
IdTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--id-token-file",
        envvar="BROKER_ID_TOKEN_FILE",
        help="Exchange the ID token in this file for a session first.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON.")]
Reason = Annotated[
    str, typer.Option("--reason", "-r", help="Why (recorded and shown to the requester).")
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _check(resp: httpx.Response) -> Any:
    if resp.status_code >= 400:
        try:
            body = resp.json()
            detail = f"{body.get('detail')} ({body.get('code')})"
        except ValueError:
            detail = f"HTTP {resp.status_code}"
        raise _fail(detail)
    return resp.json()


@contextmanager
def _client(url: str, token: str | None, id_token_file: Path | None) -> Iterator[httpx.Client]:
    """An HTTP client carrying the caller's session token."""
    try:
        with httpx.Client(base_url=url.rstrip("/"), timeout=30, follow_redirects=False) as client:
            if not token and id_token_file is not None:
                try:
                    id_token = id_token_file.read_text().strip()
                except OSError as exc:
                    raise _fail(f"cannot read {id_token_file}: {exc.strerror}", 2) from None
                answer = _check(
                    client.post(
                        "/oauth2/token",
                        data={
                            "grant_type": GRANT,
                            "subject_token_type": ID_TOKEN,
                            "subject_token": id_token,
                        },
                    )
                )
                token = answer["access_token"]
            if not token:
                raise _fail("no session: pass --token (BROKER_SESSION_TOKEN) or --id-token-file", 2)
            client.headers["Authorization"] = f"Bearer {token}"
            yield client
    except httpx.HTTPError as exc:
        raise _fail(f"the broker at {url} is not reachable ({type(exc).__name__})") from None


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


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
        f"  (request expires {_when(task['request_expires_at'])})",
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
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
) -> None:
    """The pending tasks you may decide, oldest first."""
    with _client(url, token, id_token_file) as client:
        items = _check(client.get("/v1/approvals"))
    if as_json:
        typer.echo(json.dumps(items, indent=2))
        return
    if not items:
        typer.echo("nothing waits for you")
        return
    for item in items:
        task = item["task"]
        who = item.get("requester_display_name") or task["requester"]["subject"]
        typer.echo(
            f"{task['id']}  {task['scope']:20} {item.get('risk') or '?':8} "
            f"{item['approvals_counted']}/{item['approvals_required']}  {who}: {task['purpose'][:60]}"
        )


@approvals_app.command("show")
def show(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
) -> None:
    """Everything about one task awaiting approvers: what, who, why, who decided so far."""
    with _client(url, token, id_token_file) as client:
        item = _check(client.get(f"/v1/approvals/{task_id}"))
    if as_json:
        typer.echo(json.dumps(item, indent=2))
    else:
        _show(item)


def _decide(
    verb: str, task_id: str, reason: str, url: str, token: str | None, id_token_file: Path | None
) -> dict[str, Any]:
    with _client(url, token, id_token_file) as client:
        result: dict[str, Any] = _check(
            client.post(f"/v1/approvals/{task_id}/{verb}", json={"reason": reason})
        )
    return result


@approvals_app.command("approve")
def approve(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    reason: Reason,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
) -> None:
    """Approve a task (it is approved once enough distinct approvers have)."""
    task = _decide("approve", task_id, reason, url, token, id_token_file)
    typer.echo(json.dumps(task, indent=2) if as_json else f"{task['id']}  {task['state']}")


@approvals_app.command("deny")
def deny(
    task_id: Annotated[str, typer.Argument(help="The task id.")],
    reason: Reason,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    id_token_file: IdTokenFile = None,
    as_json: Json = False,
) -> None:
    """Deny a task (one denial ends the request)."""
    task = _decide("deny", task_id, reason, url, token, id_token_file)
    typer.echo(json.dumps(task, indent=2) if as_json else f"{task['id']}  {task['state']}")
