"""Turn termination signals into a normal unwinding, so a task is completed on the way out.

``SIGINT`` already raises ``KeyboardInterrupt``. ``SIGTERM`` and ``SIGHUP`` kill a Python process
without running ``finally`` blocks, so credentials would stay alive until they expire. While a
task block runs, these signals raise ``SystemExit(128 + signum)`` instead (the exit status a shell
reports for a process killed by that signal); while the task is being completed, further signals
are held back and delivered afterwards. Handlers are only installed in the main thread and only
where the application left the default in place: an application's own handler is never replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

TERMINATING = (signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    """Installed for the length of one task block (sync code)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        if self._deferring:
            self.received = self.received or signum
            return
        self.received = signum
        raise SystemExit(128 + signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in TERMINATING:
            with contextlib.suppress(ValueError, OSError):
                if signal.getsignal(sig) == signal.SIG_DFL:
                    self._previous[sig] = signal.signal(sig, self._handler)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, previous)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold back SIGINT/SIGTERM/SIGHUP while the task is completed; deliver them afterwards."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        held: list[int] = []

        def hold(signum: int, _frame: FrameType | None) -> None:
            held.append(signum)

        self._deferring = True
        saved: dict[int, Any] = {}
        for sig in (signal.SIGINT, *TERMINATING):
            with contextlib.suppress(ValueError, OSError):
                saved[sig] = signal.signal(sig, hold)
        try:
            yield
        finally:
            for signum, previous in saved.items():
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, previous)
            self._deferring = False
            if held:
                signal.raise_signal(held[0])


@contextlib.contextmanager
def guard() -> Iterator[SignalGuard]:
    g = SignalGuard()
    g.install()
    try:
        yield g
    finally:
        g.uninstall()


class AsyncSignalGuard:
    """The asyncio form: a termination signal cancels the task running the block."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._installed: list[signal.Signals] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            task = asyncio.current_task()
        except RuntimeError:
            return  # not asyncio (trio): the application handles its own signals
        if task is None or threading.current_thread() is not threading.main_thread():
            return
        self._loop = loop

        def on_signal(signum: int) -> None:
            if self.received is None:
                self.received = signum
                task.cancel()

        for sig in TERMINATING:
            with contextlib.suppress(ValueError, OSError, NotImplementedError, RuntimeError):
                if signal.getsignal(sig) == signal.SIG_DFL:
                    loop.add_signal_handler(sig, on_signal, int(sig))
                    self._installed.append(sig)

    def uninstall(self) -> None:
        if self._loop is not None:
            for sig in self._installed:
                with contextlib.suppress(ValueError, OSError, RuntimeError):
                    self._loop.remove_signal_handler(sig)
        self._installed.clear()
