"""Who the client is: X-Forwarded-For is believed from trusted proxies only, right to left."""

from __future__ import annotations

import ipaddress

import pytest

from broker.api.auth_work import client_address

PROXY = [ipaddress.ip_network("10.0.0.5/32"), ipaddress.ip_network("10.1.0.0/16")]


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "client"),
    [
        # No trusted proxies: the header is ignored, whoever sends it.
        ("198.51.100.7", ["1.2.3.4"], [], "198.51.100.7"),
        # From an untrusted peer the header is ignored too.
        ("198.51.100.7", ["1.2.3.4"], PROXY, "198.51.100.7"),
        # Through one trusted proxy: the address it appended.
        ("10.0.0.5", ["203.0.113.9"], PROXY, "203.0.113.9"),
        # A client's own (spoofed) entries are left of what the proxy appended: never read.
        ("10.0.0.5", ["6.6.6.6, 203.0.113.9"], PROXY, "203.0.113.9"),
        # Two trusted hops (the header repeated by the second proxy).
        ("10.0.0.5", ["6.6.6.6, 203.0.113.9", "10.1.2.3"], PROXY, "203.0.113.9"),
        # Garbage written by a trusted proxy: stop at that proxy.
        ("10.0.0.5", ["not-an-address"], PROXY, "10.0.0.5"),
        # Ports and brackets as some proxies write them.
        ("10.0.0.5", ["[2001:db8::1]:4711"], PROXY, "2001:db8::1"),
        ("10.0.0.5", ["203.0.113.9:4711"], PROXY, "203.0.113.9"),
        # A trusted peer without the header is the client itself.
        ("10.0.0.5", [], PROXY, "10.0.0.5"),
    ],
)
def test_client_address(
    peer: str, forwarded: list[str], trusted: list[ipaddress.IPv4Network], client: str
) -> None:
    """Each case states its rule in the comment above it."""
    assert client_address(peer, forwarded, trusted) == client


def test_the_authentication_pool_is_bounded() -> None:
    """With one slot and no queue, a second request for authentication work while the first
    holds the slot is refused at once (503 with Retry-After), not queued; once the slot is free
    work runs again. The work runs in a worker thread, not on the event loop's."""
    import threading

    import anyio

    from broker.api.auth_work import AuthenticationBusy, AuthWork

    pool = AuthWork(concurrency=1, queue=0)
    release = threading.Event()
    loop_thread = threading.get_ident()
    seen: list[int] = []

    def slow() -> str:
        seen.append(threading.get_ident())
        release.wait(10)
        return "done"

    async def main() -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(pool.run, slow)
            with anyio.fail_after(10):
                while pool.limiter.borrowed_tokens == 0:
                    await anyio.sleep(0.01)  # polling until the first holds the slot
            with pytest.raises(AuthenticationBusy) as refused:
                await pool.run(lambda: "second")
            assert refused.value.status == 503 and refused.value.retry_after == 1
            release.set()
        assert await pool.run(lambda: "third") == "third"

    anyio.run(main)
    assert seen and seen[0] != loop_thread
