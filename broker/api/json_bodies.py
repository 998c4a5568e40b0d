"""JSON request bodies are parsed in a worker thread, never on the event loop.

FastAPI parses a route's JSON body with ``await request.json()`` on the event loop before any
dependency runs, authentication included: a 64 KiB body of many keys costs milliseconds of CPU
during which the loop serves nobody else. The routers of routes with JSON bodies therefore use
:class:`OffLoopJsonRoute`, whose request parses in a worker thread (bodies of more than
:data:`INLINE_BYTES`; smaller ones cost less than the hop). The size cap
(:mod:`broker.api.request_limits`) applies first. Validation of the parsed body by pydantic
(compiled, a fraction of the parse) still runs on the loop.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

#: Bodies up to this size are parsed inline (microseconds).
INLINE_BYTES = 4096


class OffLoopJsonRequest(Request):
    """A request whose JSON body is parsed off the event loop."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) <= INLINE_BYTES:
                self._json = json.loads(body)
            else:
                self._json = await run_in_threadpool(json.loads, body)
        return self._json


class OffLoopJsonRoute(APIRoute):
    """A route that hands its handler an :class:`OffLoopJsonRequest` (FastAPI's documented way
    to customise the request: ``APIRouter(route_class=OffLoopJsonRoute)``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(OffLoopJsonRequest(request.scope, request.receive))

        return handle
