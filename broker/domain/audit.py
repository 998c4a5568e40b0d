"""Audit events and their hash chain.

Every state change writes one :class:`AuditEvent` in the same transaction. Each event's ``hash`` is
SHA-256 over the previous event's hash and the event's canonical JSON, so editing, deleting,
inserting or reordering any event breaks the chain from that point on.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

GENESIS_HASH = "0" * 64


class EventName(StrEnum):
    SESSION_START = "broker.session.start"
    SESSION_END = "broker.session.end"
    AUTH_FAILURE = "broker.auth.failure"
    TASK_REQUEST = "broker.task.request"
    TASK_DECISION = "broker.task.decision"
    TASK_APPROVAL = "broker.task.approval"
    TASK_COMPLETE = "broker.task.complete"
    TASK_EXPIRE = "broker.task.expire"
    CREDENTIAL_ISSUE = "broker.credential.issue"
    CREDENTIAL_USE = "broker.credential.use"
    CREDENTIAL_REVOKE = "broker.credential.revoke"
    REQUEST_DENIED = "broker.request.denied"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    PENDING = "pending"


def new_trace_id() -> str:
    return secrets.token_hex(16)


def new_span_id() -> str:
    return secrets.token_hex(8)


@dataclass(slots=True)
class AuditEvent:
    """One audited fact; exported as one span of its task's (or session's) trace."""

    name: str
    outcome: str
    time: float
    trace_id: str
    span_id: str = field(default_factory=new_span_id)
    parent_span_id: str | None = None
    end_time: float | None = None
    session_id: str | None = None
    task_id: str | None = None
    credential_id: str | None = None
    actor_issuer: str | None = None
    actor_subject: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict)
    links: list[dict[str, str]] = field(default_factory=list)
    id: str = field(default_factory=lambda: "evt_" + secrets.token_urlsafe(12))

    def body(self) -> dict[str, Any]:
        """The fields covered by the hash chain."""
        return {
            "id": self.id,
            "name": self.name,
            "outcome": self.outcome,
            "time": self.time,
            "end_time": self.end_time if self.end_time is not None else self.time,
            "session_id": self.session_id,
            "task_id": self.task_id,
            "credential_id": self.credential_id,
            "actor_issuer": self.actor_issuer,
            "actor_subject": self.actor_subject,
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "links": self.links,
            "attributes": self.attributes,
        }


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chain_hash(prev_hash: str, body: dict[str, Any]) -> str:
    """Hash of one event, bound to its predecessor."""
    return hashlib.sha256(prev_hash.encode() + b"\n" + canonical_json(body)).hexdigest()
