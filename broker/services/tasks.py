"""Task requests, decisions, expiry, the mint-time approval check, and completion.

A request is refused before anything is stored when the scope is unknown, a limit is reached or
a parameter is invalid (each refusal audited as ``broker.request.denied``). Otherwise the task is
stored with its decision: ``denied`` (the requester's conditions are unmet; answered 403 with the
reason), ``approved`` (automatic; the rule recorded) or ``pending`` (waiting for approvers;
webhooks told). Parameters, purpose and TTL are frozen from then on.

:func:`authorize_mint` is the check minting runs inside its own transaction, so that an approval
is used once, in time, for exactly what was approved, under the template version it was made on.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from broker.domain.audit import (
    AuditEvent,
    EventName,
    Outcome,
    canonical_json,
    new_span_id,
    new_trace_id,
)
from broker.domain.ids import new_id
from broker.domain.records import Approval, Credential, Session, Task
from broker.domain.scope import ScopeTemplate
from broker.domain.scrub import scrub_text
from broker.domain.task import (
    TaskState,
    condition_claims,
    decide_request,
    ending_state,
    failure_reason,
    resolve_ttl,
    tally,
    task_binding,
    transition,
)
from broker.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    RateLimited,
    ValidationFailed,
)
from broker.periodic import Periodic
from broker.scopes.loader import LoadedTemplate, ScopeCatalog
from broker.scopes.params import validate_params
from broker.scopes.render import render_backend
from broker.services.common import Clock, TraceContext, record
from broker.services.limits import RateLimiter, limits_for
from broker.services.revocation import Revoker
from broker.settings import Settings
from broker.store import Database, Tx, repo

log = logging.getLogger(__name__)

MAX_PURPOSE = 2000
MAX_IDEMPOTENCY_KEY = 256
#: Tasks expired per pass of :meth:`TaskService.expire_due`.
EXPIRY_BATCH = 200


class Notifier(Protocol):
    """Where decisions are announced (webhooks); called inside the decision's transaction."""

    def enqueue(
        self,
        conn: Tx,
        event: str,
        task: Task,
        template: ScopeTemplate | None,
        *,
        approvals: Iterable[Approval] = (),
    ) -> int: ...


class NullNotifier:
    """Announces nothing."""

    def enqueue(
        self,
        conn: Tx,
        event: str,
        task: Task,
        template: ScopeTemplate | None,
        *,
        approvals: Iterable[Approval] = (),
    ) -> int:
        return 0


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


@dataclass(frozen=True, slots=True)
class Submitted:
    """A request's outcome: the task, and whether it is a replay of an earlier request."""

    task: Task
    replayed: bool = False


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


def check_purpose(purpose: Any) -> str:
    if not isinstance(purpose, str):
        raise ValidationFailed("purpose must be a string", code="invalid_purpose")
    # A secret pasted into the purpose (an agent quoting its own environment) is never kept:
    # the purpose is stored, shown to approvers and audited.
    text = scrub_text(purpose.strip(), limit=None)
    if not text or len(text) > MAX_PURPOSE:
        raise ValidationFailed(
            f"purpose must be 1 to {MAX_PURPOSE} characters", code="invalid_purpose"
        )
    # Approvers read the purpose: bidi overrides, zero-width and control characters could make
    # it say something else on screen than in the record. Line breaks and tabs are fine.
    if any(unicodedata.category(c) in ("Cc", "Cf") and c not in "\n\t" for c in text):
        raise ValidationFailed(
            "purpose contains invisible control or formatting characters", code="invalid_purpose"
        )
    return text


def lapsed(task: Task, now: float) -> bool:
    """A pending request past its ``request_ttl``, or an unused approval past its expiry."""
    if task.state is TaskState.PENDING:
        return task.request_expires_at is not None and now >= task.request_expires_at
    if task.state is TaskState.APPROVED and task.mints == 0:
        return task.approval_expires_at is not None and now >= task.approval_expires_at
    return False


class _Replay(Exception):
    """Raised inside the write transaction when a concurrent request took the Idempotency-Key."""


# --- who may reach a task ---------------------------------------------------------------------


