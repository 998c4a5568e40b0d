"""OpenBao/Vault's own audit stream, turned into ``broker.credential.use`` spans.

Two feeds carry the same entries, and both are needed:

* the **socket** audit device streams each entry to the broker's listener as it happens (low
  latency), but OpenBao drops socket entries while nobody listens (a broker restart, a network
  blip) and refuses to *start* with a socket device whose listener is down;
* the **file** audit device keeps every entry; :class:`FileTail` reads it from a position stored in
  the broker's store, so after any outage the broker catches up without a gap.

An entry arriving from both (or twice from the file after a crash) is recorded once: the
``request.id`` of each response entry is the dedup key (see :mod:`broker.audit.uses`).

Entries are matched by ``request.client_token_accessor`` (the audit devices need
``hmac_accessor = "false"``) to a Vault token's accessor, and by lease id to a database lease. Only
the entry's path, operation, mount, outcome and remote address are kept: request and response
bodies are never read into an event (OpenBao HMACs their secret values anyway).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import re
import socket
import socketserver
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from broker.audit.uses import Ingested, Match, ObservedUse, UseRecorder
from broker.domain.audit import Outcome, UseSource
from broker.domain.scrub import scrub_text
from broker.settings import OpenBaoAuditSettings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: ``sys/leases/revoke/<lease id>`` and friends carry the lease id in the path.
_LEASE_PATH = re.compile(r"^sys/(?:leases/)?(?:revoke|renew|lookup|revoke-force)/(?P<lease>.+)$")
_HMAC_PREFIX = "hmac-sha256:"
#: Bytes read from the file device per poll (the rest waits for the next poll).
READ_CHUNK = 4 * 1024 * 1024
#: Entries waiting between the socket and the store; beyond it entries are left to the file tail.
QUEUE_SIZE = 10_000


def parse_time(value: Any) -> float | None:
    """RFC 3339 with nanoseconds (``2026-11-26T11:53:07.363518702Z``) as epoch seconds."""
    if not isinstance(value, str) or not value:
        return None
    text = value.strip().replace("Z", "+00:00")
    match = re.match(r"^(.*?\.\d{6})\d*(.*)$", text)
    if match:
        text = match.group(1) + match.group(2)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _plain(value: Any) -> str | None:
    """A non-HMAC'd string value, or None."""
    if isinstance(value, str) and value and not value.startswith(_HMAC_PREFIX):
        return value
    return None


def _outcome(entry: Mapping[str, Any], auth: Mapping[str, Any]) -> tuple[str, str | None]:
    error = entry.get("error")
    allowed = (auth.get("policy_results") or {}).get("allowed")
    if error:
        text = scrub_text(" ".join(str(error).split()), limit=200)
        if "permission denied" in text or allowed is False:
            return Outcome.DENIED, text
        return Outcome.FAILURE, text
    return Outcome.SUCCESS, None


