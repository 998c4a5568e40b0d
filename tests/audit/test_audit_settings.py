"""The audit settings refuse what would fail later, with a message naming the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.settings import OpenBaoAuditSettings


@pytest.mark.parametrize("listen", ["127.0.0.1:9201", "[::1]:9201", "unix:/run/broker/audit.sock"])
def test_listen_addresses_accepted(listen: str) -> None:
    """TCP host:port (IPv4 or IPv6) and absolute unix socket paths are accepted."""
    assert OpenBaoAuditSettings(listen=listen).listen == listen


@pytest.mark.parametrize("listen", ["9201", "localhost", "host:port", "h:70000", "unix:relative"])
def test_bad_listen_addresses_refused(listen: str) -> None:
    """Anything else is refused when the settings load, not when the listener starts."""
    with pytest.raises(ValidationError, match="listen must be HOST:PORT"):
        OpenBaoAuditSettings(listen=listen)


def test_bad_peers_refused() -> None:
    """allowed_peers must be addresses or networks."""
    with pytest.raises(ValidationError, match="not an address or network"):
        OpenBaoAuditSettings(allowed_peers=["openbao.internal"])
    assert OpenBaoAuditSettings(allowed_peers=["10.0.0.0/8", "::1"]).allowed_peers
