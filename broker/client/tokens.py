"""Finding the agent's OIDC ID token where its platform puts it.

Discovery order (:func:`discover`), first match wins:

1. ``BROKER_ID_TOKEN``: the token itself (handy in tests; prefer a file elsewhere);
2. ``BROKER_ID_TOKEN_FILE``: a file holding the token, re-read on every use (rotating files);
3. ``BROKER_ID_TOKEN_COMMAND``: a command printing the token (run without a shell);
4. GitHub Actions: ``ACTIONS_ID_TOKEN_REQUEST_URL`` and ``ACTIONS_ID_TOKEN_REQUEST_TOKEN``
   (the job needs ``permissions: id-token: write``), asked for the broker's audience;
5. Kubernetes: a projected service account token at ``BROKER_K8S_TOKEN_FILE`` or
   :data:`KUBERNETES_TOKEN_PATH`, mounted with the broker's audience.

The pod's default service account token (audience: the Kubernetes API) is deliberately *not*
used: sending it to the broker would hand the broker a token it could replay against the cluster.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import urlencode, urlsplit

import httpx

from broker.client.errors import IdTokenUnavailable

#: Where `docs/agents.md` tells Kubernetes users to mount the projected token.
KUBERNETES_TOKEN_PATH = "/var/run/secrets/broker/token"  # noqa: S105  # a path, not a secret
#: An ID token is a JWT; anything much larger is not one.
MAX_TOKEN_BYTES = 16 * 1024
COMMAND_TIMEOUT = 30.0


#: Variables naming one CI run or job: a command's cached session is never shared across runs
#: (sibling jobs on one runner may share a home folder, and so the session cache).
RUN_CONTEXT_VARIABLES = (
    "GITHUB_RUN_ID",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_JOB",
    "CI_JOB_ID",
    "CI_PIPELINE_ID",
    "BUILDKITE_JOB_ID",
    "CIRCLE_WORKFLOW_JOB_ID",
)


@runtime_checkable
class IdTokenSource(Protocol):
    """Something that yields a fresh ID token on each call.

    A source may also have ``cache_hint() -> tuple[str, ...] | None``: what names its sessions in
    the CLI's session cache without fetching a token (see :func:`cache_hint`), and
    ``uses_http = False`` when ``fetch`` never uses the client it is given.
    """

    @property
    def description(self) -> str:
        """Where the token comes from, for messages (never the token)."""
        ...

    def fetch(self, http: httpx.Client) -> str:
        """Return an ID token, or raise :class:`IdTokenUnavailable`."""
        ...


def _clean(token: str, where: str) -> str:
    token = token.strip()
    if not token:
        raise IdTokenUnavailable(
            f"{where} gave an empty ID token",
            next_step="check that the token source is configured and its token has not been consumed",
        )
    if len(token) > MAX_TOKEN_BYTES or token.count(".") != 2 or any(c.isspace() for c in token):
        raise IdTokenUnavailable(
            f"{where} did not give a JWT",
            next_step="point the broker client at a file or command that yields the raw ID token",
        )
    return token


@dataclass(frozen=True, slots=True)
class StaticIdToken:
    """A token given directly (``BROKER_ID_TOKEN``, tests)."""

    token: str = field(repr=False)
    description: str = "the BROKER_ID_TOKEN variable"
    #: Fetching needs no HTTP client (the client passes whichever it has).
    uses_http = False

    def fetch(self, http: httpx.Client) -> str:
        return _clean(self.token, self.description)


@dataclass(frozen=True, slots=True)
class FileIdToken:
    """A token in a file, read on every use so a rotated file is picked up."""

    path: Path
    description: str = ""
    uses_http = False

    def __post_init__(self) -> None:
        if not self.description:
            object.__setattr__(self, "description", f"the token file {self.path}")

    def fetch(self, http: httpx.Client) -> str:
        try:
            with self.path.open("rb") as f:
                data = f.read(MAX_TOKEN_BYTES + 1)
        except OSError as exc:
            raise IdTokenUnavailable(
                f"cannot read {self.description}: {exc.strerror or type(exc).__name__}",
                next_step="check the path and that this process may read it",
            ) from None
        return _clean(data.decode("utf-8", errors="replace"), self.description)


@dataclass(frozen=True, slots=True)
class KubernetesIdToken(FileIdToken):
    """A projected service account token mounted with the broker's audience."""

    path: Path = Path(KUBERNETES_TOKEN_PATH)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.description:
            object.__setattr__(
                self, "description", f"the Kubernetes projected token at {self.path}"
            )


