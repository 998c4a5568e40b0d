"""Operators: kill a task, set and lift AWS kill switches, see pending revocations and the reaper.

Every endpoint here requires the ``admin`` role; every action is audited with the admin as actor.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, require_role
from broker.api.json_bodies import OffLoopJsonRoute
from broker.api.models import CredentialOut, TaskOut
from broker.domain.records import Session
from broker.domain.task import CredentialState
from broker.errors import ServiceUnavailable
from broker.services.kill_switch import KillSwitch

router = APIRouter(prefix="/v1/admin", tags=["admin"], route_class=OffLoopJsonRoute)


AdminDep = Annotated[Session, Depends(require_role("admin", "administering the broker"))]


class Reason(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field(min_length=1, max_length=500)


class KillSwitchCreate(BaseModel):
    """Exactly one of ``task_id`` (deny that task's sessions) or ``role_arn`` (deny every session
    of the role issued until now)."""

    model_config = ConfigDict(extra="forbid")

    task_id: str | None = Field(default=None, max_length=64)
    role_arn: str | None = Field(default=None, max_length=2048)
    reason: str = Field(min_length=1, max_length=500)

    @model_validator(mode="after")
    def _one(self) -> KillSwitchCreate:
        if (self.task_id is None) == (self.role_arn is None):
            raise ValueError("give exactly one of task_id or role_arn")
        return self


class KillSwitchOut(BaseModel):
    id: str
    backend: str
    target: str
    kind: str
    value: str
    reason: str
    created_by: str
    created_at: float
    expires_at: float
    task_id: str | None
    credential_id: str | None
    lifted_at: float | None

    @classmethod
    def of(cls, entry: KillSwitch) -> KillSwitchOut:
        return cls(**{k: getattr(entry, k) for k in KillSwitch.__slots__})


class OperatorCredentialOut(CredentialOut):
    """A credential as operators see it: state, attempts and the last error (never a secret)."""

    revoke_attempts: int
    next_attempt_at: float | None
    last_error: str | None
    revoked_at: float | None


def _operator_view(cred: Any) -> OperatorCredentialOut:
    base = CredentialOut.of(cred).model_dump()
    return OperatorCredentialOut(
        **base,
        revoke_attempts=cred.revoke_attempts,
        next_attempt_at=cred.next_attempt_at,
        last_error=cred.last_error,
        revoked_at=cred.revoked_at,
    )


@router.post("/tasks/{task_id}/revoke")
def kill_task(task_id: str, body: Reason, admin: AdminDep, broker: BrokerDep) -> dict[str, Any]:
    """End a task now and take back everything it holds (Vault: revoked; STS: kill switch)."""
    task, creds = broker.revoker.kill_task(admin.principal, task_id, reason=body.reason)
    return {
        "task": TaskOut.of(task).model_dump(),
        "credentials": [_operator_view(c).model_dump() for c in creds],
    }


@router.get("/credentials")
def list_credentials(
    admin: AdminDep,
    broker: BrokerDep,
    state: Annotated[list[CredentialState] | None, Query()] = None,
    backend: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[dict[str, Any]]:
    """Credentials by state (``?state=revoke_pending`` shows revocations the reaper is retrying)."""
    creds = broker.revoker.credentials(states=state, backend=backend, limit=limit)
    return [_operator_view(c).model_dump() for c in creds]


@router.get("/reaper")
def reaper_status(admin: AdminDep, broker: BrokerDep) -> dict[str, Any]:
    """The reaper of this replica: passes, the last pass's report, credentials per state."""
    if broker.reaper is None:
        raise ServiceUnavailable("no reaper in this process", code="no_reaper")
    return broker.reaper.status()


@router.post("/reaper/run")
async def reaper_run(admin: AdminDep, broker: BrokerDep) -> dict[str, Any]:
    """Run one reaper pass now, with an orphan scan (the result of the pass)."""
    if broker.reaper is None:
        raise ServiceUnavailable("no reaper in this process", code="no_reaper")
    reaper = broker.reaper
    report = await run_in_threadpool(lambda: reaper.run_once(orphan_scan=True))
    from dataclasses import asdict

    return asdict(report)


@router.get("/kill-switches", response_model=list[KillSwitchOut])
def list_kill_switches(
    admin: AdminDep, broker: BrokerDep, live: Annotated[bool, Query()] = True
) -> list[KillSwitchOut]:
    """Kill-switch entries (``?live=false`` includes lifted and expired ones)."""
    assert broker.kill_switches is not None
    entries = broker.kill_switches.live() if live else broker.kill_switches.all()
    return [KillSwitchOut.of(e) for e in entries]


@router.post("/kill-switches", status_code=201)
def set_kill_switch(body: KillSwitchCreate, admin: AdminDep, broker: BrokerDep) -> dict[str, Any]:
    """Per task: the task is killed (its STS sessions denied by SourceIdentity, anything else
    revoked). Per role: every session of the role issued until now is denied."""
    assert broker.kill_switches is not None
    if body.role_arn is not None:
        entry = broker.kill_switches.kill_role(
            body.role_arn, actor=admin.principal, reason=body.reason
        )
        return {"kill_switches": [KillSwitchOut.of(entry).model_dump()]}
    assert body.task_id is not None
    task, creds = broker.revoker.kill_task(admin.principal, body.task_id, reason=body.reason)
    entries = [e for e in broker.kill_switches.live() if e.task_id == task.id]
    return {
        "task": TaskOut.of(task).model_dump(),
        "credentials": [_operator_view(c).model_dump() for c in creds],
        "kill_switches": [KillSwitchOut.of(e).model_dump() for e in entries],
    }


@router.post("/kill-switches/{switch_id}/lift", response_model=KillSwitchOut)
def lift_kill_switch(
    switch_id: str, body: Reason, admin: AdminDep, broker: BrokerDep
) -> KillSwitchOut:
    """Lift an entry early: the sessions it denied work again until they expire."""
    assert broker.kill_switches is not None
    return KillSwitchOut.of(
        broker.kill_switches.lift(switch_id, actor=admin.principal, reason=body.reason)
    )


@router.get("/backends")
def backends(admin: AdminDep, broker: BrokerDep) -> dict[str, Any]:
    """Each configured backend: non-secret facts and its health."""
    out: dict[str, Any] = {}
    for name, backend in sorted(broker.backends.items()):
        try:
            backend.health()
            health = "ok"
        except ServiceUnavailable as exc:
            health = exc.code
        out[name] = {**backend.describe(), "health": health}
    return out
