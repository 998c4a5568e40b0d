"""One sign-in for every command group: agents, approvers, auditors and admins.

Every command that talks to a broker finds it and signs in the same way:

- the broker: ``--url``, else ``BROKER_URL``, else the URL ``broker dev`` wrote to ``.dev/env``;
- the caller: a session token given with ``--token`` / ``BROKER_SESSION_TOKEN``, else the session
  cached by an earlier command (``BROKER_SESSION_CACHE``, default
  ``~/.cache/broker/sessions.json``), else an ID token exchanged for a new session, from
  ``--id-token-file`` or the sources of :mod:`broker.client.tokens` (``BROKER_ID_TOKEN``,
  ``BROKER_ID_TOKEN_FILE``, ``BROKER_ID_TOKEN_COMMAND``, GitHub Actions, Kubernetes).

A cached session is used while it is valid: an ID token command is not run again for it (the
cache finds a command's session by the command itself). A session the broker refuses is renewed
once with a fresh ID token.

Exit status, for every command that talks to a broker: 0 success, 1 other error, 2 usage or
configuration, 3 still pending approval, 4 denied or forbidden, 5 expired or ended, 6 rate-limited,
7 broker unreachable or unavailable, 8 authentication refused, 9 the scope is misconfigured.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:  # the client pulls in httpx; commands import it when they run
    from broker.client.errors import BrokerClientError
    from broker.client.sync import BrokerClient

EXIT_OTHER = 1
EXIT_USAGE = 2
EXIT_PENDING = 3
EXIT_DENIED = 4
EXIT_EXPIRED = 5
EXIT_RATE_LIMITED = 6
EXIT_UNAVAILABLE = 7
EXIT_UNAUTHENTICATED = 8
EXIT_MISCONFIGURED = 9

DEV_ENV_FILE = Path(".dev/env")

Url = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="BROKER_URL",
        help="The broker's address (default: BROKER_URL, or the one `broker dev` wrote to .dev/env).",
        show_default=False,
    ),
]
SessionToken = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="BROKER_SESSION_TOKEN",
        help="Use this session token instead of signing in.",
        show_default=False,
    ),
]
IdTokenFile = Annotated[
    Path | None,
    typer.Option(
        "--id-token-file",
        envvar="BROKER_ID_TOKEN_FILE",
        help="Sign in with the ID token in this file (also BROKER_ID_TOKEN_COMMAND, BROKER_ID_TOKEN).",
        show_default=False,
    ),
]


def dev_env_value(key: str, path: Path = DEV_ENV_FILE) -> str | None:
    """A value from the env file `broker dev` writes, so a dev shell needs no exports."""
    try:
        for line in path.read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep and k.strip() == key:
                return v.strip()
    except OSError:
        return None
    return None


def broker_url(url: str | None = None) -> str | None:
    """Where the broker is: ``--url``, ``BROKER_URL``, or `broker dev`'s env file."""
    return url or os.environ.get("BROKER_URL") or dev_env_value("BROKER_URL")


def client(
    url: str | None = None, token: str | None = None, id_token_file: Path | None = None
) -> BrokerClient:
    """A client signed in as the module docstring says (the session opens on first use)."""
    from broker.client.config import ClientConfig, SessionCache, default_cache_path
    from broker.client.sync import BrokerClient
    from broker.client.tokens import FileIdToken

    environ = dict(os.environ)
    if token:
        environ["BROKER_SESSION_TOKEN"] = token
    config = ClientConfig.from_env(environ, broker_url=broker_url(url))
    return BrokerClient(
        config,
        id_token_source=FileIdToken(id_token_file) if id_token_file is not None else None,
        session_cache=SessionCache(default_cache_path(environ)),
        environ=environ,
    )


def exit_code(exc: BrokerClientError) -> int:
    """The exit status for a client error, most specific family first."""
    from broker.client import errors as e

    table: tuple[tuple[type[e.BrokerClientError], int], ...] = (
        (e.ApprovalPending, EXIT_PENDING),
        (e.ScopeMisconfigured, EXIT_MISCONFIGURED),
        (e.Forbidden, EXIT_DENIED),
        (e.Conflict, EXIT_EXPIRED),
        (e.RateLimited, EXIT_RATE_LIMITED),
        (e.BrokerUnreachable, EXIT_UNAVAILABLE),
        (e.ServiceUnavailable, EXIT_UNAVAILABLE),
        (e.AuthenticationError, EXIT_UNAUTHENTICATED),
        (e.ConfigurationError, EXIT_USAGE),
        (e.InvalidRequest, EXIT_USAGE),
    )
    return next((code for kind, code in table if isinstance(exc, kind)), EXIT_OTHER)


#: Problem members that explain a refusal further (a role error names the role and where roles
#: come from); printed under the error when the broker sends them.
_EXPLAINING = ("missing_role", "required_role", "role", "claim", "configured_at", "configured_in")


def report(exc: BrokerClientError) -> NoReturn:
    """Print the broker's answer as it gave it: its detail, its stable code, what to do next."""
    from broker.client.errors import Forbidden

    code = f" ({exc.code})" if exc.code and exc.code not in exc.detail else ""
    typer.echo(f"error: {exc.detail}{code}", err=True)
    for key in _EXPLAINING:
        value = exc.problem.get(key)
        if value:
            typer.echo(f"  {key.replace('_', ' ')}: {value}", err=True)
    next_step = exc.problem.get("next_step") or exc.next_step
    if isinstance(exc, Forbidden) and "role" in f"{exc.code} {exc.detail}":
        next_step = exc.problem.get("next_step") or (
            "roles come from your ID token's claims, mapped by the issuer's `claims.roles` "
            "setting (docs/authentication.md); `broker status` shows the roles you hold"
        )
    if next_step:
        typer.echo(f"next: {next_step}", err=True)
    raise typer.Exit(exit_code(exc))


@contextmanager
def errors() -> Iterator[None]:
    """Turn the client's errors into a message and the documented exit status."""
    from broker.client.errors import BrokerClientError

    try:
        yield
    except BrokerClientError as exc:
        report(exc)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