@dataclass(frozen=True, slots=True)
class CommandIdToken:
    """A command (no shell) that prints the token on standard output."""

    argv: tuple[str, ...]
    timeout: float = COMMAND_TIMEOUT
    description: str = ""
    #: ``NAME=value`` of the run-identifying variables set when the source was found.
    context: tuple[str, ...] = ()
    uses_http = False

    def cache_hint(self) -> tuple[str, ...]:
        """Running the command costs a second or more: its sessions are found by the command
        itself (and the CI run it runs in), not by the token it would print."""
        return ("command", *self.argv, *self.context)

    def __post_init__(self) -> None:
        if not self.argv:
            raise IdTokenUnavailable("the ID token command is empty")
        if not self.description:
            object.__setattr__(self, "description", f"the ID token command {self.argv[0]!r}")

    def fetch(self, http: httpx.Client) -> str:
        try:
            done = subprocess.run(  # noqa: S603  # the agent's own configured command, no shell
                list(self.argv),
                capture_output=True,
                timeout=self.timeout,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except FileNotFoundError:
            raise IdTokenUnavailable(
                f"{self.description} was not found",
                next_step="fix BROKER_ID_TOKEN_COMMAND (it runs without a shell)",
            ) from None
        except subprocess.TimeoutExpired:
            raise IdTokenUnavailable(
                f"{self.description} did not finish within {self.timeout:.0f}s"
            ) from None
        if done.returncode != 0:
            # Its stderr may help; its stdout could hold a partial token and is never shown.
            hint = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise IdTokenUnavailable(
                f"{self.description} exited with status {done.returncode}"
                + (f": {hint[0][:200]}" if hint[0] else ""),
                next_step="run the command by hand to see why it fails",
            )
        return _clean(done.stdout.decode("utf-8", errors="replace"), self.description)


@dataclass(frozen=True, slots=True)
class GitHubActionsIdToken:
    """GitHub Actions' OIDC token endpoint, asked for a token with the broker's audience."""

    request_url: str
    request_token: str = field(repr=False)
    audience: str = "broker"
    description: str = "GitHub Actions' OIDC token endpoint"

    def cache_hint(self) -> tuple[str, ...]:
        """The request URL and token are unique to one job: they name its sessions (hashed)."""
        digest = hashlib.sha256(f"{self.request_url}\n{self.request_token}".encode()).hexdigest()
        return ("github-actions", digest, self.audience)

    def fetch(self, http: httpx.Client) -> str:
        parts = urlsplit(self.request_url)
        if parts.scheme != "https" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise IdTokenUnavailable(
                "ACTIONS_ID_TOKEN_REQUEST_URL is not an https URL",
                next_step="run inside GitHub Actions with `permissions: id-token: write`",
            )
        sep = "&" if parts.query else "?"
        url = f"{self.request_url}{sep}{urlencode({'audience': self.audience})}"
        try:
            resp = http.get(
                url,
                headers={
                    "Authorization": f"bearer {self.request_token}",
                    "Accept": "application/json",
                },
            )
        except httpx.HTTPError as exc:
            raise IdTokenUnavailable(
                f"{self.description} is unreachable ({type(exc).__name__})",
                next_step="retry; GitHub's token service may be briefly unavailable",
            ) from None
        if resp.status_code != 200:
            raise IdTokenUnavailable(
                f"{self.description} answered HTTP {resp.status_code}",
                next_step="give the job `permissions: id-token: write` and check the audience",
            )
        try:
            value = resp.json()["value"]
        except (ValueError, KeyError, TypeError):
            raise IdTokenUnavailable(f"{self.description} sent an unexpected body") from None
        if not isinstance(value, str):
            raise IdTokenUnavailable(f"{self.description} sent an unexpected body")
        return _clean(value, self.description)


def cache_hint(source: IdTokenSource) -> tuple[str, ...] | None:
    """What names ``source``'s sessions in the session cache, known without fetching a token.

    Sources that are costly to ask (a command, GitHub's token endpoint) name their sessions by
    their own configuration, so a cached session is found and used without running anything;
    cheap sources (a variable, a file) return None and are named by the identity in their token.
    """
    hint = getattr(source, "cache_hint", None)
    if not callable(hint):
        return None
    value = hint()
    return tuple(str(v) for v in value) if isinstance(value, tuple) else None


def unverified_identity(token: str) -> tuple[str, str] | None:
    """``(iss, sub)`` read from a JWT's payload *without verifying it*.

    Only for choosing which cached session belongs to this agent; the broker verifies every token
    it is given, so a forged payload can only select a session its holder already has.
    """
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    iss, sub = claims.get("iss"), claims.get("sub")
    if not isinstance(iss, str) or not isinstance(sub, str):
        return None
    return iss, sub


def discover(
    environ: Mapping[str, str] | None = None, *, audience: str = "broker"
) -> IdTokenSource:
    """The first ID token source configured in ``environ`` (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("BROKER_ID_TOKEN"):
        return StaticIdToken(env["BROKER_ID_TOKEN"])
    if env.get("BROKER_ID_TOKEN_FILE"):
        return FileIdToken(Path(env["BROKER_ID_TOKEN_FILE"]).expanduser())
    if env.get("BROKER_ID_TOKEN_COMMAND"):
        try:
            argv = tuple(shlex.split(env["BROKER_ID_TOKEN_COMMAND"]))
        except ValueError as exc:
            raise IdTokenUnavailable(f"BROKER_ID_TOKEN_COMMAND cannot be parsed: {exc}") from None
        context = tuple(f"{k}={env[k]}" for k in RUN_CONTEXT_VARIABLES if env.get(k))
        return CommandIdToken(argv, context=context)
    if env.get("ACTIONS_ID_TOKEN_REQUEST_URL") and env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"):
        return GitHubActionsIdToken(
            env["ACTIONS_ID_TOKEN_REQUEST_URL"], env["ACTIONS_ID_TOKEN_REQUEST_TOKEN"], audience
        )
    k8s = Path(env.get("BROKER_K8S_TOKEN_FILE") or KUBERNETES_TOKEN_PATH)
    if k8s.is_file():
        return KubernetesIdToken(k8s)
    hint = ""
    if env.get("GITHUB_ACTIONS") == "true":
        hint = " (in GitHub Actions: add `permissions: id-token: write` to the job)"
    raise IdTokenUnavailable(
        "no ID token found: none of BROKER_ID_TOKEN, BROKER_ID_TOKEN_FILE, BROKER_ID_TOKEN_COMMAND, "
        f"GitHub Actions' OIDC variables or a Kubernetes projected token at {k8s} is available{hint}",
        next_step="set BROKER_ID_TOKEN_FILE or BROKER_ID_TOKEN_COMMAND (docs/agents.md); "
        "with `broker dev`: BROKER_ID_TOKEN_COMMAND='broker dev token --sub my-agent'",
    )
