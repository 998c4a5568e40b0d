"""Run a program with a task's credential in its environment, and only in its environment.

Used by ``broker exec`` and the MCP server. The child gets the parent's environment minus the
broker's own secrets (the session token and ID token, which the child has no business holding),
plus the credential's variables, the task and credential ids, and a W3C ``TRACEPARENT`` pointing
at the broker's span for this run, so an instrumented program's spans join the task's trace.

Output the broker reads (the MCP server's captures; ``broker exec`` when its output is not a
terminal) is redacted as it streams, before it is cut to size (:mod:`broker.client.redact`:
against accidents, not against a command that wants to leak its own environment).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

from broker.client.models import Credential, Task
from broker.client.redact import StreamRedactor, redact_text, secret_forms

#: Variables never passed to the child: the agent's own identity, not the task's credential.
STRIPPED_ENV = frozenset(
    {"BROKER_SESSION_TOKEN", "BROKER_ID_TOKEN", "BROKER_ID_TOKEN_FILE", "BROKER_ID_TOKEN_COMMAND"}
)
#: Signals relayed to the child while it runs.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
#: How long output is still read after the command exited (a background child it left may hold
#: the pipe open forever).
DRAIN_GRACE = 10.0
#: How much of a recorded command line the broker keeps.
MAX_ARGS = 64
MAX_ARG_CHARS = 512


def child_env(
    credential: Credential,
    task: Task,
    span_id: str,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of the child: ``base`` without the broker's secrets, plus the credential."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in STRIPPED_ENV}
    env.update(credential.env)
    env["BROKER_TASK_ID"] = task.id
    env["BROKER_CREDENTIAL_ID"] = credential.id
    if credential.expires_at is not None:
        env["BROKER_CREDENTIAL_EXPIRES_AT"] = str(int(credential.expires_at))
    if task.trace_id:
        env["TRACEPARENT"] = f"00-{task.trace_id}-{span_id}-01"
    return env


def redact(text: str, secret_values: Sequence[str]) -> str:
    """``text`` with every secret value and its common encodings replaced (longest first, so
    no fragment survives)."""
    return redact_text(text, secret_values)


def recorded_command(argv: Sequence[str], secret_values: Sequence[str]) -> list[str]:
    """The command line as the broker records it: secrets redacted, length bounded."""
    out = [redact(a, secret_values)[:MAX_ARG_CHARS] for a in argv[:MAX_ARGS]]
    if len(argv) > MAX_ARGS:
        out.append(f"... ({len(argv) - MAX_ARGS} more)")
    return out


@dataclass(frozen=True, slots=True)
class RunResult:
    """How the child ended."""

    argv: list[str]
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    started_at: float
    ended_at: float
    span_id: str
    stdout: str | None = field(default=None, repr=False)
    stderr: str | None = field(default=None, repr=False)
    timed_out: bool = False
    #: Captured output was longer than ``max_output`` and was cut (after redaction).
    truncated: bool = False

    @property
    def status(self) -> int:
        """The exit status a shell would report: the code, or 128 + signal."""
        if self.exit_code is not None:
            return self.exit_code
        return 128 + (self.signal or 0)


def new_span_id() -> str:
    return secrets.token_hex(8)


@contextlib.contextmanager
def _forward_signals(proc: subprocess.Popen[Any]) -> Iterator[None]:
    """Relay termination signals to the child while it runs, so it can clean up itself.

    SIGINT is relayed only when not on a terminal: from a terminal, Ctrl-C already reaches the
    child (same process group) and a second copy would interrupt its own cleanup.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved: dict[int, Any] = {}

    def relay(signum: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signum)

    sigs: list[int] = list(FORWARDED)
    sigs.append(signal.SIGINT)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    for sig in sigs:
        with contextlib.suppress(ValueError, OSError):
            if sig == signal.SIGINT and interactive:
                saved[sig] = signal.signal(sig, signal.SIG_IGN)
            else:
                saved[sig] = signal.signal(sig, relay)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, previous)


