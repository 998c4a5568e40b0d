"""Small helpers every use case shares."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from broker.domain.audit import AuditEvent
from broker.errors import AuditUnavailable
from broker.store import Tx, repo

Clock = Callable[[], float]

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """The caller's W3C trace context, when it sent a valid one."""

    trace_id: str
    span_id: str


def parse_traceparent(value: str | None) -> TraceContext | None:
    """Parse a W3C ``traceparent``; invalid or all-zero values are ignored, as the spec says."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return TraceContext(match.group(1), match.group(2))


def record(conn: Tx, event: AuditEvent) -> None:
    """Append an audit event in the caller's transaction; failing to do so fails the operation."""
    try:
        repo.append_audit(conn, event)
    except Exception as exc:
        raise AuditUnavailable(internal=repr(exc)) from exc