class UnknownTask(NotFound):
    """A task that does not exist, or that the caller's session may not reach: one answer for
    both, so another session (of the same principal or not) learns nothing about it."""

    def __init__(self, task_id: str, task: Task | None = None) -> None:
        super().__init__("no such task", code="unknown_task")
        self.task_id = task_id
        #: The task that exists but is not the caller's to reach (never shown to the caller).
        self.task = task


def reachable_task(conn: Tx, session: Session, task_id: str, *, for_update: bool = False) -> Task:
    """The task, if ``session`` may reach it (:meth:`Task.reachable_from`); else
    :class:`UnknownTask` for the caller to audit with :func:`audit_unreachable`."""
    task = repo.get_task(conn, task_id, for_update=for_update)
    if task is None or not task.reachable_from(session):
        raise UnknownTask(task_id, task)
    return task


def audit_unreachable(
    db: Database,
    now: float,
    session: Session,
    refusal: UnknownTask,
    action: str,
    trace: TraceContext | None = None,
) -> None:
    """Record a refused reach for a task (``broker.request.denied``, code ``unknown_task``): in
    the task's own trace when it exists, so its auditors see who tried."""
    task = refusal.task
    if task is None:
        reason = "no_such_task"
    elif task.requester == session.principal.key:
        reason = "another_session"
    else:
        reason = "another_principal"
    attributes: dict[str, Any] = {
        "broker.request.kind": action,
        "broker.request.task_id": refusal.task_id[:64],
        "broker.principal.sub": session.principal.subject,
        "broker.session.id": session.id,
        "broker.refusal.code": refusal.code,
        "broker.refusal.detail": refusal.detail,
        "broker.refusal.reason": reason,
    }
    if task is not None:
        attributes = {**task_attributes(task), **attributes}
    with db.write() as conn:
        record(
            conn,
            AuditEvent(
                name=EventName.REQUEST_DENIED,
                outcome=Outcome.DENIED,
                time=now,
                trace_id=task.trace_id if task else (trace.trace_id if trace else new_trace_id()),
                parent_span_id=task.span_id if task else (trace.span_id if trace else None),
                session_id=session.id,
                task_id=task.id if task else None,
                actor_issuer=session.principal.issuer,
                actor_subject=session.principal.subject,
                attributes=attributes,
            ),
        )


# --- audit helpers shared with the approval service -------------------------------------------


def audit_decision(conn: Tx, task: Task, actor: Approval | None = None) -> None:
    """``broker.task.decision``: what the task became, by which rule, and who decided."""
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


