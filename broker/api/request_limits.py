"""Request heads and bodies are bounded before anything reads them (pure ASGI middleware).

Outermost in the application, before routing, authentication or JSON parsing:

- the header lines together may hold at most ``http.max_header_bytes`` and number at most
  ``http.max_headers`` (431); uvicorn's own limit on the whole request head, set a little above
  by ``broker serve``, cuts off anything larger before it is even buffered;
- each route class has a body cap (``http.max_body_token`` for ``/oauth2/*``,
  ``max_body_exec`` for run reports, ``max_body_console`` under ``/ui``, ``max_body`` for the
  rest): a ``Content-Length`` above it is refused at once, unread; a body without one
  (chunked) is counted while it streams and cut off the moment it passes the cap (413).

The refusal is ``application/problem+json`` answered by this middleware itself. When the
application had already started reading, it is told the client went away, and whatever it
tries to answer after that is dropped, so no route ever sees part of a body. Every refusal is
reported to ``report`` (the client's address and the code) for throttling and the audit.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from broker.api.problems import problem
from broker.settings import HttpSettings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
#: Told about each refusal: the ASGI scope and the problem code.
Report = Callable[[Scope, str], Awaitable[None]]

_EXEC_REPORT = re.compile(r"/v1/tasks/[^/]{1,128}/exec")


def body_cap(settings: HttpSettings, path: str) -> int:
    """The largest body a request to ``path`` may carry."""
    if path.startswith("/oauth2/"):
        return settings.max_body_token
    if path == "/ui" or path.startswith("/ui/"):
        return settings.max_body_console
    if _EXEC_REPORT.fullmatch(path):
        return settings.max_body_exec
    return settings.max_body


class RequestLimits:
    """The middleware (see the module docstring)."""

    def __init__(self, app: App, settings: HttpSettings, report: Report | None = None) -> None:
        self.app = app
        self.settings = settings
        self.report = report

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        size = sum(len(name) + len(value) + 4 for name, value in headers)  # "name: value\r\n"
        if len(headers) > self.settings.max_headers or size > self.settings.max_header_bytes:
            await self._refuse(
                scope,
                send,
                431,
                "headers_too_large",
                "The request's headers are too large",
                f"send at most {self.settings.max_headers} header lines and "
                f"{self.settings.max_header_bytes} bytes of headers",
            )
            return
        path: str = scope.get("path", "")
        cap = body_cap(self.settings, path)
        lengths = [v for k, v in headers if k.lower() == b"content-length"]
        declared = int(lengths[0]) if len(lengths) == 1 and lengths[0].isdigit() else None
        if declared is not None and declared > cap:
            await self._too_large(scope, send, cap)
            return
        read = 0
        cut = started = False

        async def limited_receive() -> Message:
            nonlocal read, cut
            if cut:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > cap:
                    cut = True
                    if not started:
                        await self._too_large(scope, send, cap)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if cut:
                return  # the client has its answer; the application's comes too late
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not cut:
                raise
            # The application failed on the body it never got whole: the client has its 413.

    async def _too_large(self, scope: Scope, send: Send, cap: int) -> None:
        await self._refuse(
            scope,
            send,
            413,
            "payload_too_large",
            "The request body is too large",
            f"this route accepts bodies of at most {cap} bytes",
        )

    async def _refuse(
        self, scope: Scope, send: Send, status: int, code: str, title: str, detail: str
    ) -> None:
        path = scope.get("path", "")
        extra: dict[str, Any] = {"error": "invalid_request"} if path.startswith("/oauth2/") else {}
        response = problem(status, code, title, detail, instance=path, **extra)
        response.headers["Connection"] = "close"  # the rest of the body is never read

        async def nothing() -> Message:
            return {"type": "http.disconnect"}

        await response(scope, nothing, send)
        if self.report is not None:
            await self.report(scope, code)