def parse_entry(entry: Mapping[str, Any], *, cluster: str | None = None) -> ObservedUse | None:
    """One audit entry -> an observed use, or None when it cannot concern a credential.

    Only ``response`` entries are used: each carries its request too, plus the outcome. Requests
    made by the broker's own internal tokens (metadata ``broker_role`` other than ``credential``,
    such as the tokens owning database leases) and by tokens of another broker cluster sharing
    the same OpenBao (``broker_cluster``) are not uses of this broker's credentials.
    """
    if entry.get("type") != "response":
        return None
    request = entry.get("request") or {}
    request_id = request.get("id")
    if not isinstance(request_id, str) or not request_id:
        return None
    auth = entry.get("auth") or {}
    response = entry.get("response") or {}
    matches: list[Match] = []
    accessor = _plain(request.get("client_token_accessor"))
    if accessor:
        matches.append(Match("accessor", "vault", accessor))
    leases = {
        _plain((response.get("secret") or {}).get("lease_id")),
        _plain((request.get("data") or {}).get("lease_id")),
    }
    path = str(request.get("path") or "")
    found = _LEASE_PATH.match(path)
    if found:
        leases.add(found.group("lease"))
    matches.extend(Match("lease_id", "vault", lease) for lease in sorted(x for x in leases if x))
    if not matches:
        return None
    metadata = auth.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = {}
    if metadata.get("broker_role", "credential") != "credential":
        return None
    if cluster is not None and metadata.get("broker_cluster", cluster) != cluster:
        return None
    claimed = metadata.get("broker_credential")
    if isinstance(claimed, str) and claimed:
        # Last resort, after the accessor: the credential the token's metadata names.
        matches.append(Match("credential_id", "vault", claimed))
    outcome, error = _outcome(entry, auth)
    namespace = (request.get("namespace") or {}).get("id")
    when = parse_time(entry.get("time"))
    attributes: dict[str, Any] = {
        "vault.request.id": request_id,
        "vault.request.path": path,
        "vault.request.operation": request.get("operation"),
        "vault.mount.type": request.get("mount_type"),
        "vault.mount.point": request.get("mount_point"),
        "vault.namespace": namespace,
        "vault.auth.display_name": auth.get("display_name"),
        "vault.auth.policies": [str(p) for p in auth.get("policies") or []] or None,
        "vault.auth.token_type": auth.get("token_type"),
        "client.port": request.get("remote_port"),
    }
    return ObservedUse(
        source=UseSource.OPENBAO,
        record_id=request_id,
        time=when if when is not None else 0.0,
        matches=tuple(matches),
        operation=str(request.get("operation") or "unknown"),
        target=path,
        outcome=outcome,
        error=error,
        client_address=request.get("remote_address"),
        ours=isinstance(claimed, str) and bool(claimed),
        claimed_credential=claimed if isinstance(claimed, str) else None,
        attributes={k: v for k, v in attributes.items() if v is not None},
    )


class EntryHandler:
    """Parses raw audit lines and hands uses to the recorder."""

    def __init__(
        self, recorder: UseRecorder, clock: Callable[[], float], *, cluster: str | None = None
    ) -> None:
        self.recorder = recorder
        self.clock = clock
        self.cluster = cluster
        self.lines = 0
        self.malformed = 0

    def __call__(self, line: bytes) -> Ingested | None:
        self.lines += 1
        line = line.strip()
        if not line:
            return None
        try:
            entry = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            self.malformed += 1
            return None
        if not isinstance(entry, dict):
            self.malformed += 1
            return None
        use = parse_entry(entry, cluster=self.cluster)
        if use is None:
            return None
        if use.time == 0.0:
            use = replace(use, time=self.clock())
        return self.recorder.ingest(use)


# --- the file device ------------------------------------------------------------------------


