"""``POST /v1/tasks/{id}/exec``: an agent reports a process it ran with the task's credential."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from broker.api.deps import AgentDep, BrokerDep, TraceDep
from broker.api.json_bodies import OffLoopJsonRoute
from broker.services.runs import RunReport, RunService, ToolUse

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], route_class=OffLoopJsonRoute)


class ToolUseIn(BaseModel):
    """One use of the credential by a tool of the run, as the agent's side saw it: for now the
    git credential helper (``get`` answered, then git's ``store`` or ``erase`` verdict)."""

    model_config = ConfigDict(extra="forbid")

    source: Literal["git_credential"]
    at: float = Field(ge=0)
    operation: Literal["get", "store", "erase"]
    protocol: str = Field(max_length=16, pattern=r"^[a-z][a-z0-9+.-]*$")
    host: str = Field(max_length=255)
    path: str = Field(default="", max_length=1024)
    outcome: Literal["served", "refused", "accepted", "rejected"]


class ExecReportIn(BaseModel):
    """One finished run. ``command`` must already have the credential's values redacted."""

    model_config = ConfigDict(extra="forbid")

    command: list[Annotated[str, Field(max_length=1024)]] = Field(min_length=1, max_length=65)
    exit_code: int | None = Field(default=None, ge=0, le=255)
    signal: int | None = Field(default=None, ge=1, le=64)
    started_at: float = Field(ge=0)
    ended_at: float = Field(ge=0)
    via: Literal["cli", "sdk", "mcp"] = "sdk"
    span_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{16}$")
    credential_id: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    uses: list[ToolUseIn] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _one_ending(self) -> ExecReportIn:
        if (self.exit_code is None) == (self.signal is None):
            raise ValueError("give exactly one of exit_code and signal")
        if self.ended_at < self.started_at:
            raise ValueError("ended_at is before started_at")
        if self.span_id == "0" * 16:
            raise ValueError("span_id must not be all zeros (W3C)")
        return self


class ExecReportOut(BaseModel):
    event_id: str
    task_id: str
    credential_id: str
    trace_id: str
    span_id: str


@router.post("/{task_id}/exec", status_code=201, response_model=ExecReportOut)
def report_exec(
    task_id: str, body: ExecReportIn, session: AgentDep, broker: BrokerDep, trace: TraceDep
) -> ExecReportOut:
    """Record a run (command, exit status, times) as a ``broker.credential.use`` span, and each
    use its tools report (the git credential helper's) as a child span of it."""
    recorded = RunService(broker.db, broker.clock).record(
        session,
        task_id,
        RunReport(
            command=body.command,
            exit_code=body.exit_code,
            signal=body.signal,
            started_at=body.started_at,
            ended_at=body.ended_at,
            via=body.via,
            span_id=body.span_id,
            credential_id=body.credential_id,
            uses=tuple(ToolUse(**use.model_dump()) for use in body.uses),
        ),
        trace,
    )
    return ExecReportOut(
        event_id=recorded.event_id,
        task_id=recorded.task_id,
        credential_id=recorded.credential_id,
        trace_id=recorded.trace_id,
        span_id=recorded.span_id,
    )
