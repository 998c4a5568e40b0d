"""Runs reported by agents: a process ran with a task's credential (``broker exec``, MCP, SDK).

The agent's client reports the command (secrets redacted on its side), its exit status and its
start and end times after the process ends. The broker records it as one
``broker.credential.use`` event with ``broker.use.source = "exec"``, a child of the task's span,
with the span id the client handed to the process as ``TRACEPARENT`` so that the process's own
spans nest under it. Times are the client's, clamped to what the broker knows to be possible.

A run may also carry the uses its tools reported (``broker.use.source = "git_credential"``: each
request of ``broker git-credential``, with git's host and repository path and whether git then
accepted or refused the token); each becomes a ``broker.credential.use`` child of the run.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from broker.domain.audit import AuditEvent, EventName, Outcome, new_span_id, new_trace_id
from broker.domain.records import Credential, Session, Task
from broker.errors import BrokerError, Conflict, NotFound
from broker.services.common import Clock, TraceContext, record
from broker.services.tasks import UnknownTask, audit_unreachable, reachable_task, task_attributes
from broker.store import Database, repo

#: The value of ``broker.use.source`` on reported runs (see docs/audit.md).
SOURCE_EXEC = "exec"
#: Most runs one task may report; past it the reports are refused (and that is audited).
MAX_RUNS_PER_TASK = 200
#: How far a client's clock may be off before its times are clamped.
CLOCK_SKEW = 60.0


@dataclass(frozen=True, slots=True)
class ToolUse:
    """One use by a tool of the run (the git credential helper): what, where, and its outcome."""

    source: str
    at: float
    operation: str
    protocol: str
    host: str
    path: str
    outcome: str


@dataclass(frozen=True, slots=True)
class RunReport:
    """What the agent says ran."""

    command: list[str]
    exit_code: int | None
    signal: int | None
    started_at: float
    ended_at: float
    via: str
    span_id: str | None = None
    credential_id: str | None = None
    uses: tuple[ToolUse, ...] = ()


@dataclass(frozen=True, slots=True)
class RecordedRun:
    event_id: str
    task_id: str
    credential_id: str
    trace_id: str
    span_id: str
    replayed: bool = False


class RunService:
    """Records reported runs as audit events."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def record(
        self,
        session: Session,
        task_id: str,
        report: RunReport,
        trace: TraceContext | None = None,
    ) -> RecordedRun:
        """Record one run of a process with ``task_id``'s credential; refusals are audited."""
        now = self.clock()
        try:
            with self.db.write() as conn:
                task = reachable_task(conn, session, task_id)
                cred = _credential(repo.credentials_for(conn, task.id), report.credential_id)
                previous = [
                    e
                    for e in repo.audit_events(
                        conn,
                        task_id=task.id,
                        name=EventName.CREDENTIAL_USE.value,
                        limit=MAX_RUNS_PER_TASK + 1,
                    )
                    if (e.get("attributes") or {}).get("broker.use.source") == SOURCE_EXEC
                ]
                for row in previous:
                    if report.span_id and row["span_id"] == report.span_id:
                        return RecordedRun(  # a retried report: the same event, not a second one
                            row["id"],
                            task.id,
                            str(row["credential_id"]),
                            task.trace_id,
                            report.span_id,
                            replayed=True,
                        )
                if len(previous) >= MAX_RUNS_PER_TASK:
                    raise Conflict(
                        f"a task may report at most {MAX_RUNS_PER_TASK} runs; request a new task",
                        code="run_limit_reached",
                    )
                event = self._event(session, task, cred, report, now)
                record(conn, event)
                for use in report.uses:
                    record(conn, self._tool_use(session, task, cred, event, use, now))
        except UnknownTask as unknown:
            audit_unreachable(self.db, now, session, unknown, "exec_report", trace)
            raise
        except (NotFound, Conflict) as exc:
            self._audit_refusal(session, task_id, exc, trace, now)
            raise
        return RecordedRun(event.id, task.id, cred.id, task.trace_id, event.span_id)

    def _event(
        self, session: Session, task: Task, cred: Credential, report: RunReport, now: float
    ) -> AuditEvent:
        earliest = (cred.issued_at or task.created_at) - CLOCK_SKEW
        start = min(max(report.started_at, earliest), now)
        end = min(max(report.ended_at, start), now)
        attributes: dict[str, Any] = {
            **task_attributes(task),
            "broker.use.source": SOURCE_EXEC,
            "broker.use.via": report.via,
            "broker.use.reported_by": "agent",
            "broker.credential.id": cred.id,
            "broker.backend": cred.backend,
            "broker.credential.kind": cred.kind,
            "broker.exec.executable": posixpath.basename(report.command[0]),
            "broker.exec.command": report.command,
            "broker.exec.duration_s": round(end - start, 3),
        }
        if report.exit_code is not None:
            attributes["broker.exec.exit_code"] = report.exit_code
        if report.signal is not None:
            attributes["broker.exec.signal"] = report.signal
        if (start, end) != (report.started_at, report.ended_at):
            attributes["broker.exec.times_clamped"] = True
        return AuditEvent(
            name=EventName.CREDENTIAL_USE,
            outcome=Outcome.SUCCESS if report.exit_code == 0 else Outcome.FAILURE,
            time=start,
            end_time=end,
            trace_id=task.trace_id,
            span_id=report.span_id or new_span_id(),
            parent_span_id=task.span_id,
            session_id=session.id,
            task_id=task.id,
            credential_id=cred.id,
            actor_issuer=session.principal.issuer,
            actor_subject=session.principal.subject,
            attributes=attributes,
        )

    def _tool_use(
        self,
        session: Session,
        task: Task,
        cred: Credential,
        run: AuditEvent,
        use: ToolUse,
        now: float,
    ) -> AuditEvent:
        """A use a tool of the run reported, as a child of the run's span (times clamped)."""
        at = min(max(use.at, run.time), run.end_time or now)
        return AuditEvent(
            name=EventName.CREDENTIAL_USE,
            outcome=Outcome.FAILURE if use.outcome in ("refused", "rejected") else Outcome.SUCCESS,
            time=at,
            end_time=at,
            trace_id=task.trace_id,
            parent_span_id=run.span_id,
            session_id=session.id,
            task_id=task.id,
            credential_id=cred.id,
            actor_issuer=session.principal.issuer,
            actor_subject=session.principal.subject,
            attributes={
                **task_attributes(task),
                "broker.use.source": use.source,
                "broker.use.reported_by": "agent",
                "broker.credential.id": cred.id,
                "broker.backend": cred.backend,
                "broker.credential.kind": cred.kind,
                "broker.git.operation": use.operation,
                "broker.git.protocol": use.protocol,
                "broker.git.host": use.host,
                "broker.git.path": use.path,
                "broker.git.outcome": use.outcome,
            },
        )

    def _audit_refusal(
        self,
        session: Session,
        task_id: str,
        exc: BrokerError,
        trace: TraceContext | None,
        now: float,
    ) -> None:
        with self.db.write() as conn:
            record(
                conn,
                AuditEvent(
                    name=EventName.REQUEST_DENIED,
                    outcome=Outcome.DENIED,
                    time=now,
                    trace_id=trace.trace_id if trace else new_trace_id(),
                    parent_span_id=trace.span_id if trace else None,
                    session_id=session.id,
                    actor_issuer=session.principal.issuer,
                    actor_subject=session.principal.subject,
                    attributes={
                        "broker.request.kind": "exec_report",
                        "broker.request.task_id": task_id[:64],
                        "broker.principal.sub": session.principal.subject,
                        "broker.refusal.code": exc.code,
                        "broker.refusal.detail": exc.detail,
                    },
                ),
            )


def _credential(creds: list[Credential], wanted: str | None) -> Credential:
    """The credential the run used: the one named, or the task's latest issued one."""
    issued = [c for c in creds if c.issued_at is not None]
    if wanted is not None:
        for cred in issued:
            if cred.id == wanted:
                return cred
        raise NotFound("no such credential on this task", code="unknown_credential")
    if not issued:
        raise Conflict(
            "no credential was issued for this task, so nothing could have used one",
            code="no_credential",
        )
    return max(issued, key=lambda c: c.issued_at or 0.0)
