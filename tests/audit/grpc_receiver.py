"""An OTLP/gRPC receiver for tests: a real gRPC server decoding what crossed the wire."""

from __future__ import annotations

from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from tests.support.otlp import WireSpan, any_value


@dataclass
class GrpcReceiver:
    """Collects spans sent to ``TraceService/Export``; ``fail`` answers UNAVAILABLE."""

    spans: list[WireSpan] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    requests: int = 0
    fail: bool = False
    _server: Any = None
    port: int = 0

    def start(self) -> GrpcReceiver:
        receiver = self

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:  # the name gRPC generated
                receiver.requests += 1
                receiver.metadata.append(dict(context.invocation_metadata()))
                if receiver.fail:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "collector down")
                for rs in request.resource_spans:
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
                                    links=[(x.trace_id.hex(), x.span_id.hex()) for x in s.links],
                                    resource=resource,
                                    start_ns=s.start_time_unix_nano,
                                    end_ns=s.end_time_unix_nano,
                                    status_code=s.status.code,
                                )
                            )
                return trace_service_pb2.ExportTraceServiceResponse()

        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
