"""Turn stored audit events into OpenTelemetry spans (the only place spans are built)."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

import broker

SCOPE = InstrumentationScope("broker.audit", broker.__version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def _ctx(trace_id: str, span_id: str) -> SpanContext:
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=_SAMPLED)


def _attr_value(value: Any) -> Any:
    """OTLP attributes are scalars or homogeneous lists; anything else travels as JSON text."""
    import json

    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def event_to_span(row: dict[str, Any], resource: Resource) -> ReadableSpan:
    """One audit event row -> one finished span with deterministic ids."""
    attributes: dict[str, Any] = {
        k: _attr_value(v) for k, v in (row.get("attributes") or {}).items() if v is not None
    }
    attributes.update(
        {
            "broker.event.id": row["id"],
            "broker.event.seq": int(row["seq"]),
            "broker.event.outcome": row["outcome"],
            "broker.event.hash": row["hash"],
            "broker.event.prev_hash": row["prev_hash"],
        }
    )
    for key, column in (
        ("broker.task.id", "task_id"),
        ("broker.credential.id", "credential_id"),
        ("broker.session.id", "session_id"),
        ("broker.principal.sub", "actor_subject"),
    ):
        if row.get(column) and key not in attributes:
            attributes[key] = row[column]
    parent = _ctx(row["trace_id"], row["parent_span_id"]) if row.get("parent_span_id") else None
    links = [
        Link(
            _ctx(link["trace_id"], link["span_id"]),
            {"broker.link.type": link.get("type", "related")},
        )
        for link in row.get("links") or []
    ]
    start = int(row["time"] * 1e9)
    end = max(start, int(row["end_time"] * 1e9))
    failed = row["outcome"] == "failure"
    return ReadableSpan(
        name=row["name"],
        context=_ctx(row["trace_id"], row["span_id"]),
        parent=parent,
        resource=resource,
        attributes=attributes,
        events=[Event("broker.audit", {"broker.event.outcome": row["outcome"]}, timestamp=start)],
        links=links,
        kind=SpanKind.INTERNAL,
        status=Status(StatusCode.ERROR, row["outcome"]) if failed else Status(StatusCode.OK),
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
