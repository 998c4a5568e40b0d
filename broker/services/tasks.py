"""Task requests, decisions and completion."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

from broker.domain.audit import (
    AuditEvent,
    EventName,
    Outcome,
    canonical_json,
    new_span_id,
    new_trace_id,
)
from broker.domain.ids import new_id
from broker.domain.records import Approval, Session, Task
from broker.domain.scope import ScopeTemplate
from broker.domain.task import TaskState, transition
from broker.errors import Conflict, Forbidden, NotFound, RateLimited, ValidationFailed
from broker.scopes.loader import ScopeCatalog
from broker.scopes.params import validate_params
from broker.services.common import Clock, TraceContext, record
from broker.services.revocation import Revoker
from broker.settings import Settings
from broker.store import Database, Tx, repo

MAX_PURPOSE = 2000


@dataclass(frozen=True, slots=True)
class TaskRequest:
    scope: str
    params: dict[str, Any]
    purpose: str
    ttl: int | None = None
    idempotency_key: str | None = None
    trace: TraceContext | None = None
    conversation_id: str | None = None

    def fingerprint(self) -> str:
        """Hash of what the request asks for; the same Idempotency-Key must carry the same."""
        body = {
            "scope": self.scope,
            "params": self.params,
            "purpose": self.purpose,
            "ttl": self.ttl,
        }
        return hashlib.sha256(canonical_json(body)).hexdigest()


def task_attributes(task: Task) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "broker.task.id": task.id,
        "broker.scope": task.scope,
        "broker.scope.hash": task.template_hash,
        "broker.principal.sub": task.subject,
        "broker.issuer": task.issuer,
        "broker.task.state": task.state.value,
    }
    if task.conversation_id:
        attrs["gen_ai.conversation.id"] = task.conversation_id
    return attrs


class TaskService:
    """Request, read, decide and end tasks."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: ScopeCatalog,
        revoker: Revoker,
        clock: Clock,
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.revoker = revoker
        self.clock = clock

    # --- request --------------------------------------------------------------------------

    def request(self, session: Session, req: TaskRequest) -> Task:
        """Open a task; it is approved automatically, left pending, or denied (and recorded)."""
        principal = session.principal
        if req.idempotency_key:
            with self.db.read() as conn:
                existing = repo.task_by_idempotency_key(
                    conn, principal.issuer, principal.subject, req.idempotency_key
                )
            if existing is not None:
                return self._replay(existing, req)
        loaded = self.catalog.get(req.scope)
        template = loaded.template
        now = self.clock()
        try:
            purpose = req.purpose.strip()
            if not purpose or len(purpose) > MAX_PURPOSE:
                raise ValidationFailed(
                    f"purpose must be 1 to {MAX_PURPOSE} characters", code="invalid_purpose"
                )
            params = validate_params(template, req.params)
            ttl = self._ttl(template, req.ttl)
        except ValidationFailed as exc:
            self._audit_refusal(session, req, exc.code, exc.detail, now)
            raise
        trace_id = req.trace.trace_id if req.trace else new_trace_id()
        task = Task(
            id=new_id("tsk"),
            session_id=session.id,
            issuer=principal.issuer,
            subject=principal.subject,
            scope=template.name,
            template_hash=loaded.content_hash,
            params=params,
            purpose=purpose,
            ttl=ttl,
            state=TaskState.PENDING,
            created_at=now,
            updated_at=now,
            trace_id=trace_id,
            span_id=new_span_id(),
            parent_span_id=req.trace.span_id if req.trace else None,
            idempotency_key=req.idempotency_key,
            request_hash=req.fingerprint(),
            conversation_id=req.conversation_id,
            request_expires_at=now + template.approval.request_ttl,
        )
        verdict = template.requester.evaluate(principal.claims)
        if not verdict:
            task = replace(
                task,
                state=TaskState.DENIED,
                reason=verdict.reason,
                decided_at=now,
                decided_by_rule="requester",
            )
        elif template.approval.mode == "auto":
            task = replace(
                task,
                state=TaskState.APPROVED,
                decided_at=now,
                decided_by_rule=f"scope:{template.name}:approval.mode=auto",
                approval_expires_at=now + template.approval.approval_ttl,
            )
        with self.db.write() as conn:
            if task.state is not TaskState.DENIED:
                active = repo.count_active_tasks(
                    conn, principal.issuer, principal.subject, template.name
                )
                if active >= template.max_active_tasks:
                    raise RateLimited(
                        f"you already hold {active} open tasks for {template.name!r} (the limit)",
                        code="too_many_active_tasks",
                        retry_after=60,
                    )
            repo.insert_task(conn, task)
            self._audit_request(conn, session, task, req)
            if task.state is not TaskState.PENDING:
                self._audit_decision(conn, task, actor=None)
        if task.state is TaskState.DENIED:
            raise Forbidden(
                f"the request for {template.name!r} was denied: {task.reason}",
                code="request_denied",
                extra={"task_id": task.id, "reason": task.reason},
            )
        return task

    def _replay(self, existing: Task, req: TaskRequest) -> Task:
        if existing.request_hash != req.fingerprint():
            raise Conflict(
                "this Idempotency-Key was used for a different request",
                code="idempotency_key_reused",
            )
        return existing

    def _ttl(self, template: ScopeTemplate, asked: int | None) -> int:
        if asked is None:
            return min(template.ttl.default, self.settings.credential_max_ttl)
        if isinstance(asked, bool) or not isinstance(asked, int) or asked < 60:
            raise ValidationFailed(
                "ttl must be an integer of at least 60 seconds", code="invalid_ttl"
            )
        cap = min(template.ttl.max, self.settings.credential_max_ttl)
        if asked > cap:
            raise ValidationFailed(
                f"ttl may be at most {cap} seconds for this scope", code="ttl_too_long"
            )
        return asked

    # --- read -----------------------------------------------------------------------------

    def get_own(self, session: Session, task_id: str) -> Task:
        with self.db.read() as conn:
            task = repo.get_task(conn, task_id)
        if task is None or task.requester != session.principal.key:
            raise NotFound("no such task", code="unknown_task")
        return task

    def list_own(
        self, session: Session, states: list[TaskState] | None = None, limit: int = 100
    ) -> list[Task]:
        with self.db.read() as conn:
            return repo.list_tasks(
                conn,
                issuer=session.principal.issuer,
                subject=session.principal.subject,
                states=states,
                limit=limit,
            )

    # --- end ------------------------------------------------------------------------------

    def complete(self, session: Session, task_id: str, *, cancel: bool = False) -> Task:
        """End a task: completed (or cancelled before use) and everything it holds revoked."""
        now = self.clock()
        with self.db.write() as conn:
            task = repo.get_task(conn, task_id, for_update=True)
            if task is None or task.requester != session.principal.key:
                raise NotFound("no such task", code="unknown_task")
            target = (
                TaskState.CANCELLED
                if cancel or task.state is TaskState.PENDING
                else TaskState.COMPLETED
            )
            transition(task.state, target)
            repo.update_task(
                conn, task.id, expect=task.state, state=target, updated_at=now, ends_at=now
            )
            task = replace(task, state=target, updated_at=now, ends_at=now)
            record(
                conn,
                AuditEvent(
                    name=EventName.TASK_COMPLETE,
                    outcome=Outcome.SUCCESS,
                    time=now,
                    trace_id=task.trace_id,
                    parent_span_id=task.span_id,
                    session_id=session.id,
                    task_id=task.id,
                    actor_issuer=session.principal.issuer,
                    actor_subject=session.principal.subject,
                    attributes=task_attributes(task),
                ),
            )
        self.revoker.revoke_task(task, reason="task " + target.value)
        return task

    # --- audit ----------------------------------------------------------------------------

    def _audit_request(self, conn: Tx, session: Session, task: Task, req: TaskRequest) -> None:
        record(
            conn,
            AuditEvent(
                name=EventName.TASK_REQUEST,
                outcome=Outcome.SUCCESS,
                time=task.created_at,
                trace_id=task.trace_id,
                span_id=task.span_id,
                parent_span_id=task.parent_span_id,
                session_id=session.id,
                task_id=task.id,
                actor_issuer=task.issuer,
                actor_subject=task.subject,
                links=[
                    {"trace_id": session.trace_id, "span_id": session.span_id, "type": "session"}
                ],
                attributes={
                    **task_attributes(task),
                    "broker.purpose": task.purpose,
                    "broker.task.ttl": task.ttl,
                    "broker.task.params": task.params,
                    "broker.session.id": session.id,
                },
            ),
        )

    def _audit_decision(self, conn: Tx, task: Task, actor: Approval | None) -> None:
        attrs = {
            **task_attributes(task),
            "broker.decision": task.state.value,
            "broker.decision.rule": task.decided_by_rule,
        }
        if task.reason:
            attrs["broker.decision.reason"] = task.reason
        if actor is not None:
            attrs["broker.approver.sub"] = actor.subject
            attrs["broker.approver.issuer"] = actor.issuer
        record(
            conn,
            AuditEvent(
                name=EventName.TASK_DECISION,
                outcome=Outcome.DENIED
                if task.state is TaskState.DENIED
                else (Outcome.PENDING if task.state is TaskState.PENDING else Outcome.SUCCESS),
                time=task.decided_at or task.updated_at,
                trace_id=task.trace_id,
                parent_span_id=task.span_id,
                task_id=task.id,
                actor_issuer=actor.issuer if actor else None,
                actor_subject=actor.subject if actor else None,
                attributes=attrs,
            ),
        )

    def _audit_refusal(
        self, session: Session, req: TaskRequest, code: str, detail: str, now: float
    ) -> None:
        with self.db.write() as conn:
            record(
                conn,
                AuditEvent(
                    name=EventName.REQUEST_DENIED,
                    outcome=Outcome.DENIED,
                    time=now,
                    trace_id=req.trace.trace_id if req.trace else new_trace_id(),
                    parent_span_id=req.trace.span_id if req.trace else None,
                    session_id=session.id,
                    actor_issuer=session.principal.issuer,
                    actor_subject=session.principal.subject,
                    attributes={
                        "broker.scope": req.scope,
                        "broker.principal.sub": session.principal.subject,
                        "broker.refusal.code": code,
                        "broker.refusal.detail": detail,
                    },
                ),
            )
