"""The task state machine.

    pending ──approve──▶ approved ──mint──▶ active ──complete──▶ completed
       │                    │                 │
       ├──deny──▶ denied    ├──expire──▶ expired        ├──revoke──▶ revoked
       ├──expire──▶ expired └──cancel──▶ cancelled      └──expire──▶ expired
       └──cancel──▶ cancelled

A task's parameters, purpose and TTL are frozen at request time. Terminal states never change.
"""

from __future__ import annotations

from enum import StrEnum

from broker.errors import Conflict


class TaskState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    ACTIVE = "active"
    COMPLETED = "completed"
    REVOKED = "revoked"
    EXPIRED = "expired"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES

    @property
    def holds_credentials(self) -> bool:
        """States in which credentials may exist and must be revoked on the way out."""
        return self in (TaskState.APPROVED, TaskState.ACTIVE)


TERMINAL_STATES = frozenset(
    {
        TaskState.DENIED,
        TaskState.COMPLETED,
        TaskState.REVOKED,
        TaskState.EXPIRED,
        TaskState.CANCELLED,
    }
)

_ALLOWED: dict[TaskState, frozenset[TaskState]] = {
    TaskState.PENDING: frozenset(
        {TaskState.APPROVED, TaskState.DENIED, TaskState.EXPIRED, TaskState.CANCELLED}
    ),
    TaskState.APPROVED: frozenset(
        {
            TaskState.ACTIVE,
            TaskState.EXPIRED,
            TaskState.CANCELLED,
            TaskState.REVOKED,
            TaskState.COMPLETED,
        }
    ),
    TaskState.ACTIVE: frozenset({TaskState.COMPLETED, TaskState.REVOKED, TaskState.EXPIRED}),
}


def can_transition(current: TaskState, target: TaskState) -> bool:
    return target in _ALLOWED.get(current, frozenset())


def transition(current: TaskState, target: TaskState) -> TaskState:
    """Return ``target`` if the move is legal, else raise :class:`Conflict`."""
    if not can_transition(current, target):
        raise Conflict(
            f"a task that is {current.value} cannot become {target.value}",
            code="invalid_task_state",
        )
    return target


class CredentialState(StrEnum):
    """Lifecycle of one minted credential."""

    MINTING = "minting"  # intent recorded, backend call under way
    ACTIVE = "active"
    REVOKE_PENDING = "revoke_pending"  # revocation failed; the reaper retries
    REVOKED = "revoked"
    EXPIRED = "expired"
    FAILED = "failed"  # the backend refused; nothing exists