def audit_task_refusal(
    conn: Tx,
    task: Task,
    error: BrokerError,
    now: float,
    *,
    name: str = EventName.REQUEST_DENIED,
    actor: tuple[str, str] | None = None,
    session_id: str | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """A refused operation on a task (mint, decision), with its stable code and public detail."""
    record(
        conn,
        AuditEvent(
            name=name,
            outcome=Outcome.DENIED,
            time=now,
            trace_id=task.trace_id,
            parent_span_id=task.span_id,
            task_id=task.id,
            session_id=session_id,
            actor_issuer=actor[0] if actor else None,
            actor_subject=actor[1] if actor else None,
            attributes={
                **task_attributes(task),
                "broker.refusal.code": error.code,
                "broker.refusal.detail": error.detail,
                **(extra or {}),
            },
        ),
    )


def end_task(
    conn: Tx,
    task: Task,
    target: TaskState,
    now: float,
    *,
    reason: str,
    rule: str,
    event: str,
) -> Task:
    """Move a task to ``target`` (compare-and-set) and audit why; returns the updated task."""
    transition(task.state, target)
    values: dict[str, Any] = {"state": target, "updated_at": now, "reason": reason}
    if task.state is TaskState.PENDING:
        values.update(decided_at=now, decided_by_rule=rule)
    if target.terminal:
        values["ends_at"] = now
    if not repo.update_task(conn, task.id, expect=task.state, **values):
        raise Conflict("the task changed meanwhile; read it again", code="task_changed")
    task = replace(task, **values)
    record(
        conn,
        AuditEvent(
            name=event,
            outcome=Outcome.SUCCESS if event == EventName.TASK_EXPIRE else Outcome.DENIED,
            time=now,
            trace_id=task.trace_id,
            parent_span_id=task.span_id,
            task_id=task.id,
            attributes={
                **task_attributes(task),
                "broker.decision.rule": rule,
                "broker.decision.reason": reason,
            },
        ),
    )
    return task


def fail_task(
    conn: Tx,
    task: Task,
    now: float,
    *,
    reason: str,
    session_id: str | None = None,
    actor: tuple[str, str] | None = None,
) -> Task:
    """End an approved task ``failed`` (no credential was ever issued) and audit it as a failed
    end, never as a success: ``broker.task.complete`` with outcome ``failure``."""
    transition(task.state, TaskState.FAILED)
    values: dict[str, Any] = {
        "state": TaskState.FAILED,
        "updated_at": now,
        "ends_at": now,
        "reason": reason[:500],
    }
    if not repo.update_task(conn, task.id, expect=task.state, **values):
        raise Conflict("the task changed meanwhile; read it again", code="task_changed")
    task = replace(task, **values)
    record(
        conn,
        AuditEvent(
            name=EventName.TASK_COMPLETE,
            outcome=Outcome.FAILURE,
            time=now,
            trace_id=task.trace_id,
            parent_span_id=task.span_id,
            session_id=session_id,
            task_id=task.id,
            actor_issuer=actor[0] if actor else None,
            actor_subject=actor[1] if actor else None,
            attributes={**task_attributes(task), "broker.task.end_reason": reason},
        ),
    )
    return task


# --- the mint-time check ----------------------------------------------------------------------


def authorize_mint(
    conn: Tx,
    task: Task,
    loaded: LoadedTemplate | None,
    now: float,
    *,
    session_id: str | None = None,
    notifier: Notifier | None = None,
) -> BrokerError | None:
    """May ``task`` (read ``for_update`` in ``conn``) be minted now? ``None`` when it may.

    Otherwise returns the refusal for the caller to raise *after* committing ``conn``: the
    refusal is audited, and a task whose approval lapsed or was voided is moved out of
    ``approved`` in the same transaction (so the caller must commit, not roll back). Rules:

    1. only an ``approved`` task mints, and only once (``mints == 0``): an approval is single-use,
       and a concurrent second mint sees the first one's intent under the row lock;
    2. the approval is in time (``approval_expires_at``);
    3. the template is still the version the task was decided under (content hash), else void;
    4. the task is still exactly what was approved (binding hash of requester, scope, template
       version, parameters, TTL and purpose), else void;
    5. for a manual rule, enough distinct, fresh approvals bound to that same hash still exist.
    """
    refusal: BrokerError | None = None
    if task.state is not TaskState.APPROVED or task.mints > 0:
        if task.state is TaskState.ACTIVE or (task.state is TaskState.APPROVED and task.mints > 0):
            refusal = Conflict(
                "this task's approval was already used; request a new task",
                code="already_issued",
            )
        else:
            refusal = Conflict(
                f"the task is {task.state.value}, not approved",
                code="task_not_approved",
                extra={"state": task.state.value},
            )
        audit_task_refusal(conn, task, refusal, now, session_id=session_id)
        return refusal
    if task.approval_expires_at is None or now >= task.approval_expires_at:
        refusal = Conflict(
            "the approval has expired; request the task again", code="approval_expired"
        )
        credentials = repo.credentials_for(conn, task.id)
        if ending_state(task, TaskState.EXPIRED, credentials) is TaskState.FAILED:
            expired = fail_task(
                conn,
                task,
                now,
                reason=f"{failure_reason(credentials)}; then the approval expired",
                session_id=session_id,
            )
        else:
            expired = end_task(
                conn,
                task,
                TaskState.EXPIRED,
                now,
                reason="the approval expired before it was used",
                rule="approval_ttl",
                event=EventName.TASK_EXPIRE,
            )
        if notifier is not None and expired.approvals_required:
            notifier.enqueue(conn, "task.expired", expired, loaded.template if loaded else None)
        audit_task_refusal(conn, task, refusal, now, session_id=session_id)
        return refusal
    void_reason: str | None = None
    if loaded is None or loaded.content_hash != task.template_hash:
        void_reason = "the scope template changed after the decision"
        refusal = PreconditionFailed(
            "the scope template changed after this task was approved; request it again",
            code="template_changed",
        )
    elif task.decision_hash != task_binding(task):
        void_reason = "the task no longer matches what was approved"
        refusal = PreconditionFailed(
            "the task no longer matches what was approved; request it again",
            code="approval_void",
        )
    elif task.approvals_required:
        counted = tally(
            repo.approvals_for(conn, task.id),
            task=task,
            required=task.approvals_required,
            approval_ttl=loaded.template.approval.approval_ttl,
            now=now,
        )
        if not counted.met:
            void_reason = "fewer valid approvals remain than the rule requires"
            refusal = PreconditionFailed(
                "the approvals of this task are no longer valid; request it again",
                code="approval_void",
            )
    if refusal is None:
        return None
    end_task(
        conn,
        task,
        TaskState.REVOKED,
        now,
        reason=void_reason or refusal.detail,
        rule="approval_void",
        event=EventName.TASK_DECISION,
    )
    audit_task_refusal(conn, task, refusal, now, session_id=session_id)
    return refusal


class TaskService:
    """Request, read, wait for, expire and end tasks."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        catalog: ScopeCatalog,
        revoker: Revoker,
        clock: Clock,
        *,
        limiter: RateLimiter | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.catalog = catalog
        self.revoker = revoker
        self.clock = clock
        self.limiter = limiter or RateLimiter(db, clock)
        self.notifier: Notifier = notifier or NullNotifier()

    # --- request --------------------------------------------------------------------------

    def request(self, session: Session, req: TaskRequest) -> Task:
        """Open a task; it is approved automatically, left pending, or denied (and recorded)."""
        return self.submit(session, req).task

    def submit(self, session: Session, req: TaskRequest) -> Submitted:
        """:meth:`request`, telling whether the answer replays an earlier request."""
        principal = session.principal
        now = self.clock()
        key = req.idempotency_key
        if key is not None and (not key or len(key) > MAX_IDEMPOTENCY_KEY or not key.isprintable()):
            raise ValidationFailed(
                "Idempotency-Key must be 1 to 256 printable characters",
                code="invalid_idempotency_key",
            )
        if key:
            with self.db.read() as conn:
                existing = repo.task_by_idempotency_key(
                    conn, principal.issuer, principal.subject, key
                )
            if existing is not None:
                return self._replay(session, existing, req, now)
        loaded, task = self._build(session, req, now)
        try:
            self._store(session, loaded, task, now)
        except RateLimited as exc:
            self._audit_refusal(session, req, exc, now)
            raise
        except _Replay:
            with self.db.read() as conn:
                existing = repo.task_by_idempotency_key(
                    conn, principal.issuer, principal.subject, key or ""
                )
            if existing is None:  # pragma: no cover - the unique key was taken by this very row
                raise
            return self._replay(session, existing, req, now)
        if task.state is TaskState.DENIED:
            raise self._denied(task)
        return Submitted(task)

    def _build(self, session: Session, req: TaskRequest, now: float) -> tuple[LoadedTemplate, Task]:
        """Validate the request and decide it (nothing stored yet); refusals are audited."""
        principal = session.principal
        try:
            loaded = self.catalog.get(req.scope)
            template = loaded.template
            purpose = check_purpose(req.purpose)
            params = validate_params(template, req.params)
            ttl = resolve_ttl(template, req.ttl, self.settings.credential_max_ttl)
            # Render now, so a request that could never be minted is refused before approval.
            render_backend(template, params, forbidden=loaded.forbidden_policies)
        except (NotFound, ValidationFailed) as exc:
            self._audit_refusal(session, req, exc, now)
            raise
        decision = decide_request(template, condition_claims(principal))
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
            state=decision.state,
            created_at=now,
            updated_at=now,
            trace_id=req.trace.trace_id if req.trace else new_trace_id(),
            span_id=new_span_id(),
            parent_span_id=req.trace.span_id if req.trace else None,
            idempotency_key=req.idempotency_key,
            request_hash=req.fingerprint(),
            conversation_id=req.conversation_id,
            request_expires_at=now + template.approval.request_ttl,
            approvals_required=template.approval.required,
            run_identity=session.run_identity,
            share=template.share,
            requester_persons=principal.persons,
        )
        if decision.state is TaskState.DENIED:
            task = replace(
                task, reason=decision.reason, decided_at=now, decided_by_rule=decision.rule
            )
        elif decision.state is TaskState.APPROVED:
            task = replace(
                task,
                decided_at=now,
                decided_by_rule=decision.rule,
                approval_expires_at=now + template.approval.approval_ttl,
            )
            task = replace(task, decision_hash=task_binding(task))
        return loaded, task

    def _store(self, session: Session, loaded: LoadedTemplate, task: Task, now: float) -> None:
        """Count the request against its limits and store the task with its audit events."""
        principal = session.principal
        template = loaded.template
        with self.db.write() as conn:
            self.limiter.hit(
                conn, limits_for(principal, template, self.settings.rate_limits.per_principal), now
            )
            if task.state is not TaskState.DENIED:
                repo.lock_principal_scope(conn, principal.issuer, principal.subject, template.name)
                active = repo.count_active_tasks(
                    conn, principal.issuer, principal.subject, template.name
                )
                if active >= template.max_active_tasks:
                    raise RateLimited(
                        f"you already hold {active} open tasks for {template.name!r} (the limit); "
                        "complete or cancel one",
                        code="too_many_active_tasks",
                        retry_after=60,
                    )
            repo.remember_template_version(
                conn, loaded.content_hash, template.name, template.model_dump(mode="json"), now
            )
            if not repo.insert_task(conn, task):
                raise _Replay
            self._audit_request(conn, session, task)
            if task.state is not TaskState.PENDING:
                audit_decision(conn, task)
            else:
                self.notifier.enqueue(conn, "task.pending", task, template)

    @staticmethod
    def _denied(task: Task) -> Forbidden:
        return Forbidden(
            f"the request for {task.scope!r} was denied: {task.reason}",
            code="request_denied",
            extra={"task_id": task.id, "reason": task.reason},
        )

    def _replay(self, session: Session, existing: Task, req: TaskRequest, now: float) -> Submitted:
        if not existing.reachable_from(session):
            # Another session's task: neither replayed to this one nor named.
            refusal = Conflict(
                "this Idempotency-Key was used by another session; use a new key",
                code="idempotency_key_reused",
            )
            self._audit_refusal(session, req, refusal, now)
            raise refusal
        if existing.request_hash != req.fingerprint():
            raise Conflict(
                "this Idempotency-Key was used for a different request",
                code="idempotency_key_reused",
                extra={"task_id": existing.id},
            )
        if existing.state is TaskState.DENIED and existing.decided_by_rule == "requester":
            raise self._denied(existing)
        return Submitted(existing, replayed=True)

    # --- read -----------------------------------------------------------------------------

    def get_own(self, session: Session, task_id: str) -> Task:
        """One of the tasks the caller's session may reach (a lapsed one is expired first)."""
        try:
            with self.db.read() as conn:
                task = reachable_task(conn, session, task_id)
        except UnknownTask as refusal:
            audit_unreachable(self.db, self.clock(), session, refusal, "read")
            raise
        if lapsed(task, self.clock()):
            self.expire_due(ids=[task.id])
            with self.db.read() as conn:
                task = repo.get_task(conn, task_id) or task
        return task

    def approvals_of(self, task: Task) -> list[tuple[Approval, bool]]:
        """The task's decisions, each with whether it counts towards the rule right now."""
        with self.db.read() as conn:
            approvals = repo.approvals_for(conn, task.id)
        if not approvals:
            return []
        try:
            ttl = self.catalog.get(task.scope).template.approval.approval_ttl
        except NotFound:
            ttl = 0
        counted = tally(
            approvals,
            task=task,
            required=task.approvals_required,
            approval_ttl=ttl,
            now=self.clock(),
        )
        ids = {a.id for a in counted.counted}
        return [(a, a.id in ids) for a in approvals]

    def list_own(
        self, session: Session, states: list[TaskState] | None = None, limit: int = 100
    ) -> list[Task]:
        """The tasks the caller's session may reach, newest first."""
        with self.db.read() as conn:
            return repo.list_tasks(conn, reachable_from=session, states=states, limit=limit)

    # --- expiry ---------------------------------------------------------------------------

    def expire_due(self, *, ids: Iterable[str] | None = None, limit: int = EXPIRY_BATCH) -> int:
        """Expire pending requests past ``request_ttl`` and unused approvals past ``approval_ttl``.

        Safe to run on every replica at once (rows are locked and updated compare-and-set).
        """
        now = self.clock()
        expired = 0
        with self.db.write() as conn:
            if ids is None:
                due = repo.tasks_due_for_expiry(conn, now, limit, skip_locked=not self.db.is_sqlite)
            else:
                due = [t for i in ids if (t := repo.get_task(conn, i, for_update=True))]
            for task in due:
                if not lapsed(task, now):
                    continue
                what = "request" if task.state is TaskState.PENDING else "approval"
                credentials = repo.credentials_for(conn, task.id)
                if ending_state(task, TaskState.EXPIRED, credentials) is TaskState.FAILED:
                    fail_task(
                        conn,
                        task,
                        now,
                        reason=f"{failure_reason(credentials)}; then the approval expired",
                    )
                    expired += 1
                    continue
                done = end_task(
                    conn,
                    task,
                    TaskState.EXPIRED,
                    now,
                    reason=f"the {what} expired",
                    rule=f"{what}_ttl",
                    event=EventName.TASK_EXPIRE,
                )
                if done.approvals_required:
                    try:
                        template: ScopeTemplate | None = self.catalog.get(task.scope).template
                    except NotFound:
                        template = None
                    self.notifier.enqueue(conn, "task.expired", done, template)
                expired += 1
        return expired

    # --- end ------------------------------------------------------------------------------

    def complete(self, session: Session, task_id: str, *, cancel: bool = False) -> Task:
        """End a task: completed (or cancelled before use) and everything it holds revoked.

        A task whose mints all failed ends ``failed`` instead (nothing was ever issued).
        """
        now = self.clock()
        try:
            task = self._end(session, task_id, cancel=cancel, now=now)
        except UnknownTask as refusal:
            audit_unreachable(self.db, now, session, refusal, "cancel" if cancel else "complete")
            raise
        self.revoker.revoke_task(task, reason="task " + task.state.value)
        return task

    def _end(self, session: Session, task_id: str, *, cancel: bool, now: float) -> Task:
        with self.db.write() as conn:
            task = reachable_task(conn, session, task_id, for_update=True)
            wanted = (
                TaskState.CANCELLED
                if cancel or task.state is TaskState.PENDING
                else TaskState.COMPLETED
            )
            # Only an approved task can have failed mints without an issued credential.
            credentials = (
                repo.credentials_for(conn, task.id) if task.state is TaskState.APPROVED else []
            )
            target = ending_state(task, wanted, credentials)
            if target is TaskState.FAILED:
                return fail_task(
                    conn,
                    task,
                    now,
                    reason=failure_reason(credentials),
                    session_id=session.id,
                    actor=session.principal.key,
                )
            transition(task.state, target)
            if not repo.update_task(
                conn, task.id, expect=task.state, state=target, updated_at=now, ends_at=now
            ):
                raise Conflict("the task changed meanwhile; read it again", code="task_changed")
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
        return task

    def credentials_of(self, task: Task) -> list[Credential]:
        """The task's credentials as recorded now (states only; never a secret)."""
        with self.db.read() as conn:
            return repo.credentials_for(conn, task.id)

    # --- audit ----------------------------------------------------------------------------

    def _audit_request(self, conn: Tx, session: Session, task: Task) -> None:
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
                    "broker.approval.required": task.approvals_required,
                },
            ),
        )

    def _audit_refusal(
        self, session: Session, req: TaskRequest, error: BrokerError, now: float
    ) -> None:
        attributes: dict[str, Any] = {
            "broker.scope": req.scope[:128],
            "broker.principal.sub": session.principal.subject,
            "broker.refusal.code": error.code,
            "broker.refusal.detail": error.detail,
        }
        if isinstance(error, RateLimited):
            attributes["broker.refusal.retry_after"] = error.retry_after
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
                    attributes=attributes,
                ),
            )


class ExpiryLoop(Periodic):
    """Runs :meth:`TaskService.expire_due` every ``interval`` seconds in a background thread.

    Reads expire lapsed tasks lazily too; the loop makes expiry (and its webhook) happen on time
    even when nobody looks. Every replica may run it.
    """

    def __init__(self, tasks: TaskService, interval: float) -> None:
        super().__init__("broker-task-expiry", interval, tasks.expire_due)
        self.tasks = tasks
