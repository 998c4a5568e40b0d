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
    #: How the session was opened: ``api`` (``POST /oauth2/token``, a bearer token) or
    #: ``console`` (the console's sign-in, a cookie). Each works only where it was opened.
    via: str = "api"
    #: The run the ID token was issued to (a digest of the issuer's ``claims.run_identity``
    #: claims), or None: then the session's tasks are reachable from this session only.
    run_identity: str | None = None

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
    #: The requesting session's run identity (None: the task belongs to its session alone).
    run_identity: str | None = None
    #: ``session`` (the session or run that asked) or ``principal`` (any session of the
    #: requester: the template's ``share``).
    share: str = "session"
    #: The requester's persons when it asked (``Principal.persons``), so they never approve.
    requester_persons: tuple[str, ...] | None = None

    @property
    def requester(self) -> tuple[str, str]:
        return (self.issuer, self.subject)

    def reachable_from(self, session: Session) -> bool:
        """Whether ``session`` may see and use this task: the requester's own session, a later
        session of the same run, or any session of the requester when the scope shares it."""
        if self.requester != session.principal.key:
            return False
        if self.session_id == session.id or self.share == "principal":
            return True
        return self.run_identity is not None and self.run_identity == session.run_identity


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
    #: The approver's persons when they decided (``Principal.persons``): one person counts once.
    persons: tuple[str, ...] | None = None


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
