"""Authentication work off the event loop, in a pool of its own, and who the client is.

Verifying a subject token, resolving a session token and auditing a refusal are CPU and store
work. They run in worker threads, never on the event loop, and through their own
:class:`AuthWork` limiter (``http.auth_concurrency`` at once) rather than the thread pool every
synchronous route shares: a flood of hostile tokens waits for those few slots, without holding
a thread, while ``/healthz`` (served on the loop) and authenticated routes (the shared pool) go
on. When more than ``http.auth_queue`` requests are already waiting, the next is told 503 at
once rather than queued without bound.

:func:`client_address` names the client for throttling: the socket's peer, or, when that peer
is one of ``http.trusted_proxies``, the address those proxies appended to ``X-Forwarded-For``
(read from the right, skipping trusted hops), so nobody can choose the address they are counted
under by sending the header themselves.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from typing import TypeVar

import anyio
import anyio.to_thread
from starlette.requests import HTTPConnection

from broker.errors import ServiceUnavailable
from broker.settings import HttpSettings

T = TypeVar("T")

#: Most ``X-Forwarded-For`` hops read (a longer chain ends at a trusted proxy's own address).
MAX_FORWARDED_HOPS = 16

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthenticationBusy(ServiceUnavailable):
    code = "authentication_busy"
    title = "The broker is busy authenticating other requests"
    retry_after = 1


class AuthWork:
    """A bounded pool for authentication work (see the module docstring)."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        # Made on first use, inside the running event loop.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        return self._limiter

    async def run(self, work: Callable[[], T]) -> T:
        """Run ``work`` in a worker thread once a slot is free (503 when too many wait)."""
        limiter = self.limiter
        if limiter.available_tokens == 0 and limiter.statistics().tasks_waiting >= self.queue:
            raise AuthenticationBusy("too many requests are waiting to be authenticated; retry")
        return await anyio.to_thread.run_sync(work, limiter=limiter)


def trusted_networks(settings: HttpSettings) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip()
    if text.startswith("[") and "]" in text:  # [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[Network]
) -> str | None:
    """The client's address: ``peer``, unless ``peer`` is a trusted proxy (see module doc)."""
    if peer is None:
        return None
    current = _address(peer)
    if current is None or not trusted:
        return peer
    hops = [h for value in forwarded_for for h in value.split(",")][-MAX_FORWARDED_HOPS:]
    while hops and any(current in net for net in trusted):
        hop = _address(hops.pop())
        if hop is None:
            break  # a trusted proxy wrote something that is no address: stop at that proxy
        current = hop
    return str(current)


def request_address(connection: HTTPConnection, trusted: Sequence[Network]) -> str | None:
    """:func:`client_address` of a request."""
    peer = connection.client.host if connection.client else None
    return client_address(peer, connection.headers.getlist("x-forwarded-for"), trusted)
