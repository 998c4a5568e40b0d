"""``broker git-credential``: git's credential helper for a task's token, never written to disk.

``broker exec`` starts a :class:`CredentialAgent` when the task's credential says where git may
present it (the credential's ``details.inject.git``: a URL and a username, e.g. GitHub's
``https://github.com`` and ``x-access-token``). The agent is a Unix socket in a private folder
(mode 0700) that answers only callers presenting the run's random key, and it holds the token
in the memory of the ``broker exec`` process. The child's environment gets

- ``BROKER_GIT_CREDENTIAL_SOCKET`` and ``BROKER_GIT_CREDENTIAL_KEY`` (where and how to ask);
- git configuration through ``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_<n>``/``GIT_CONFIG_VALUE_<n>``
  (nothing is written to ``~/.gitconfig`` or the repository): for the credential's URL, an empty
  ``credential.<url>.helper`` first, which drops every helper the user's config files name (so
  no ``store`` helper can save the token to a file), then this helper, and ``useHttpPath`` so
  each use names its repository.

git runs ``<python> -m broker.git_credential get`` (the same code as ``broker git-credential``,
but starting in a fraction of a second because it needs only the standard library), writes
``protocol``/``host``/``path`` on standard input, and reads ``username``/``password`` back. The
agent answers only for the credential's own URL, and notes every request (``get``, and git's
verdict: ``store`` when the token worked, ``erase`` when it was refused); ``broker exec``
reports those uses to the broker with the run.

This module imports nothing outside the standard library (an import contract says so).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import shlex
import shutil
import socket
import socketserver
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO
from urllib.parse import urlsplit

SOCKET_ENV = "BROKER_GIT_CREDENTIAL_SOCKET"
KEY_ENV = "BROKER_GIT_CREDENTIAL_KEY"
#: The git credential protocol's input is small; anything larger is refused unread.
MAX_INPUT = 64 * 1024
MAX_VALUE = 4096
#: At most this many uses are kept per run (then only counted).
MAX_USES = 100
OPERATIONS = ("get", "store", "erase")
#: What each operation means for the record.
OUTCOMES = {"get": "served", "store": "accepted", "erase": "rejected"}


@dataclass(frozen=True, slots=True)
class GitTarget:
    """Where git may present the secret: scheme, host[:port], optional path prefix, username."""

    scheme: str
    host: str
    path: str
    username: str

    @classmethod
    def parse(cls, url: str, username: str) -> GitTarget:
        parts = urlsplit(url)
        return cls(parts.scheme, parts.netloc.lower(), parts.path.strip("/"), username)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}" + (f"/{self.path}" if self.path else "")

    def matches(self, protocol: str, host: str, path: str) -> bool:
        if protocol != self.scheme or host.lower() != self.host:
            return False
        return not self.path or path.strip("/").startswith(self.path + "/")


def git_targets(details: Mapping[str, Any]) -> list[GitTarget]:
    """The git targets a credential's details name (``inject.git``), if any."""
    inject = details.get("inject")
    if not isinstance(inject, dict):
        return []
    out = []
    for entry in inject.get("git") or []:
        if isinstance(entry, dict) and isinstance(entry.get("url"), str):
            out.append(GitTarget.parse(entry["url"], str(entry.get("username") or "")))
    return out


def parse_request(text: str) -> dict[str, str]:
    """git's ``key=value`` lines up to a blank line (the credential helper protocol)."""
    out: dict[str, str] = {}
    for raw in text.split("\n"):
        line = raw.rstrip("\r")
        if not line:
            break
        key, sep, value = line.partition("=")
        if sep and key in ("protocol", "host", "path", "username") and len(value) <= MAX_VALUE:
            out[key] = value
    return out


