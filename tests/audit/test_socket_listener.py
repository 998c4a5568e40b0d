"""The ingest listener for OpenBao's socket audit device: bounded memory, allowed peers only,
TCP and unix sockets."""

from __future__ import annotations

import os
import socket
import stat
import threading
from pathlib import Path

from broker.audit.openbao_ingest import SocketListener
from tests.audit.conftest import wait_for


def send(address: tuple[str, int] | str, payload: bytes) -> None:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.connect(address)
        s.sendall(payload)


def test_a_slow_store_never_grows_memory_beyond_the_queue() -> None:
    """While recording is stuck, lines beyond the queue's size are counted as overflow (the file
    tail brings them in later) instead of piling up in memory or slowing OpenBao."""
    release = threading.Event()
    seen: list[bytes] = []

    def slow(line: bytes) -> None:
        seen.append(line)
        release.wait(10)

    listener = SocketListener(
        "127.0.0.1:0", slow, allowed_peers=["127.0.0.1"], queue_size=5
    ).start()
    try:
        host, port = listener.bound.rsplit(":", 1)
        send((host, int(port)), b'{"first": 1}\n')
        wait_for(lambda: len(seen) == 1, what="the worker to hold the first line")
        send((host, int(port)), b"".join(b'{"n": %d}\n' % i for i in range(20)))
        wait_for(lambda: listener.received == 21, what="every line read")
        assert listener.overflow == 15
        assert listener.queue.qsize() == 5
        release.set()
        wait_for(lambda: len(seen) == 6, what="the queued lines")
    finally:
        release.set()
        listener.stop()


def test_peers_outside_the_allowlist_are_refused() -> None:
    """Only OpenBao's addresses may stream entries: anyone else could forge uses."""
    got: list[bytes] = []
    listener = SocketListener("127.0.0.1:0", got.append, allowed_peers=["10.0.0.0/8"]).start()
    try:
        host, port = listener.bound.rsplit(":", 1)
        send((host, int(port)), b'{"forged": true}\n')
        wait_for(lambda: listener.refused_peers == 1, what="the refusal")
        assert got == [] and listener.received == 0
    finally:
        listener.stop()


def test_a_unix_socket_is_private_to_the_owner(tmp_path: Path) -> None:
    """``unix:/path`` listens on a socket file only its owner can open, and is removed on stop."""
    path = tmp_path / "audit.sock"
    got: list[bytes] = []
    listener = SocketListener(f"unix:{path}", got.append).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        send(str(path), b'{"a": 1}\n{"b": 2}\n')
        wait_for(lambda: len(got) == 2, what="both lines")
    finally:
        listener.stop()
    assert not path.exists()