class _Drain:
    """Reads a child's pipe to its end through a redactor, keeping the first ``limit`` bytes
    (the rest is read and dropped, so the child never blocks on a full pipe), or copying
    everything to ``sink``."""

    def __init__(
        self, pipe: IO[bytes], forms: Sequence[bytes], limit: int, sink: IO[bytes] | None
    ) -> None:
        self.pipe = pipe
        self.redactor = StreamRedactor(forms)
        self.limit = limit
        self.sink = sink
        self.kept = bytearray()
        self.truncated = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        if self.sink is not None:
            with contextlib.suppress(OSError, ValueError):
                self.sink.write(data)
                self.sink.flush()
            return
        room = self.limit - len(self.kept)
        if len(data) > room:
            self.truncated = True
        if room > 0:
            self.kept += data[:room]

    def _run(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            while chunk := self.pipe.read1(64 * 1024):  # type: ignore[attr-defined]
                self._emit(self.redactor.feed(chunk))
        self._emit(self.redactor.close())
        with contextlib.suppress(OSError):
            self.pipe.close()

    def text(self, max_chars: int) -> tuple[str, bool]:
        self.thread.join(DRAIN_GRACE)
        text = bytes(self.kept).decode("utf-8", errors="replace")
        return text[:max_chars], self.truncated or len(text) > max_chars


def run(
    argv: Sequence[str],
    env: Mapping[str, str],
    *,
    span_id: str,
    cwd: str | None = None,
    capture: bool = False,
    timeout: float | None = None,
    max_output: int = 64 * 1024,
    secret_values: Sequence[str] = (),
    redact_output: bool = False,
) -> RunResult:
    """Run ``argv`` to completion with ``env``; its exit status comes back in the result.

    ``capture=False`` (``broker exec``) lets the child share this process's terminal and relays
    signals to it; with ``redact_output`` its stdout and stderr pass through a redactor on their
    way to this process's (``secret_values`` and their encodings become ``[redacted]``).
    ``capture=True`` (the MCP server) collects stdout and stderr, redacted as they stream and
    only then cut to ``max_output`` characters each, and kills the child after ``timeout`` s.
    """
    if not argv:
        raise ValueError("no command to run")
    started = time.time()
    timed_out = False
    out = err = None
    piped = capture or redact_output
    try:
        proc = subprocess.Popen(  # noqa: S603  # the agent's own command, no shell
            list(argv),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL if capture else None,
            stdout=subprocess.PIPE if piped else None,
            stderr=subprocess.PIPE if piped else None,
        )
    except FileNotFoundError:
        return RunResult(list(argv), 127, None, started, time.time(), span_id, "", "not found")
    except PermissionError:
        return RunResult(list(argv), 126, None, started, time.time(), span_id, "", "not executable")
    drains: list[_Drain] = []
    if piped:
        assert proc.stdout is not None
        assert proc.stderr is not None
        forms = secret_forms(secret_values)
        # Bytes kept: enough for max_output characters of any UTF-8 text.
        limit = 4 * max_output
        sinks = (None, None) if capture else (sys.stdout.buffer, sys.stderr.buffer)
        drains = [
            _Drain(proc.stdout, forms, limit, sinks[0]),
            _Drain(proc.stderr, forms, limit, sinks[1]),
        ]
    truncated = False
    if capture:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()
            proc.wait()
        (out, cut_out), (err, cut_err) = (d.text(max_output) for d in drains)
        truncated = cut_out or cut_err
    else:
        with _forward_signals(proc):
            while True:
                try:
                    proc.wait()
                    break
                except KeyboardInterrupt:  # pragma: no cover - only without a relayed SIGINT
                    continue
        for drain in drains:
            drain.thread.join(DRAIN_GRACE)
    code = proc.returncode
    return RunResult(
        argv=list(argv),
        exit_code=code if code >= 0 else None,
        signal=-code if code < 0 else None,
        started_at=started,
        ended_at=time.time(),
        span_id=span_id,
        stdout=out,
        stderr=err,
        timed_out=timed_out,
        truncated=truncated,
    )
