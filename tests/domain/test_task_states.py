"""The task state machine allows exactly the documented moves."""

from __future__ import annotations

import pytest

from broker.domain.records import Credential, Task
from broker.domain.task import (
    TERMINAL_STATES,
    CredentialState,
    TaskState,
    can_transition,
    ending_state,
    failed_mints,
    failure_reason,
    transition,
)
from broker.errors import Conflict

LEGAL = {
    (TaskState.PENDING, TaskState.APPROVED),
    (TaskState.PENDING, TaskState.DENIED),
    (TaskState.PENDING, TaskState.EXPIRED),
    (TaskState.PENDING, TaskState.CANCELLED),
    (TaskState.APPROVED, TaskState.ACTIVE),
    (TaskState.APPROVED, TaskState.EXPIRED),
    (TaskState.APPROVED, TaskState.CANCELLED),
    (TaskState.APPROVED, TaskState.REVOKED),
    (TaskState.APPROVED, TaskState.COMPLETED),
    (TaskState.APPROVED, TaskState.FAILED),
    (TaskState.ACTIVE, TaskState.COMPLETED),
    (TaskState.ACTIVE, TaskState.REVOKED),
    (TaskState.ACTIVE, TaskState.EXPIRED),
}


@pytest.mark.parametrize("current", list(TaskState))
@pytest.mark.parametrize("target", list(TaskState))
def test_every_pair(current: TaskState, target: TaskState) -> None:
    """Each (from, to) pair is legal iff it is in the table; illegal moves raise Conflict."""
    assert can_transition(current, target) == ((current, target) in LEGAL)
    if (current, target) in LEGAL:
        assert transition(current, target) is target
    else:
        with pytest.raises(Conflict):
            transition(current, target)


def test_terminal_states_never_move() -> None:
    for state in TERMINAL_STATES:
        assert not any(can_transition(state, t) for t in TaskState)


def _task(state: TaskState, mints: int = 0) -> Task:
    return Task(
        id="tsk_1",
        session_id="ses_1",
        issuer="https://issuer",
        subject="agent",
        scope="vault-kv-read",
        template_hash="h",
        params={},
        purpose="p",
        ttl=600,
        state=state,
        created_at=1.0,
        updated_at=1.0,
        trace_id="t" * 32,
        span_id="s" * 16,
        mints=mints,
    )


def _cred(state: CredentialState, *, issued: bool = False, code: str = "") -> Credential:
    return Credential(
        id=f"crd_{state.value}",
        task_id="tsk_1",
        backend="vault",
        kind="vault_token",
        state=state,
        created_at=2.0,
        issued_at=3.0 if issued else None,
        details={"error_code": code} if code else {},
    )


def test_a_task_whose_mints_all_failed_ends_failed_not_completed() -> None:
    """Ending an approved task that never got a credential because minting failed gives
    ``failed`` (whether it was completed, cancelled or expired); a task that got one, or never
    tried, ends as asked; a mint still under way does not count as failed."""
    failed = [_cred(CredentialState.FAILED, code="scope_misconfigured")]
    for wanted in (TaskState.COMPLETED, TaskState.CANCELLED, TaskState.EXPIRED):
        assert ending_state(_task(TaskState.APPROVED), wanted, failed) is TaskState.FAILED
        assert ending_state(_task(TaskState.APPROVED), wanted, []) is wanted
    issued = [_cred(CredentialState.ACTIVE, issued=True)]
    assert ending_state(_task(TaskState.ACTIVE, 1), TaskState.COMPLETED, issued) is (
        TaskState.COMPLETED
    )
    assert failed_mints([_cred(CredentialState.MINTING)]) == []
    lost = [_cred(CredentialState.REVOKE_PENDING, code="backend_outcome_unknown")]
    assert ending_state(_task(TaskState.APPROVED), TaskState.COMPLETED, lost) is TaskState.FAILED
    assert failure_reason(failed) == (
        "no credential was issued: minting failed (1 attempt, last: scope_misconfigured)"
    )
    assert TaskState.FAILED.terminal
