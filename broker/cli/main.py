"""broker: short-lived credentials for AI coding agents.

Agents: login, request, exec, status, tasks, complete, mcp. Approvers: approvals. Auditors:
audit. Admins: scopes. Operators: serve, db, dev. Every command signs in the same way (--url or
BROKER_URL, a cached session, or your ID token) and takes --json and -q.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

import broker
from broker.cli import agent as agent_commands
from broker.cli.output import Json, Quiet, emit_json, note
from broker.cli.signin import dev_env_value
from broker.errors import BrokerError, ConfigurationError

if TYPE_CHECKING:  # settings pull in pydantic and CEL; commands load them when they run
    from broker.settings import Settings


def _wrap_at_spaces_only() -> None:
    """Help text wraps at spaces only, so `--no-wait` or `credential-process` never splits across
    two lines. Typer's wrapper is textwrap's, which breaks on hyphens by default; this turns that
    off for the CLI's process (the one setting it has no option for)."""
    try:
        from typer._click import _textwrap
    except ImportError:  # another Typer layout: its default wrapping applies
        return
    original = _textwrap.TextWrapper.__init__
    if getattr(original, "broker_no_hyphen_breaks", False):
        return

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("break_on_hyphens", False)
        original(self, *args, **kwargs)

    init.broker_no_hyphen_breaks = True  # type: ignore[attr-defined]
    _textwrap.TextWrapper.__init__ = init  # type: ignore[method-assign]


_wrap_at_spaces_only()
# httpx imports its own command line (and with it rich, pygments and click) when they are
# installed; the broker's commands never use it, and skipping it saves a third of httpx's import
# time on every command that talks to a broker. Only `httpx.main` is affected, in this process.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

#: Command groups built only when they are invoked (or listed by `broker --help`): Typer builds
#: every parameter of every registered command on each run, so `broker status` would otherwise pay
#: for the auditor's and admin's thirty commands too.
LAZY_GROUPS: dict[str, tuple[str, str]] = {
    "scopes": ("broker.cli.scopes", "scopes_app"),
    "approvals": ("broker.cli.people", "approvals_app"),
    "audit": ("broker.cli.audit", "audit_app"),
    "tasks": ("broker.cli.agent", "tasks_app"),
}


class BrokerGroup(TyperGroup):
    """The root command: the agent's everyday commands built at once, the groups on demand."""

    def list_commands(self, ctx: Any) -> list[str]:
        names = list(super().list_commands(ctx))
        return names + [n for n in LAZY_GROUPS if n not in names]

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        found = super().get_command(ctx, cmd_name)
        if found is not None or cmd_name not in LAZY_GROUPS:
            return found
        module, attribute = LAZY_GROUPS[cmd_name]
        group = typer.main.get_command(getattr(importlib.import_module(module), attribute))
        group.name = cmd_name
        return group


app = typer.Typer(
    cls=BrokerGroup,
    no_args_is_help=True,
    add_completion=False,
    help=__doc__,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
db_app = typer.Typer(no_args_is_help=True, help="The broker's store.", rich_markup_mode=None)
dev_app = typer.Typer(
    help="The local development stack.", invoke_without_command=True, rich_markup_mode=None
)
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="dev")
agent_commands.register(app)  # login, request, exec, status, tasks, complete, mcp


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _settings() -> Settings:
    from broker.settings import load_settings

    try:
        return load_settings()
    except ConfigurationError as exc:
        fail(exc.detail)


@app.command()
def version(as_json: Json = False, quiet: Quiet = False) -> None:
    """Print the broker's version."""
    if as_json:
        emit_json({"version": broker.__version__})
    else:
        typer.echo(broker.__version__)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    migrate: Annotated[bool, typer.Option(help="Run `db upgrade` first.")] = False,
    workers: Annotated[int, typer.Option(help="Worker processes.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Log JSON lines.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Log warnings and errors only.")
    ] = False,
) -> None:
    """Run the broker's HTTP API (settings from BROKER_* and BROKER_CONFIG)."""
    import uvicorn

    from broker.api.app import create_app
    from broker.logs import configure_logging
    from broker.store.migrate import upgrade

    settings = _settings()
    configure_logging("warning" if quiet else settings.log_level, json_lines=as_json)
    if migrate:
        upgrade(settings.effective_database_url)
    try:
        application = create_app(settings)
    except BrokerError as exc:
        fail(exc.detail)
    uvicorn.run(
        application,
        host=host,
        port=port,
        log_level=settings.log_level,
        access_log=False,
        server_header=False,
        # h11 with an explicit cap on the request head: the application refuses heads above
        # http.max_header_bytes with a problem document; uvicorn cuts off anything much larger
        # before buffering it.
        http="h11",
        h11_max_incomplete_event_size=settings.http.max_header_bytes + 4096,
        # The broker reads X-Forwarded-For itself, and only from http.trusted_proxies.
        proxy_headers=False,
    )


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(metavar="REVISION")] = "head",
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Apply the store's migrations up to REVISION."""
    from broker.store.migrate import upgrade

    settings = _settings()
    upgrade(settings.effective_database_url, revision)
    if as_json:
        emit_json({"upgraded_to": revision})
    else:
        note(f"store upgraded to {revision}", quiet=quiet)


