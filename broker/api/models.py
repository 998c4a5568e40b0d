"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from broker.domain.records import Approval, Credential, Task


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scope: str = Field(min_length=1, max_length=128)
    params: dict[str, Any] = Field(default_factory=dict)
    purpose: str = Field(min_length=1, max_length=2000)
    ttl: int | None = Field(default=None, ge=60, le=7 * 86_400)
    conversation_id: str | None = Field(default=None, max_length=256)


class ApprovalOut(BaseModel):
    """One approver's decision on a task."""

    issuer: str
    subject: str
    display_name: str | None
    decision: str
    reason: str | None
    created_at: float
    #: False when the decision no longer counts (stale, or made on another version of the task).
    counts: bool

    @classmethod
    def of(cls, approval: Approval, *, counts: bool) -> ApprovalOut:
        return cls(
            issuer=approval.issuer,
            subject=approval.subject,
            display_name=approval.display_name,
            decision=approval.decision,
            reason=approval.reason,
            created_at=approval.created_at,
            counts=counts,
        )


class CredentialStateOut(BaseModel):
    """Where one of a task's credentials stands (identifiers and states, never a secret).

    ``revoke_pending`` means the broker could not take it back yet and keeps retrying; the
    credential may still work until then or until ``expires_at``.
    """

    id: str
    backend: str
    kind: str
    state: str
    issued_at: float | None
    expires_at: float | None
    revoked_at: float | None
    revoke_attempts: int
    next_attempt_at: float | None
    #: Why a mint failed (``failed`` credentials): a stable code such as ``scope_misconfigured``.
    error_code: str | None = None

    @classmethod
    def of(cls, cred: Credential) -> CredentialStateOut:
        code = cred.details.get("error_code")
        return cls(
            id=cred.id,
            backend=cred.backend,
            kind=cred.kind,
            state=cred.state.value,
            issued_at=cred.issued_at,
            expires_at=cred.expires_at,
            revoked_at=cred.revoked_at,
            revoke_attempts=cred.revoke_attempts,
            next_attempt_at=cred.next_attempt_at,
            error_code=str(code) if code else None,
        )


class TaskOut(BaseModel):
    id: str
    scope: str
    state: str
    params: dict[str, Any]
    purpose: str
    ttl: int
    requester: dict[str, str]
    template_hash: str
    created_at: float
    updated_at: float
    decided_at: float | None
    decided_by_rule: str | None
    reason: str | None
    request_expires_at: float | None
    approval_expires_at: float | None
    ends_at: float | None
    trace_id: str
    conversation_id: str | None
    #: Distinct approvals the scope requires (0: approved automatically).
    approvals_required: int = 0
    #: Decisions so far (on ``GET /v1/tasks/{id}``): who, approve or deny, when, and whether it
    #: still counts.
    approvals: list[ApprovalOut] | None = None
    #: The task's credentials and their states (on ``GET /v1/tasks/{id}`` and when ending a
    #: task): a ``revoke_pending`` one has not been taken back yet.
    credentials: list[CredentialStateOut] | None = None

    @classmethod
    def of(cls, task: Task, credentials: list[Credential] | None = None) -> TaskOut:
        return cls(
            id=task.id,
            scope=task.scope,
            state=task.state.value,
            params=task.params,
            purpose=task.purpose,
            ttl=task.ttl,
            requester={"issuer": task.issuer, "subject": task.subject},
            template_hash=task.template_hash,
            created_at=task.created_at,
            updated_at=task.updated_at,
            decided_at=task.decided_at,
            decided_by_rule=task.decided_by_rule,
            reason=task.reason,
            request_expires_at=task.request_expires_at,
            approval_expires_at=task.approval_expires_at,
            ends_at=task.ends_at,
            trace_id=task.trace_id,
            conversation_id=task.conversation_id,
            approvals_required=task.approvals_required,
            credentials=None
            if credentials is None
            else [CredentialStateOut.of(c) for c in credentials],
        )


class CredentialOut(BaseModel):
    """A credential's record. ``secret`` and ``env`` are present only in the mint response."""

    credential_id: str
    task_id: str
    backend: str
    kind: str
    state: str
    issued_at: float | None
    expires_at: float | None
    details: dict[str, Any]
    secret: dict[str, str] | None = None
    env: dict[str, str] | None = None

    @classmethod
    def of(
        cls,
        cred: Credential,
        *,
        secret: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
    ) -> CredentialOut:
        return cls(
            credential_id=cred.id,
            task_id=cred.task_id,
            backend=cred.backend,
            kind=cred.kind,
            state=cred.state.value,
            issued_at=cred.issued_at,
            expires_at=cred.expires_at,
            details=cred.details,
            secret=secret,
            env=env,
        )


class TokenResponse(BaseModel):
    """RFC 8693 section 2.2.1."""

    access_token: str
    issued_token_type: str = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
    token_type: str = "Bearer"  # noqa: S105
    expires_in: int


class SessionOut(BaseModel):
    session_id: str
    issuer: str
    subject: str
    display_name: str | None
    groups: list[str]
    roles: list[str]
    created_at: float
    expires_at: float
    #: Where the session works (``api``; a console session is refused here).
    via: str = "api"
    #: Whether the ID token named a run (CI run, pod): later sessions of that run reach its tasks.
    run_bound: bool = False
