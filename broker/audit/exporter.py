"""Export the audit outbox to OTLP, retrying with backoff; nothing is lost while a collector is down.

Events are read in order from the store, exported, and only then marked exported. On PostgreSQL
the batch is locked with ``FOR UPDATE SKIP LOCKED`` while it is exported, so several replicas
share the work without a leader and never export the same event twice. Memory is bounded by the
batch size: the store, not a queue, holds the backlog.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import broker
from broker.audit.spans import event_to_span
from broker.settings import OtlpSettings
from broker.store import Database, repo

log = logging.getLogger(__name__)


def build_exporter(settings: OtlpSettings) -> SpanExporter | None:
    """The configured OTLP exporter, or None when no endpoint is set."""
    if not settings.endpoint:
        return None
    headers = {k: v.get_secret_value() for k, v in settings.headers.items()}
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(
            endpoint=settings.endpoint,
            headers=headers or None,
            timeout=int(settings.timeout),
            insecure=settings.endpoint.startswith("http://"),
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    endpoint = settings.endpoint.rstrip("/")
    if not endpoint.endswith("/v1/traces"):
        endpoint += "/v1/traces"
    return HttpExporter(endpoint=endpoint, headers=headers or None, timeout=settings.timeout)


class OutboxExporter:
    """Drains unexported audit events to a span exporter."""

    def __init__(
        self,
        db: Database,
        exporter: SpanExporter,
        settings: OtlpSettings,
        clock: Callable[[], float],
    ) -> None:
        self.db = db
        self.exporter = exporter
        self.settings = settings
        self.clock = clock
        self.resource = Resource.create(
            {"service.name": settings.service_name, "service.version": broker.__version__}
        )
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.exported_total = 0
        self.failures = 0

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
            with self.db.write() as conn:
                rows = repo.unexported_events(conn, self.settings.batch_size, skip_locked=True)
                if not rows or not self._export(rows):
                    return 0
                repo.mark_exported(conn, [int(r["seq"]) for r in rows], self.clock())
        self.exported_total += len(rows)
        return len(rows)

    def _export(self, rows: list[dict[str, object]]) -> bool:
        spans: Sequence[ReadableSpan] = [event_to_span(r, self.resource) for r in rows]
        if self.exporter.export(spans) is SpanExportResult.SUCCESS:
            return True
        self.failures += 1
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

    def notify(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        backoff = self.settings.interval
        while not self._stop.is_set():
            try:
                n = self.drain()
                failed = self.failures
            except Exception:
                log.exception("audit export failed")
                n, failed = 0, -1
            if n == 0 and failed != 0 and self._pending():
                backoff = min(self.settings.max_backoff, backoff * 2)
            else:
                backoff = self.settings.interval
            self.failures = 0
            self._wake.wait(backoff)
            self._wake.clear()

    def _pending(self) -> bool:
        try:
            with self.db.read() as conn:
                return repo.count_unexported(conn) > 0
        except Exception:
            return True

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="broker-audit-export", daemon=True
            )
            self._thread.start()

    def stop(self, *, flush: bool = True) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if flush:
            try:
                self.drain(max_batches=20)
            except Exception:
                log.exception("final audit export failed")
        self.exporter.shutdown()