# --- dev ------------------------------------------------------------------------------------


@dev_app.callback()
def dev(
    ctx: typer.Context,
    env_file: Annotated[
        Path, typer.Option(help="Write the stack's URLs here once it is ready.")
    ] = Path(".dev/env"),
    state_dir: Annotated[Path, typer.Option(help="Scratch folder for logs, keys and data.")] = Path(
        ".dev/state"
    ),
    scopes: Annotated[Path, typer.Option(help="Scope templates to serve.")] = Path("scopes"),
    port: Annotated[int, typer.Option(help="The broker's port.")] = 8080,
    openbao_port: Annotated[int, typer.Option()] = 8200,
    moto_port: Annotated[int, typer.Option()] = 8300,
    issuer_port: Annotated[int, typer.Option()] = 8400,
    otlp_endpoint: Annotated[
        str | None, typer.Option(help="Export audit spans to this OTLP/HTTP endpoint.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the stack's URLs as JSON once it is ready.")
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Start OpenBao, moto, a dev OIDC issuer and the broker; Ctrl-C stops them all.

    While it runs, a scope template that fails to load is reported here as soon as it is saved
    (and once fixed, that it loads again).
    """
    if ctx.invoked_subcommand is not None:
        return
    from broker.devstack.stack import DevStack, Ports, run_forever

    stack = DevStack(
        state_dir=state_dir,
        scopes_dir=scopes,
        env_file=env_file,
        otlp_endpoint=otlp_endpoint,
        ports=Ports(broker=port, openbao=openbao_port, moto=moto_port, issuer=issuer_port),
    )

    def _terminate(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        note("starting the dev stack ...", quiet=quiet)
        urls = stack.up()
        if as_json:
            emit_json(urls)
        else:
            width = max(len(k) for k in urls)
            for key, value in urls.items():
                typer.echo(f"  {key.ljust(width)}  {value}")
        note(
            f"ready; URLs written to {env_file}. Get an agent token with:\n"
            f"  broker dev token --sub my-agent\nCtrl-C stops everything.",
            quiet=quiet,
        )
        dead = run_forever(stack, report=lambda line: typer.echo(line, err=True))
        typer.echo(f"error: {dead} exited; stopping the stack (logs in {state_dir})", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        typer.echo("stopping ...", err=True)
    except (RuntimeError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.down()


def _parse_claims(claims: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in claims:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--claim takes key=value, not {item!r}")
        parsed: object = value
        if value[:1] in "[{" or value in ("true", "false") or value.lstrip("-").isdigit():
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                parsed = value
        if key in out:
            prev = out[key]
            out[key] = [*prev, parsed] if isinstance(prev, list) else [prev, parsed]
        else:
            out[key] = parsed
    return out


@dev_app.command("token")
def dev_token(
    sub: Annotated[str, typer.Option(help="The token's subject.")] = "dev-agent",
    claim: Annotated[
        list[str] | None, typer.Option(help="Extra claim key=value (repeat for a list).")
    ] = None,
    aud: Annotated[str, typer.Option(help="Audience.")] = "broker",
    ttl: Annotated[int, typer.Option(help="Lifetime in seconds.")] = 600,
    issuer: Annotated[
        str | None, typer.Option(envvar="OIDC_ISSUER_URL", help="The dev issuer's URL.")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print {"id_token": ...} instead of the bare token.')
    ] = False,
    quiet: Quiet = False,
) -> None:
    """Print an ID token from the dev issuer, alone on standard output."""
    import urllib.error
    import urllib.request

    url = issuer or dev_env_value("OIDC_ISSUER_URL") or "http://127.0.0.1:8400"
    body = json.dumps(
        {"sub": sub, "aud": aud, "ttl": ttl, "claims": _parse_claims(claim or [])}
    ).encode()
    request = urllib.request.Request(  # noqa: S310  # the dev issuer's own http(s) URL
        f"{url.rstrip('/')}/token",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310  # dev issuer URL
            token = json.loads(resp.read())["id_token"]
        if as_json:
            emit_json({"id_token": token})
        else:
            typer.echo(token)
    except urllib.error.HTTPError as exc:
        fail(f"the dev issuer refused: HTTP {exc.code} {exc.read()[:300].decode(errors='replace')}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"the dev issuer at {url} is not reachable ({exc}); is `broker dev` running?")


@dev_app.command("issuer", hidden=True)
def dev_issuer(
    url: Annotated[str, typer.Option()],
    port: Annotated[int, typer.Option()],
    key_file: Annotated[Path, typer.Option()],
) -> None:
    """Run the development OIDC issuer (started by `broker dev`)."""
    import uvicorn

    from broker.api.dev_issuer import create_dev_issuer_app

    uvicorn.run(
        create_dev_issuer_app(url, key_file), host="127.0.0.1", port=port, log_level="warning"
    )


def main() -> None:
    try:
        app()
    except BrokerError as exc:
        typer.echo(f"error: {exc.detail}", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
