"""An OTLP/HTTP receiver that decodes what really crossed the wire (protobuf), for tests."""

from __future__ import annotations

import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue


def any_value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


@dataclass
class WireSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    resource: dict[str, Any]
    start_ns: int
    end_ns: int
    status_code: int


@dataclass
class OtlpReceiver:
    """Collects spans posted to ``/v1/traces``; ``fail`` makes it answer 503 (a collector outage)."""

    spans: list[WireSpan] = field(default_factory=list)
    requests: int = 0
    fail: bool = False
    raw_bodies: list[bytes] = field(default_factory=list)
    #: Request headers of every POST, and the number of spans in each accepted request.
    headers: list[dict[str, str]] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.requests += 1
                receiver.headers.append({k.lower(): v for k, v in self.headers.items()})
                if receiver.fail or self.path != "/v1/traces":
                    self.send_response(503 if receiver.fail else 404)
                    self.end_headers()
                    return
                receiver.raw_bodies.append(body)
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                receiver.batch_sizes.append(
                    sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
                )
                for rs in req.resource_spans:
                    resource = {a.key: any_value(a.value) for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            receiver.spans.append(
                                WireSpan(
                                    name=s.name,
                                    trace_id=s.trace_id.hex(),
                                    span_id=s.span_id.hex(),
                                    parent_span_id=s.parent_span_id.hex(),
                                    attributes={a.key: any_value(a.value) for a in s.attributes},
                                    links=[
                                        (link.trace_id.hex(), link.span_id.hex())
                                        for link in s.links
                                    ],
                                    resource=resource,
                                    start_ns=s.start_time_unix_nano,
                                    end_ns=s.end_time_unix_nano,
                                    status_code=s.status.code,
                                )
                            )
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def by_name(self, name: str) -> list[WireSpan]:
        return [s for s in self.spans if s.name == name]

    def clear(self) -> None:
        self.spans.clear()
        self.raw_bodies.clear()
        self.requests = 0
