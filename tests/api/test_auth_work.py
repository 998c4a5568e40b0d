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