class FileTail:
    """Reads the file audit device from a position kept in the store; survives restarts.

    The position is ``(inode, offset)`` of the first byte not yet processed, advanced only after
    the lines before it were recorded. A rotated file (new inode) is read to its end through the
    still-open handle before switching; a truncated one is read again from the start (dedup
    makes that harmless).
    """

    def __init__(
        self,
        path: Path,
        handler: Callable[[bytes], Any],
        db: Database,
        clock: Callable[[], float],
        *,
        max_entry_bytes: int = 1_048_576,
    ) -> None:
        self.path = path
        self.handler = handler
        self.db = db
        self.clock = clock
        self.max_entry_bytes = max_entry_bytes
        self.cursor_key = f"openbao-file:{path.resolve()}"
        self._file: BinaryIO | None = None
        self._inode: int | None = None
        self.bytes_read = 0
        self.oversized = 0

    def _position(self) -> tuple[int | None, int]:
        with self.db.read() as conn:
            cursor = repo.ingest_cursor(conn, self.cursor_key)
        if not cursor:
            return None, 0
        return cursor.get("inode"), int(cursor.get("offset", 0))

    def _save(self, inode: int, offset: int) -> None:
        with self.db.write() as conn:
            repo.set_ingest_cursor(
                conn, self.cursor_key, {"inode": inode, "offset": offset}, self.clock()
            )

    def poll_once(self) -> int:
        """Process what was appended since the last poll; returns the number of lines."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return 0
        total = 0
        if self._file is not None and self._inode != stat.st_ino:
            # Rotated: finish the old file through the open handle, then switch.
            total += self._drain(self._file, self._inode or 0)
            self._close()
        if self._file is None:
            self._file = self.path.open("rb")
            self._inode = os.fstat(self._file.fileno()).st_ino
        inode = self._inode or 0
        saved_inode, offset = self._position()
        if saved_inode != inode or offset > os.fstat(self._file.fileno()).st_size:
            offset = 0  # a new or truncated file: read it all (dedup drops what was seen)
            self._save(inode, 0)
        self._file.seek(offset)
        total += self._drain(self._file, inode)
        return total

    def _drain(self, f: BinaryIO, inode: int) -> int:
        lines = 0
        offset = f.tell()
        pending = b""
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                break
            data = pending + chunk
            cut = data.rfind(b"\n")
            if cut < 0:
                if len(data) > self.max_entry_bytes:
                    # A line longer than any audit entry: skip to its end, counted.
                    self.oversized += 1
                    offset += len(data)
                    pending = b""
                else:
                    pending = data
                continue
            complete, pending = data[: cut + 1], data[cut + 1 :]
            for line in complete.splitlines():
                if len(line) > self.max_entry_bytes:
                    self.oversized += 1
                    continue
                self.handler(line)
                lines += 1
            offset += len(complete)
            self.bytes_read += len(complete)
            self._save(inode, offset)
            if len(chunk) < READ_CHUNK:
                break
        # A partial last line stays unread until OpenBao finishes writing it.
        f.seek(offset)
        return lines

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
        self._inode = None

    def close(self) -> None:
        self._close()


# --- the socket device ----------------------------------------------------------------------


def _peer_allowed(peer: Any, allowed: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if not isinstance(peer, tuple):  # a unix socket: the file's permissions decide
        return True
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    return any(address in net for net in allowed)


class SocketListener:
    """Accepts OpenBao's socket audit device (TCP ``HOST:PORT`` or ``unix:/path``).

    Reading never waits on the store: lines go to a bounded queue served by one worker, so a slow
    store cannot slow OpenBao's requests (its audit writes are synchronous). When the queue is
    full the entry is left to the file tail, and counted.
    """

    def __init__(
        self,
        address: str,
        handler: Callable[[bytes], Any],
        *,
        allowed_peers: list[str] | None = None,
        max_entry_bytes: int = 1_048_576,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self.address = address
        self.handler = handler
        self.allowed = [ipaddress.ip_network(p, strict=False) for p in allowed_peers or []]
        self.max_entry_bytes = max_entry_bytes
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_size)
        self.received = 0
        self.overflow = 0
        self.refused_peers = 0
        self.connections = 0
        self._server: socketserver.BaseServer | None = None
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()

    def _make_server(self) -> socketserver.BaseServer:
        listener = self

        class Handler(socketserver.StreamRequestHandler):
            def setup(self) -> None:
                super().setup()
                with listener._lock:
                    listener._open.add(self.request)

            def finish(self) -> None:
                with listener._lock:
                    listener._open.discard(self.request)
                super().finish()

            def handle(self) -> None:
                listener.connections += 1
                while True:
                    try:
                        line = self.rfile.readline(listener.max_entry_bytes + 1)
                    except OSError:
                        return
                    if not line:
                        return
                    if len(line) > listener.max_entry_bytes and not line.endswith(b"\n"):
                        # Oversized: discard up to the end of the line (the file keeps it).
                        while line and not line.endswith(b"\n"):
                            line = self.rfile.readline(listener.max_entry_bytes + 1)
                        continue
                    listener.received += 1
                    try:
                        listener.queue.put_nowait(line)
                    except queue.Full:
                        listener.overflow += 1

        if self.address.startswith("unix:"):
            path = Path(self.address[len("unix:") :])
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

            class UnixServer(socketserver.ThreadingUnixStreamServer):
                daemon_threads = True

            server: socketserver.BaseServer = UnixServer(str(path), Handler)
            os.chmod(path, 0o600)
            return server
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        allowed = self.allowed

        class TcpServer(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def verify_request(self, request: Any, client_address: Any) -> bool:
                if _peer_allowed(client_address, allowed):
                    return True
                listener.refused_peers += 1
                log.warning("refused an audit stream connection from %s", client_address[0])
                return False

        return TcpServer((host, int(port)), Handler)

    @property
    def bound(self) -> str:
        assert self._server is not None
        address = self._server.server_address
        if isinstance(address, tuple):
            return f"{address[0]}:{address[1]}"
        return f"unix:{address!s}"

    def _work(self) -> None:
        while True:
            line = self.queue.get()
            if line is None:
                return
            try:
                self.handler(line)
            except Exception as exc:
                # The file tail will bring this entry in; do not lose the listener over it.
                log.warning("could not record an audit stream entry: %s", type(exc).__name__)

    def start(self) -> SocketListener:
        self._server = self._make_server()
        serve = threading.Thread(
            target=self._server.serve_forever, name="broker-openbao-listen", daemon=True
        )
        work = threading.Thread(target=self._work, name="broker-openbao-ingest", daemon=True)
        self._threads = [serve, work]
        serve.start()
        work.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            # Close the live connections too: OpenBao then sees the failure, drops what it
            # cannot deliver (the file tail has it) and reconnects to whoever listens next.
            with self._lock:
                open_conns = list(self._open)
            for conn in open_conns:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            if self.address.startswith("unix:"):
                with contextlib.suppress(FileNotFoundError):
                    Path(self.address[len("unix:") :]).unlink()
        with contextlib.suppress(queue.Full):
            self.queue.put(None, timeout=1)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._server = None


# --- the pair -------------------------------------------------------------------------------


class OpenBaoIngest:
    """The socket listener and the file tail together, with dedup pruning."""

    def __init__(
        self,
        settings: OpenBaoAuditSettings,
        db: Database,
        recorder: UseRecorder,
        clock: Callable[[], float],
        *,
        cluster: str | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.clock = clock
        self.handler = EntryHandler(recorder, clock, cluster=cluster)
        self.listener: SocketListener | None = None
        self.tail: FileTail | None = None
        if settings.file is not None:
            self.tail = FileTail(
                settings.file,
                self.handler,
                db,
                clock,
                max_entry_bytes=settings.max_entry_bytes,
            )
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> int:
        """One pass of the file tail."""
        return self.tail.poll_once() if self.tail is not None else 0

    def _run(self) -> None:
        while not self._stop.wait(self.settings.poll_interval):
            try:
                self.poll_once()
                self.last_error = None
            except Exception as exc:
                self.last_error = type(exc).__name__
                log.warning("reading the OpenBao audit file failed: %s", type(exc).__name__)

    def start(self) -> None:
        if self.settings.listen and self.listener is None:
            self.listener = SocketListener(
                self.settings.listen,
                self.handler,
                allowed_peers=self.settings.allowed_peers,
                max_entry_bytes=self.settings.max_entry_bytes,
            ).start()
        if self.tail is not None and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="broker-openbao-tail", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.tail is not None:
            self.tail.close()

    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "lines": self.handler.lines,
            "malformed": self.handler.malformed,
            "last_error": self.last_error,
        }
        if self.listener is not None:
            out["socket"] = {
                "address": self.listener.bound,
                "received": self.listener.received,
                "overflow": self.listener.overflow,
                "refused_peers": self.listener.refused_peers,
                "connections": self.listener.connections,
            }
        if self.tail is not None:
            out["file"] = {
                "path": str(self.tail.path),
                "bytes_read": self.tail.bytes_read,
                "oversized": self.tail.oversized,
            }
        return out
