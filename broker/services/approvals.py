"""Approvers decide pending tasks: list what they may decide, approve or deny with a reason.

Who may decide a task: a principal with the ``approver`` role, whose claims satisfy the
template's ``approval.approvers`` conditions, who is not the requester. A task needs
``approval.count`` distinct such people to approve it; a single denial denies it.

People are told apart by (issuer, subject) and, where issuers name a person claim
(``claims.person``: a verified e-mail, an employee id, the GitHub ``actor``), by person: one
person approving under two identities counts once, and the requester's person (including the
``actor`` who triggered a CI run) never approves. An approver whose issuer names a person claim
but whose token carries none that counts is refused (``person_unknown``): they could not be
told apart from their other identities.

Each decision is bound to the task's binding hash and template version, and counts only while
it is younger than ``approval.approval_ttl``: an approval that went stale while the others were
awaited no longer counts (its author may approve again). When the template changed since the
request, an approval is refused and the task denied (it can never be approved as requested).

A refused attempt (not an approver, not eligible, the requester, already decided, expired) is
audited as ``broker.approval.refused`` with its code, never as ``broker.task.approval``, which is
a decision: nobody reading the record can take a refusal for a denial.

Concurrency: every decision locks the task row (``FOR UPDATE`` on PostgreSQL; SQLite serialises
writers), writes the approval (unique per task and approver) and moves the task compare-and-set,
so two approvers deciding at once both count, and a denial racing an approval leaves one outcome.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.domain.ids import new_id
from broker.domain.principal import Principal, role_refusal
from broker.domain.records import Approval, Session, Task
from broker.domain.task import (
    APPROVE,
    DENY,
    Tally,
    TaskState,
    condition_claims,
    tally,
    task_binding,
)
from broker.errors import (
    BrokerError,
    Conflict,
    Forbidden,
    NotFound,
    PreconditionFailed,
    ValidationFailed,
)
from broker.scopes.loader import LoadedTemplate, ScopeCatalog
from broker.services.common import Clock, record
from broker.services.grants import TaskGrant, task_grant
from broker.services.tasks import (
    Notifier,
    TaskService,
    audit_decision,
    audit_task_refusal,
    end_task,
    lapsed,
    task_attributes,
)
from broker.store import Database, Tx, repo

APPROVER_ROLE = "approver"
MAX_REASON = 1000
#: Pending tasks looked at per listing.
LIST_SCAN = 500


@dataclass(frozen=True, slots=True)
class ApprovalView:
    """A task as an approver sees it: what is asked, by whom, who decided, and whether I may."""

    task: Task
    template: LoadedTemplate | None
    approvals: tuple[Approval, ...]
    counted: Tally | None
    requester_name: str | None
    may_decide: bool
    why_not: str | None
    #: What the credential will grant, rendered for the task's parameters, beside the
    #: template version's backend settings as written (no secret).
    grant: TaskGrant | None = None

    @property
    def template_changed(self) -> bool:
        return self.template is None or self.template.content_hash != self.task.template_hash


def check_reason(reason: Any) -> str:
    if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON:
        raise ValidationFailed(
            f"a decision needs a reason of 1 to {MAX_REASON} characters", code="invalid_reason"
        )
    return reason.strip()


class ApprovalService:
    """Lists and decides pending tasks for approvers."""

    def __init__(
        self,
        db: Database,
        catalog: ScopeCatalog,
        tasks: TaskService,
        notifier: Notifier,
        clock: Clock,
    ) -> None:
        self.db = db
        self.catalog = catalog
        self.tasks = tasks
        self.notifier = notifier
        self.clock = clock

    # --- who may decide ---------------------------------------------------------------------

    def _template(self, scope: str) -> LoadedTemplate | None:
        try:
            return self.catalog.get(scope)
        except NotFound:
            return None

    @staticmethod
    def _eligibility(  # noqa: PLR0911  # one return per rule, in the order they apply
        principal: Principal,
        task: Task,
        loaded: LoadedTemplate | None,
        requester_claims: dict[str, Any],
    ) -> BrokerError | None:
        """Why ``principal`` may not decide ``task`` (None: they may)."""
        if principal.key == task.requester:
            return Forbidden("the requester of a task can never decide it", code="self_approval")
        if principal.same_person(task.requester_persons, task.requester):
            return Forbidden(
                "you are the person who requested this task (under another identity, or the "
                "one who triggered its run); the requester can never decide it",
                code="self_approval",
            )
        if not principal.has_role(APPROVER_ROLE):
            return role_refusal(principal, APPROVER_ROLE, doing="deciding a task")
        if principal.persons == ():
            return Forbidden(
                "your identity provider names a person claim (claims.person) but your token "
                "carries none that counts (an e-mail needs email_verified: true), so your "
                "approval could not be told apart from your other identities'",
                code="person_unknown",
            )
        if loaded is None:
            return None  # checked by the caller: the template is gone or changed
        rule = loaded.template.approval
        if rule.approvers is None:
            return Forbidden("this scope is approved automatically", code="not_an_approver")
        verdict = rule.approvers.evaluate(condition_claims(principal), requester_claims)
        if not verdict:
            return Forbidden(
                f"you may not approve {task.scope!r}: {verdict.reason}",
                code="not_an_eligible_approver",
            )
        return None

    @staticmethod
    def _requester_claims(conn: Tx, task: Task) -> tuple[dict[str, Any], str | None]:
        session = repo.get_session(conn, task.session_id)
        if session is None:
            return {}, None
        return condition_claims(session.principal), session.principal.display_name

    def _require_approver(self, session: Session) -> None:
        if not session.principal.has_role(APPROVER_ROLE):
            raise role_refusal(session.principal, APPROVER_ROLE, doing="reading approvals")

    @staticmethod
    def _same_person_approval(
        principal: Principal, approvals: Iterable[Approval], now: float, approval_ttl: int
    ) -> Approval | None:
        """A fresh approval this person already made under another identity."""
        for a in approvals:
            if (
                a.decision == APPROVE
                and (a.issuer, a.subject) != principal.key
                and principal.same_person(a.persons, (a.issuer, a.subject))
                and now < a.created_at + approval_ttl
            ):
                return a
        return None

    # --- read -----------------------------------------------------------------------------

    def _view(
        self, conn: Tx, principal: Principal, task: Task, now: float, *, with_grant: bool = False
    ) -> ApprovalView:
        loaded = self._template(task.scope)
        claims, name = self._requester_claims(conn, task)
        approvals = tuple(repo.approvals_for(conn, task.id))
        counted = (
            tally(
                approvals,
                task=task,
                required=task.approvals_required,
                approval_ttl=loaded.template.approval.approval_ttl,
                now=now,
            )
            if loaded is not None
            else None
        )
        refusal = self._eligibility(principal, task, loaded, claims)
        why_not = refusal.detail if refusal else None
        if why_not is None and task.state is not TaskState.PENDING:
            why_not = f"the task is {task.state.value}"
        if why_not is None and (loaded is None or loaded.content_hash != task.template_hash):
            why_not = "the scope template changed since the request"
        if (
            why_not is None
            and counted is not None
            and any(
                principal.same_person(a.persons, (a.issuer, a.subject)) for a in counted.counted
            )
        ):
            why_not = "you already approved this task"
        grant = (
            task_grant(conn, task, self.catalog, self.tasks.settings)
            if with_grant or why_not is None
            else None
        )
        return ApprovalView(task, loaded, approvals, counted, name, why_not is None, why_not, grant)

    def pending_for(self, session: Session, *, limit: int = 100) -> list[ApprovalView]:
        """The pending tasks the caller may decide now, oldest first (they expire first)."""
        self._require_approver(session)
        self.tasks.expire_due()
        now = self.clock()
        with self.db.read() as conn:
            pending = repo.list_tasks(conn, states=[TaskState.PENDING], limit=LIST_SCAN)
            views = [self._view(conn, session.principal, t, now) for t in reversed(pending)]
        return [v for v in views if v.may_decide][:limit]

    def view(self, session: Session, task_id: str) -> ApprovalView:
        """One task as an approver sees it (any state).

        Only someone who may decide it (now or under its current template), who already decided
        it, or who requested it (the same identity or person, read-only: an approver is shown why
        they may not decide their own request), sees it: other approvers get a 404, as for a task
        that does not exist, so approval rights on one team's scopes reveal nothing of another's
        requests. Seeing it here never lets a session mint, use or complete it.
        """
        self._require_approver(session)
        self.tasks.expire_due(ids=[task_id])
        now = self.clock()
        principal = session.principal
        with self.db.read() as conn:
            task = repo.get_task(conn, task_id)
            if task is None or task.approvals_required == 0:
                raise NotFound("no such task awaiting approvers", code="unknown_task")
            view = self._view(conn, principal, task, now, with_grant=True)
            claims, _ = self._requester_claims(conn, task)
        decided = any((a.issuer, a.subject) == principal.key for a in view.approvals)
        eligible = self._eligibility(principal, task, view.template, claims)
        if not decided and eligible is not None and eligible.code != "self_approval":
            raise NotFound("no such task awaiting approvers", code="unknown_task")
        return view

    # --- decide ---------------------------------------------------------------------------

    def approve(self, session: Session, task_id: str, reason: str) -> Task:
        return self.decide(session, task_id, approve=True, reason=reason)

    def deny(self, session: Session, task_id: str, reason: str) -> Task:
        return self.decide(session, task_id, approve=False, reason=reason)

    def decide(self, session: Session, task_id: str, *, approve: bool, reason: str) -> Task:
        """Record one approver's decision; the task is decided once the rule is met (or denied)."""
        reason = check_reason(reason)
        now = self.clock()
        refusal: BrokerError | None = None
        decided: Task | None = None
        with self.db.write() as conn:
            task = repo.get_task(conn, task_id, for_update=True)
            if task is None or task.approvals_required == 0:
                refusal = NotFound("no such task awaiting approvers", code="unknown_task")
                self._audit_refused(conn, session, None, refusal, now, approve)
            else:
                decided, refusal = self._decide_locked(
                    conn, session, task, approve=approve, reason=reason, now=now
                )
        if refusal is not None:
            raise refusal
        assert decided is not None
        return decided

    def _decide_locked(
        self, conn: Tx, session: Session, task: Task, *, approve: bool, reason: str, now: float
    ) -> tuple[Task, BrokerError | None]:
        principal = session.principal
        loaded = self._template(task.scope)
        requester_claims, _ = self._requester_claims(conn, task)
        refusal = self._eligibility(principal, task, loaded, requester_claims)
        if refusal is None and task.state is TaskState.PENDING and lapsed(task, now):
            done = end_task(
                conn,
                task,
                TaskState.EXPIRED,
                now,
                reason="the request expired",
                rule="request_ttl",
                event=EventName.TASK_EXPIRE,
            )
            self.notifier.enqueue(conn, "task.expired", done, loaded.template if loaded else None)
            refusal = Conflict("the request has expired", code="request_expired")
        elif refusal is None and task.state is not TaskState.PENDING:
            refusal = Conflict(
                f"the task is already {task.state.value}",
                code="already_decided",
                extra={"state": task.state.value},
            )
        elif (
            refusal is None
            and approve
            and (loaded is None or loaded.content_hash != task.template_hash)
        ):
            # It can never be approved as requested: deny it so nobody waits on it.
            done = end_task(
                conn,
                task,
                TaskState.DENIED,
                now,
                reason="the scope template changed after the request; request it again",
                rule="template_changed",
                event=EventName.TASK_DECISION,
            )
            self.notifier.enqueue(conn, "task.denied", done, loaded.template if loaded else None)
            refusal = PreconditionFailed(
                "the scope template changed after the request; the task was denied",
                code="template_changed",
            )
        template = loaded.template if loaded is not None else None
        approval_ttl = template.approval.approval_ttl if template is not None else 0
        if refusal is None and approve:
            earlier = self._same_person_approval(
                principal, repo.approvals_for(conn, task.id), now, approval_ttl
            )
            if earlier is not None:
                refusal = Conflict(
                    f"you already approved this task as {earlier.subject} ({earlier.issuer}); "
                    "one person counts once",
                    code="already_decided",
                )
        if refusal is not None:
            self._audit_refused(conn, session, task, refusal, now, approve)
            return task, refusal
        # Only a denial gets here when the template is gone or changed (an approval was refused).
        approval = Approval(
            id=new_id("apr"),
            task_id=task.id,
            issuer=principal.issuer,
            subject=principal.subject,
            display_name=principal.display_name,
            decision=APPROVE if approve else DENY,
            reason=reason,
            template_hash=task.template_hash,
            created_at=now,
            binding_hash=task_binding(task),
            persons=principal.persons,
        )
        if not repo.insert_approval(conn, approval):
            earlier = next(
                a
                for a in repo.approvals_for(conn, task.id)
                if (a.issuer, a.subject) == principal.key
            )
            stale = earlier.decision == APPROVE and now >= earlier.created_at + approval_ttl
            if not stale:
                refusal = Conflict("you already decided this task", code="already_decided")
                self._audit_refused(conn, session, task, refusal, now, approve)
                return task, refusal
            # A stale approval may be renewed (or turned into a denial) by its author.
            approval = replace(approval, id=earlier.id)
            repo.update_approval(
                conn,
                earlier.id,
                decision=approval.decision,
                reason=reason,
                template_hash=approval.template_hash,
                binding_hash=approval.binding_hash,
                created_at=now,
                display_name=approval.display_name,
                persons=approval.persons,
            )
        self._audit_approval(conn, session, task, approval)
        if not approve:
            task = self._settle(
                conn,
                task,
                TaskState.DENIED,
                now,
                rule=f"denied by approver {principal.subject}",
                reason=reason,
            )
            audit_decision(conn, task, approval)
            self.notifier.enqueue(conn, "task.denied", task, template)
            return task, None
        assert template is not None  # approving under a gone or changed template was refused
        approvals = repo.approvals_for(conn, task.id)
        counted = tally(
            approvals,
            task=task,
            required=task.approvals_required,
            approval_ttl=approval_ttl,
            now=now,
        )
        if not counted.met:
            return task, None
        task = self._settle(
            conn,
            task,
            TaskState.APPROVED,
            now,
            rule=(
                f"approval.count={task.approvals_required}: approved by "
                + ", ".join(counted.approvers())
            ),
            approval_expires_at=counted.expires_at,
            decision_hash=task_binding(task),
        )
        audit_decision(conn, task, approval)
        self.notifier.enqueue(conn, "task.approved", task, template, approvals=counted.counted)
        return task, None

    @staticmethod
    def _settle(
        conn: Tx, task: Task, state: TaskState, now: float, *, rule: str, **values: Any
    ) -> Task:
        values = {
            "state": state,
            "updated_at": now,
            "decided_at": now,
            "decided_by_rule": rule[:256],
            **values,
        }
        if state is TaskState.DENIED:
            values["ends_at"] = now
        if not repo.update_task(conn, task.id, expect=TaskState.PENDING, **values):
            # Impossible under the row lock; refuse rather than guess.
            raise Conflict("the task changed meanwhile; read it again", code="task_changed")
        return replace(task, **values)

    # --- audit ----------------------------------------------------------------------------

    @staticmethod
    def _audit_approval(conn: Tx, session: Session, task: Task, approval: Approval) -> None:
        record(
            conn,
            AuditEvent(
                name=EventName.TASK_APPROVAL,
                outcome=Outcome.SUCCESS,
                time=approval.created_at,
                trace_id=task.trace_id,
                parent_span_id=task.span_id,
                session_id=session.id,
                task_id=task.id,
                actor_issuer=approval.issuer,
                actor_subject=approval.subject,
                attributes={
                    **task_attributes(task),
                    "broker.approval.id": approval.id,
                    "broker.approval.decision": approval.decision,
                    "broker.approval.reason": approval.reason,
                    "broker.approval.binding": approval.binding_hash,
                    "broker.approver.sub": approval.subject,
                    "broker.approver.issuer": approval.issuer,
                    **(
                        {"broker.approver.persons": list(approval.persons)}
                        if approval.persons is not None
                        else {}
                    ),
                },
            ),
        )

    @staticmethod
    def _audit_refused(
        conn: Tx,
        session: Session,
        task: Task | None,
        error: BrokerError,
        now: float,
        approve: bool,
    ) -> None:
        principal = session.principal
        attempted = {
            "broker.approval.attempted": APPROVE if approve else DENY,
            "broker.approver.sub": principal.subject,
            "broker.approver.issuer": principal.issuer,
        }
        if task is not None:
            audit_task_refusal(
                conn,
                task,
                error,
                now,
                name=EventName.APPROVAL_REFUSED,
                actor=principal.key,
                session_id=session.id,
                extra=attempted,
            )
            return
        record(
            conn,
            AuditEvent(
                name=EventName.APPROVAL_REFUSED,
                outcome=Outcome.DENIED,
                time=now,
                trace_id=new_trace_id(),
                session_id=session.id,
                actor_issuer=principal.issuer,
                actor_subject=principal.subject,
                attributes={
                    **attempted,
                    "broker.refusal.code": error.code,
                    "broker.refusal.detail": error.detail,
                },
            ),
        )
