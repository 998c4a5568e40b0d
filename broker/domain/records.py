"""What the store keeps, as plain values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from broker.domain.principal import Principal
from broker.domain.task import CredentialState, TaskState


@dataclass(frozen=True, slots=True)
class Session:
    id: str
    principal: Principal
    created_at: float
    expires_at: float
    ended_at: float | None
    trace_id: str
    span_id: str

    def live(self, now: float) -> bool:
        return self.ended_at is None and now < self.expires_at


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    session_id: str
    issuer: str
    subject: str
    scope: str
    template_hash: str
    params: dict[str, Any]
    purpose: str
    ttl: int
    state: TaskState
    created_at: float
    updated_at: float
    trace_id: str
    span_id: str
    reason: str | None = None
    decided_by_rule: str | None = None
    decided_at: float | None = None
    request_expires_at: float | None = None
    approval_expires_at: float | None = None
    ends_at: float | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    parent_span_id: str | None = None
    conversation_id: str | None = None
    mints: int = 0
    #: The binding hash (domain.task.binding_hash) the task's approval was decided on.
    decision_hash: str | None = None
    #: Distinct approvals the template asked for when the task was requested (0: automatic).
    approvals_required: int = 0

    @property
    def requester(self) -> tuple[str, str]:
        return (self.issuer, self.subject)


@dataclass(frozen=True, slots=True)
class Approval:
    id: str
    task_id: str
    issuer: str
    subject: str
    decision: str
    template_hash: str
    created_at: float
    display_name: str | None = None
    reason: str | None = None
    #: The task's binding hash this decision was made on; a changed task voids it.
    binding_hash: str | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """A minted credential as the broker remembers it: never the secret."""

    id: str
    task_id: str
    backend: str
    kind: str
    state: CredentialState
    created_at: float
    handle: str | None = None
    issued_at: float | None = None
    expires_at: float | None = None
    revoked_at: float | None = None
    revoke_attempts: int = 0
    next_attempt_at: float | None = None
    last_error: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    #: A backend's sealed revocation material (``Minted.sealed``): ciphertext under a key that
    #: is not in the store; cleared once the credential is revoked or expired.
    sealed: str | None = field(default=None, repr=False)
