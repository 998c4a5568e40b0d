"""Audit events, their attribute rules and their hash chain.

Every state change writes one :class:`AuditEvent` in the same transaction. Each event's ``hash`` is
SHA-256 over the previous event's hash and the event's canonical JSON, so editing, deleting,
inserting or reordering any event breaks the chain from that point on; signed checkpoints
(:func:`checkpoint_statement`) pin the chain so that it cannot be recomputed unnoticed.

Attributes pass :func:`sanitize_attributes` before they are hashed and stored: only documented
namespaces are kept (the allowlist) and every value is scrubbed of secrets
(:mod:`broker.domain.scrub`). The conventions are documented in ``docs/audit.md``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from broker.domain.scrub import scrub_text, scrub_value

GENESIS_HASH = "0" * 64

#: Version of the checkpoint statement format (part of what is signed).
CHECKPOINT_VERSION = 1


class EventName(StrEnum):
    """Span names; each is documented in docs/audit.md."""

    SESSION_START = "broker.session.start"
    SESSION_END = "broker.session.end"
    AUTH_FAILURE = "broker.auth.failure"
    #: The refusals of one (client address, reason) in one window beyond the first, counted.
    AUTH_FAILURE_SUMMARY = "broker.auth.failure_summary"
    TASK_REQUEST = "broker.task.request"
    TASK_DECISION = "broker.task.decision"
    TASK_APPROVAL = "broker.task.approval"
    #: An attempt to approve or deny that was refused (not an approver, already decided, the
    #: requester, expired): never a decision, so it never carries the name of one.
    APPROVAL_REFUSED = "broker.approval.refused"
    TASK_COMPLETE = "broker.task.complete"
    TASK_EXPIRE = "broker.task.expire"
    CREDENTIAL_ISSUE = "broker.credential.issue"
    CREDENTIAL_USE = "broker.credential.use"
    CREDENTIAL_REVOKE = "broker.credential.revoke"
    CREDENTIAL_EXPIRE = "broker.credential.expire"
    REQUEST_DENIED = "broker.request.denied"
    #: A use record (OpenBao, CloudTrail, introspection) that claims to concern a broker
    #: credential but matches none: reported, never dropped.
    USE_UNMATCHED = "broker.use.unmatched"
    #: A signed checkpoint of the audit chain.
    AUDIT_CHECKPOINT = "broker.audit.checkpoint"
    #: An auditor read the audit log through the API.
    AUDIT_ACCESS = "broker.audit.access"


class Outcome(StrEnum):
    SUCCESS = "success"
    FAILURE = "failure"
    DENIED = "denied"
    PENDING = "pending"


class UseSource(StrEnum):
    """Where a record of a credential's use came from (``broker.use.source``)."""

    OPENBAO = "openbao"
    CLOUDTRAIL = "cloudtrail"
    INTROSPECTION = "introspection"
    #: Reported by the agent's own tooling (``broker exec``, MCP, SDK): a claim, not an observation.
    EXEC = "exec"


# --- attribute allowlist ----------------------------------------------------------------------

#: Attribute namespaces an audit event may carry. Everything else is dropped (and the dropped
#: names listed under ``broker.attributes.dropped``) so that nothing unplanned is recorded.
ALLOWED_PREFIXES = (
    "broker.",
    "vault.",
    "aws.",
)
#: Single attributes outside those namespaces (OpenTelemetry semantic conventions).
ALLOWED_KEYS = frozenset(
    {
        "gen_ai.conversation.id",
        "client.address",
        "client.port",
        "server.address",
        "user_agent.original",
        "error.type",
        "http.response.status_code",
        "cloud.region",
        "cloud.account.id",
    }
)
DROPPED_KEY = "broker.attributes.dropped"


def attribute_allowed(key: str) -> bool:
    """Whether ``key`` belongs to a documented attribute namespace."""
    return key in ALLOWED_KEYS or key.startswith(ALLOWED_PREFIXES)


def sanitize_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """The attributes that may be recorded: allowlisted keys, secrets scrubbed, sizes bounded.

    Idempotent, so it can run again on export over what the store already holds.
    """
    out: dict[str, Any] = {}
    dropped: list[str] = []
    for raw_key, value in attributes.items():
        key = str(raw_key)
        if value is None:
            continue
        if key == DROPPED_KEY:
            dropped.extend(str(v) for v in (value if isinstance(value, list) else [value]))
            continue
        if not attribute_allowed(key):
            dropped.append(scrub_text(key, limit=128))
            continue
        out[key] = scrub_value(value, key=key)
    if dropped:
        out[DROPPED_KEY] = sorted(set(dropped))
    return out


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


#: The columns of a stored event that the hash covers (the body of :meth:`AuditEvent.body`).
BODY_FIELDS = (
    "id",
    "name",
    "outcome",
    "time",
    "end_time",
    "session_id",
    "task_id",
    "credential_id",
    "actor_issuer",
    "actor_subject",
    "trace_id",
    "span_id",
    "parent_span_id",
    "links",
    "attributes",
)


def body_of(row: dict[str, Any]) -> dict[str, Any]:
    """The hashed body of a stored (or exported) event row."""
    return {name: row.get(name) for name in BODY_FIELDS}


def row_hash(row: dict[str, Any]) -> str:
    """Recompute a stored row's hash from its predecessor's hash and its own content."""
    return chain_hash(str(row["prev_hash"]), body_of(row))


def checkpoint_statement(seq: int, head_hash: str, created_at: float) -> bytes:
    """The exact bytes a checkpoint signature covers (the key id is stored beside it)."""
    return canonical_json(
        {
            "v": CHECKPOINT_VERSION,
            "kind": "broker.audit.checkpoint",
            "seq": int(seq),
            "hash": head_hash,
            "created_at": created_at,
        }
    )
