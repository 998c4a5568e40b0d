"""The task state machine allows exactly the documented moves."""

from __future__ import annotations

import pytest

from broker.domain.task import TERMINAL_STATES, TaskState, can_transition, transition
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