@dataclass
class CredentialAgent:
    """Serves one secret to git's helper over a private Unix socket, for one run."""

    secret: str = field(repr=False)
    targets: Sequence[GitTarget]
    clock: Any = time.time
    key: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    uses: list[dict[str, Any]] = field(default_factory=list)
    dropped: int = 0
    _folder: str | None = None
    _server: socketserver.ThreadingUnixStreamServer | None = None
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def socket_path(self) -> str:
        assert self._folder is not None
        return os.path.join(self._folder, "git-credential.sock")

    def start(self) -> CredentialAgent:
        self._folder = tempfile.mkdtemp(prefix="broker-git-")  # mode 0700
        agent = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                raw = self.rfile.readline(MAX_INPUT + 1)
                answer = agent.answer(raw)
                self.wfile.write(json.dumps(answer).encode() + b"\n")

        self._server = socketserver.ThreadingUnixStreamServer(self.socket_path, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="broker-git-credential", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        self._server = self._thread = None

    def __enter__(self) -> CredentialAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, raw: bytes) -> dict[str, str]:
        """One request from the helper: the credential for an allowed URL, else nothing."""
        try:
            request = json.loads(raw) if len(raw) <= MAX_INPUT else None
        except ValueError:
            request = None
        if not isinstance(request, dict) or not hmac.compare_digest(
            str(request.get("key", "")).encode(), self.key.encode()
        ):
            return {}
        operation = str(request.get("operation", ""))
        if operation not in OPERATIONS:
            return {}
        protocol, host, path = (
            str(request.get(k, ""))[:MAX_VALUE] for k in ("protocol", "host", "path")
        )
        target = next((t for t in self.targets if t.matches(protocol, host, path)), None)
        self._note(operation, protocol, host, path, "refused" if target is None else None)
        if target is None or operation != "get":
            return {}
        return {"username": target.username, "password": self.secret}

    def _note(
        self, operation: str, protocol: str, host: str, path: str, outcome: str | None
    ) -> None:
        with self._lock:
            if len(self.uses) >= MAX_USES:
                self.dropped += 1
                return
            self.uses.append(
                {
                    "at": self.clock(),
                    "operation": operation,
                    "protocol": protocol[:16],
                    "host": host[:255],
                    "path": path[:1024],
                    "outcome": outcome or OUTCOMES[operation],
                }
            )

    def child_env(self, base: Mapping[str, str], helper: Sequence[str]) -> dict[str, str]:
        """``base`` plus the agent's address and git configuration installing the helper."""
        env = dict(base)
        env[SOCKET_ENV] = self.socket_path
        env[KEY_ENV] = self.key
        entries: list[tuple[str, str]] = []
        command = "!" + " ".join(shlex.quote(part) for part in helper)
        for target in self.targets:
            entries += [
                (f"credential.{target.url}.helper", ""),
                (f"credential.{target.url}.helper", command),
                (f"credential.{target.url}.useHttpPath", "true"),
            ]
        try:
            start = int(env.get("GIT_CONFIG_COUNT", "0"))
        except ValueError:
            start = 0
        for i, (key, value) in enumerate(entries, start=start):
            env[f"GIT_CONFIG_KEY_{i}"] = key
            env[f"GIT_CONFIG_VALUE_{i}"] = value
        env["GIT_CONFIG_COUNT"] = str(start + len(entries))
        return env


def helper_command() -> list[str]:
    """How git starts the helper: this interpreter, this module."""
    return [sys.executable, "-m", "broker.git_credential"]


@contextlib.contextmanager
def agent_for(
    secrets_: Mapping[str, str], details: Mapping[str, Any], base: Mapping[str, str]
) -> Iterator[tuple[dict[str, str], CredentialAgent | None]]:
    """The child's environment with a running agent when the credential names git targets
    (``details.inject.git``; the secret field is ``details.inject.secret``)."""
    targets = git_targets(details)
    inject = details.get("inject")
    field_name = str(inject.get("secret") or "") if isinstance(inject, dict) else ""
    secret = secrets_.get(field_name)
    if not secret or not targets:
        yield dict(base), None
        return
    with CredentialAgent(secret, targets) as agent:
        yield agent.child_env(base, helper_command()), agent


def ask(
    operation: str,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The helper: read git's request, ask the agent, print what it answers. Exit 0 always
    except on misuse, so git goes on to prompt or fail as it would without a helper."""
    env = os.environ if environ is None else environ
    if operation not in OPERATIONS:
        stderr.write(
            f"broker git-credential: unknown operation {operation!r} (get, store, erase)\n"
        )
        return 2
    text = stdin.read(MAX_INPUT + 1)
    if len(text) > MAX_INPUT:
        stderr.write("broker git-credential: the request from git is too large\n")
        return 0
    request = parse_request(text)
    path, key = env.get(SOCKET_ENV), env.get(KEY_ENV)
    if not path or not key:
        if operation == "get":
            stderr.write(
                "broker git-credential: no task's credential here (run git under `broker exec`)\n"
            )
        return 0
    body = json.dumps({"key": key, "operation": operation, **request}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(body)
            reply = sock.makefile("rb").readline(MAX_INPUT)
    except OSError as exc:
        stderr.write(f"broker git-credential: the broker exec process did not answer ({exc})\n")
        return 0
    try:
        answer = json.loads(reply) if reply else {}
    except ValueError:
        answer = {}
    if operation == "get" and isinstance(answer, dict) and answer.get("password"):
        username = str(answer.get("username") or "")
        password = str(answer["password"])
        if "\n" not in username + password:
            stdout.write(f"username={username}\npassword={password}\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: broker git-credential get|store|erase\n")
        return 2
    return ask(args[0], sys.stdin, sys.stdout, sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
