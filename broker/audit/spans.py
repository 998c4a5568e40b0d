"""Turn stored audit events into OpenTelemetry spans (the only place spans are built).

Each stored event becomes exactly one finished span with the event's own trace and span ids, so a
span exported twice (after a crash between send and mark) is recognisably the same span. The
conventions (names, attributes, parents, links) are documented in ``docs/audit.md``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

import broker
from broker.domain.audit import Outcome, sanitize_attributes

SCOPE = InstrumentationScope("broker.audit", broker.__version__)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)

#: Columns copied onto every span as attributes (when set and not already present).
_ID_ATTRIBUTES = (
    ("broker.task.id", "task_id"),
    ("broker.credential.id", "credential_id"),
    ("broker.session.id", "session_id"),
    ("broker.principal.sub", "actor_subject"),
    ("broker.principal.issuer", "actor_issuer"),
)


def build_resource(service_name: str, extra: Mapping[str, str] | None = None) -> Resource:
    """The resource every audit span carries."""
    return Resource.create(
        {
            "service.name": service_name,
            "service.namespace": "broker",
            "service.version": broker.__version__,
            **(extra or {}),
        }
    )


def _ctx(trace_id: str, span_id: str) -> SpanContext:
    return SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=_SAMPLED)


def _attr_value(value: Any) -> Any:
    """OTLP attributes are scalars or homogeneous lists; anything else travels as JSON text."""
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    return json.dumps(value, sort_keys=True, default=str)


def span_attributes(row: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of an event's span: its own (allowlisted, scrubbed) plus ids and chain."""
    own = sanitize_attributes(dict(row.get("attributes") or {}))
    attributes: dict[str, Any] = {k: _attr_value(v) for k, v in own.items()}
    attributes.update(
        {
            "broker.event.id": row["id"],
            "broker.event.seq": int(row["seq"]),
            "broker.event.outcome": row["outcome"],
            "broker.event.hash": row["hash"],
            "broker.event.prev_hash": row["prev_hash"],
        }
    )
    for key, column in _ID_ATTRIBUTES:
        if row.get(column) and key not in attributes:
            attributes[key] = row[column]
    return attributes


def _status(outcome: str) -> Status:
    if outcome in (Outcome.FAILURE, Outcome.DENIED):
        return Status(StatusCode.ERROR, outcome)
    if outcome == Outcome.SUCCESS:
        return Status(StatusCode.OK)
    return Status(StatusCode.UNSET)


def event_to_span(row: Mapping[str, Any], resource: Resource) -> ReadableSpan:
    """One audit event row -> one finished span with deterministic ids."""
    parent = _ctx(row["trace_id"], row["parent_span_id"]) if row.get("parent_span_id") else None
    links = [
        Link(
            _ctx(link["trace_id"], link["span_id"]),
            {"broker.link.type": str(link.get("type", "related"))},
        )
        for link in row.get("links") or []
        if link.get("trace_id") and link.get("span_id")
    ]
    start = int(float(row["time"]) * 1e9)
    end = max(start, int(float(row["end_time"]) * 1e9))
    return ReadableSpan(
        name=row["name"],
        context=_ctx(row["trace_id"], row["span_id"]),
        parent=parent,
        resource=resource,
        attributes=span_attributes(row),
        events=[Event("broker.audit", {"broker.event.outcome": row["outcome"]}, timestamp=start)],
        links=links,
        kind=SpanKind.INTERNAL,
        status=_status(str(row["outcome"])),
        start_time=start,
        end_time=end,
        instrumentation_scope=SCOPE,
    )
