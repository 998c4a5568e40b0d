"""Export the audit outbox to OTLP (HTTP or gRPC); a collector outage loses nothing.

The store, not a queue in memory, is the record: events are read in chain order from the
``audit_events`` table, sent, and only then marked exported. Memory is bounded by one batch.

Why not the SDK's exporters: they retry inside ``export()`` (sleeping up to their timeout), so a
request the collector did receive but answered too late would be sent again by the exporter
itself, and a long retry loop would hold the batch (and on PostgreSQL its row locks) hostage.
Here each call makes exactly one attempt with a bounded timeout; retrying, with exponential
backoff, jitter and ``Retry-After``, is the outbox's job, and nothing is ever dropped: a batch is
retried until the collector accepts it.

Several replicas on PostgreSQL share the work without a leader: a batch is locked with
``FOR UPDATE SKIP LOCKED`` for the duration of its export, so no two replicas send the same event.
Spans carry the event's own ids, so even the one unavoidable duplicate (a crash after the collector
accepted a batch but before it was marked) is the same span, not a new one.
"""

from __future__ import annotations

import gzip
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource

from broker.audit.spans import build_resource, event_to_span
from broker.domain.scrub import scrub_text
from broker.settings import OtlpSettings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: HTTP statuses the OTLP specification calls retryable. Others are retried too (an audit
#: record is never dropped), but logged as configuration problems.
RETRYABLE_HTTP = frozenset({429, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of one attempt to send one batch."""

    ok: bool
    detail: str = ""
    retry_after: float | None = None
    rejected: int = 0


class SpanSender(Protocol):
    """Sends one OTLP trace request once: no retries, a bounded timeout."""

    def send(self, request: ExportTraceServiceRequest) -> SendResult: ...

    def close(self) -> None: ...


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class HttpSender:
    """OTLP/HTTP with protobuf bodies (``POST {endpoint}/v1/traces``)."""

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        compression: str = "gzip",
        client: httpx.Client | None = None,
    ) -> None:
        endpoint = endpoint.rstrip("/")
        if not endpoint.endswith("/v1/traces"):
            endpoint += "/v1/traces"
        self.endpoint = endpoint
        self.gzip = compression == "gzip"
        self.headers = {
            **dict(headers or {}),
            "Content-Type": "application/x-protobuf",
            **({"Content-Encoding": "gzip"} if self.gzip else {}),
        }
        # No redirects (a redirect could carry the headers elsewhere); one attempt per call.
        self.client = client or httpx.Client(timeout=httpx.Timeout(timeout), follow_redirects=False)

    def send(self, request: ExportTraceServiceRequest) -> SendResult:
        body = request.SerializeToString()
        if self.gzip:
            body = gzip.compress(body, compresslevel=5)
        try:
            resp = self.client.post(self.endpoint, content=body, headers=self.headers)
        except httpx.HTTPError as exc:
            return SendResult(False, f"{type(exc).__name__}: {scrub_text(str(exc), limit=200)}")
        if 200 <= resp.status_code < 300:
            rejected = 0
            if resp.content:
                try:
                    answer = ExportTraceServiceResponse.FromString(resp.content)
                    rejected = int(answer.partial_success.rejected_spans)
                except Exception:  # a non-protobuf 2xx body still means "accepted"
                    rejected = 0
            return SendResult(True, rejected=rejected)
        kind = "retryable" if resp.status_code in RETRYABLE_HTTP else "refused"
        return SendResult(
            False,
            f"HTTP {resp.status_code} ({kind})",
            retry_after=_retry_after(resp.headers.get("Retry-After")),
        )

    def close(self) -> None:
        self.client.close()


class GrpcSender:
    """OTLP/gRPC (``opentelemetry.proto.collector.trace.v1.TraceService/Export``)."""

    def __init__(
        self,
        endpoint: str,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        compression: str = "gzip",
    ) -> None:
        import grpc  # type: ignore[import-untyped]  # grpcio ships no type stubs
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
            TraceServiceStub,
        )

        parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
        target = parts.netloc or endpoint
        # gRPC's own retries stay off: retrying is the outbox's job (one attempt per send).
        options = [("grpc.enable_retries", 0)]
        if parts.scheme == "https":
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(), options)
        else:
            self.channel = grpc.insecure_channel(target, options)
        self.stub = TraceServiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout
        self.metadata = tuple((k.lower(), v) for k, v in (headers or {}).items())
        self.compression = grpc.Compression.Gzip if compression == "gzip" else None
        self._grpc = grpc

    def send(self, request: ExportTraceServiceRequest) -> SendResult:
        grpc = self._grpc
        try:
            answer = self.stub.Export(
                request,
                timeout=self.timeout,
                metadata=self.metadata,
                compression=self.compression,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            return SendResult(False, f"gRPC {name}")
        return SendResult(True, rejected=int(answer.partial_success.rejected_spans))

    def close(self) -> None:
        self.channel.close()


def build_sender(settings: OtlpSettings) -> SpanSender | None:
    """The configured sender, or None when no endpoint is set."""
    if not settings.endpoint:
        return None
    headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
    if settings.protocol == "grpc":
        return GrpcSender(
            settings.endpoint,
            headers=headers,
            timeout=settings.timeout,
            compression=settings.compression,
        )
    return HttpSender(
        settings.endpoint,
        headers=headers,
        timeout=settings.timeout,
        compression=settings.compression,
    )


@dataclass
class ExportStatus:
    """What an operator needs to know about the export (no secrets, no endpoints' headers)."""

    exported_total: int = 0
    batches: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    rejected_total: int = 0
    last_success_at: float | None = None
    last_failure_at: float | None = None
    last_error: str | None = None
    next_attempt_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "exported_total": self.exported_total,
            "batches": self.batches,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "rejected_total": self.rejected_total,
            "last_success_at": self.last_success_at,
            "last_failure_at": self.last_failure_at,
            "last_error": self.last_error,
            "next_attempt_at": self.next_attempt_at,
        }


class OutboxExporter:
    """Drains unexported audit events to a span sender, in chain order, with backoff."""

    def __init__(
        self,
        db: Database,
        sender: SpanSender,
        settings: OtlpSettings,
        clock: Callable[[], float],
        *,
        resource: Resource | None = None,
    ) -> None:
        self.db = db
        self.sender = sender
        self.settings = settings
        self.clock = clock
        self.resource = resource or build_resource(settings.service_name)
        self.status = ExportStatus()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: SendResult | None = None

    # --- one batch ------------------------------------------------------------------------

    def export_once(self) -> int:
        """Export one batch; returns how many events were exported (0 when idle or failing)."""
        if self.db.is_sqlite:
            # One process owns a SQLite store: read, export, then mark, without holding the
            # write lock across the network call.
            with self.db.read() as conn:
                rows = repo.unexported_events(conn, self.settings.batch_size, skip_locked=False)
            if not rows or not self._export(rows):
                return 0
            with self.db.write() as conn:
                repo.mark_exported(conn, [int(r["seq"]) for r in rows], self.clock())
        else:
            # The rows stay locked until they are marked, so no other replica sends them.
            with self.db.write() as conn:
                rows = repo.unexported_events(conn, self.settings.batch_size, skip_locked=True)
                if not rows or not self._export(rows):
                    return 0
                repo.mark_exported(conn, [int(r["seq"]) for r in rows], self.clock())
        self.status.exported_total += len(rows)
        return len(rows)

    def _export(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        request = encode_spans([event_to_span(r, self.resource) for r in rows])
        result = self.sender.send(request)
        self._last = result
        now = self.clock()
        if result.ok:
            self.status.batches += 1
            self.status.consecutive_failures = 0
            self.status.last_success_at = now
            if result.rejected:
                # The collector accepted the request but refused some spans for good: retrying
                # cannot change that. The events stay in the store (the record); say so loudly.
                self.status.rejected_total += result.rejected
                log.warning(
                    "the OTLP collector rejected %d of %d audit spans (first seq %s)",
                    result.rejected,
                    len(rows),
                    rows[0]["seq"],
                )
            return True
        self.status.failures += 1
        self.status.consecutive_failures += 1
        self.status.last_failure_at = now
        self.status.last_error = result.detail
        return False

    def drain(self, max_batches: int = 1_000_000) -> int:
        """Export until the outbox is empty or an export fails."""
        total = 0
        for _ in range(max_batches):
            n = self.export_once()
            if n == 0:
                break
            total += n
        return total

    # --- background -----------------------------------------------------------------------

    def backoff(self) -> float:
        """Seconds to wait after the latest failure: exponential, jittered, capped."""
        failures = max(1, self.status.consecutive_failures)
        ceiling = min(self.settings.max_backoff, self.settings.interval * 2.0**failures)
        delay = random.uniform(ceiling / 2, ceiling)  # noqa: S311  # jitter, not cryptography
        if self._last is not None and self._last.retry_after is not None:
            delay = max(delay, min(self._last.retry_after, self.settings.max_backoff))
        return delay

    def notify(self) -> None:
        """Wake the exporter now (new events were written)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            wait = self.settings.interval
            try:
                before = self.status.consecutive_failures
                self.drain()
                if self.status.consecutive_failures > before:
                    wait = self.backoff()
                    if self.status.consecutive_failures in (1, 10) or (
                        self.status.consecutive_failures % 100 == 0
                    ):
                        log.warning(
                            "audit export failing (%s); %d attempts so far, retrying in %.1fs; "
                            "events stay in the store",
                            self.status.last_error,
                            self.status.consecutive_failures,
                            wait,
                        )
            except Exception as exc:
                # The store itself failed (for example PostgreSQL restarting): back off too.
                self.status.failures += 1
                self.status.consecutive_failures += 1
                self.status.last_error = type(exc).__name__
                wait = self.backoff()
                log.warning("audit export could not read the store: %s", type(exc).__name__)
            self.status.next_attempt_at = self.clock() + wait
            self._wake.wait(wait)
            self._wake.clear()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="broker-audit-export", daemon=True
            )
            self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.timeout + 5)
            self._thread = None
        if flush:
            try:
                self.drain(max_batches=20)
            except Exception:
                log.exception("final audit export failed; the events stay in the store")
        self.sender.close()

    def health(self) -> dict[str, Any]:
        """Status plus the backlog still in the store."""
        out = self.status.as_dict()
        try:
            with self.db.read() as conn:
                out["backlog"] = repo.count_unexported(conn)
                out["oldest_unexported_at"] = repo.oldest_unexported_time(conn)
        except Exception:
            out["backlog"] = None
        return out
