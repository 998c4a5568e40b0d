"""The task state machine and the pure rules of deciding a task.

    pending ──approve──▶ approved ──mint──▶ active ──complete──▶ completed
       │                    │                 │
       ├──deny──▶ denied    ├──expire──▶ expired        ├──revoke──▶ revoked
       ├──expire──▶ expired ├──void───▶ revoked         └──expire──▶ expired
       └──cancel──▶ cancelled ├──cancel──▶ cancelled
                            └──fail───▶ failed

``failed``: the task was approved but no credential was ever issued because minting failed (the
backend refused, or the scope is misconfigured at its backend). A failed mint does not spend the
approval: the agent may retry while the approval lasts, up to :data:`MAX_MINT_FAILURES` attempts;
the task ends ``failed`` at the last failed attempt, or when it is ended (completed, cancelled,
expired) after a failed attempt and before any credential was issued. It never says
``completed``, which would claim the work had its credential.

A task's parameters, purpose and TTL are frozen at request time: the *binding hash* covers them,
the requester and the template version, and every decision (an automatic one, each approver's)
records the binding hash it was made on. An approval is void when the hash no longer matches.
Terminal states never change.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from broker.domain.audit import canonical_json
from broker.errors import Conflict, ValidationFailed

if TYPE_CHECKING:
    from broker.domain.principal import Principal
    from broker.domain.records import Approval, Credential, Task
    from broker.domain.scope import ScopeTemplate


class TaskState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    ACTIVE = "active"
    COMPLETED = "completed"
    REVOKED = "revoked"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    #: Approved, but minting failed and no credential was issued (see the module docstring).
    FAILED = "failed"

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
        TaskState.FAILED,
    }
)

#: Failed mints a task may have; the last one ends it ``failed``.
MAX_MINT_FAILURES = 3

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
            TaskState.FAILED,
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


# --- failed mints --------------------------------------------------------------------------


def failed_mints(credentials: Iterable[Credential]) -> list[Credential]:
    """A task's mint attempts that issued nothing (the backend refused, or the answer was lost
    and what it may have made is being taken back), oldest first."""
    return sorted(
        (c for c in credentials if c.issued_at is None and c.state is not CredentialState.MINTING),
        key=lambda c: c.created_at,
    )


def mint_error(credential: Credential) -> str:
    """The stable error code a failed mint ended with (recorded in its details)."""
    return str(credential.details.get("error_code") or "backend_error")


def ending_state(task: Task, wanted: TaskState, credentials: Iterable[Credential]) -> TaskState:
    """The state a task really ends in when it is asked to become ``wanted``.

    An approved task that never got a credential because minting failed ends ``failed``, not
    ``completed``, ``cancelled`` or ``expired``: those would say the work had what it asked for,
    or that nobody tried.
    """
    if (
        task.state is TaskState.APPROVED
        and task.mints == 0
        and wanted in (TaskState.COMPLETED, TaskState.CANCELLED, TaskState.EXPIRED)
        and failed_mints(credentials)
    ):
        return TaskState.FAILED
    return wanted


def failure_reason(credentials: Iterable[Credential]) -> str:
    """Why a failed task got no credential, for the task record and the agent."""
    failed = failed_mints(credentials)
    if not failed:
        return "no credential was issued"
    attempts = f"{len(failed)} attempt{'s' if len(failed) != 1 else ''}"
    return f"no credential was issued: minting failed ({attempts}, last: {mint_error(failed[-1])})"


# --- deciding ------------------------------------------------------------------------------


def condition_claims(principal: Principal) -> dict[str, Any]:
    """The claims conditions see: the verified claims, with the mapped groups as ``groups``.

    A token's own ``groups`` claim wins; otherwise the groups mapped from the issuer's groups
    claim (which may have another name) are offered as ``groups``.
    """
    claims = dict(principal.claims)
    claims.setdefault("groups", list(principal.groups))
    return claims


@dataclass(frozen=True, slots=True)
class Decision:
    """What a new request becomes: its state, the rule that decided it and, for a denial, why."""

    state: TaskState
    rule: str
    reason: str | None = None


def decide_request(template: ScopeTemplate, claims: Mapping[str, Any]) -> Decision:
    """Deny (requester conditions unmet), approve automatically, or leave pending for approvers."""
    verdict = template.requester.evaluate(claims)
    if not verdict:
        return Decision(TaskState.DENIED, "requester", verdict.reason)
    if template.approval.mode == "auto":
        return Decision(
            TaskState.APPROVED, f"auto: scope {template.name} (risk {template.risk.value})"
        )
    return Decision(
        TaskState.PENDING,
        f"manual: {template.approval.count} approver(s) of scope {template.name}",
    )


def resolve_ttl(template: ScopeTemplate, asked: int | None, global_cap: int) -> int:
    """The TTL a request gets: the template's default, or what was asked within every cap."""
    cap = min(template.ttl.max, global_cap)
    if asked is None:
        return min(template.ttl.default, cap)
    if isinstance(asked, bool) or not isinstance(asked, int) or asked < 60:
        raise ValidationFailed("ttl must be an integer of at least 60 seconds", code="invalid_ttl")
    if asked > cap:
        raise ValidationFailed(
            f"ttl may be at most {cap} seconds for this scope", code="ttl_too_long"
        )
    return asked


def binding_hash(
    *,
    task_id: str,
    issuer: str,
    subject: str,
    scope: str,
    template_hash: str,
    params: Mapping[str, Any],
    ttl: int,
    purpose: str,
) -> str:
    """SHA-256 over exactly what a decision approves; any change voids the decision."""
    body = {
        "task": task_id,
        "requester": [issuer, subject],
        "scope": scope,
        "template": template_hash,
        "params": dict(params),
        "ttl": ttl,
        "purpose": purpose,
    }
    return hashlib.sha256(canonical_json(body)).hexdigest()


def task_binding(task: Task) -> str:
    """The binding hash of a task as it stands now."""
    return binding_hash(
        task_id=task.id,
        issuer=task.issuer,
        subject=task.subject,
        scope=task.scope,
        template_hash=task.template_hash,
        params=task.params,
        ttl=task.ttl,
        purpose=task.purpose,
    )


APPROVE = "approve"
DENY = "deny"


@dataclass(frozen=True, slots=True)
class Tally:
    """The approvals that count towards a task's decision right now."""

    counted: tuple[Approval, ...]
    required: int
    approval_ttl: int

    @property
    def met(self) -> bool:
        return self.required > 0 and len(self.counted) >= self.required

    @property
    def expires_at(self) -> float | None:
        """When the oldest counted approval goes stale (the task's approval ends then)."""
        if not self.counted:
            return None
        return min(a.created_at for a in self.counted) + self.approval_ttl

    def approvers(self) -> list[str]:
        return [a.subject for a in self.counted]


def tally(
    approvals: Iterable[Approval],
    *,
    task: Task,
    required: int,
    approval_ttl: int,
    now: float,
) -> Tally:
    """Count the distinct, fresh approvals bound to this exact task version.

    An approval counts only if it approves, is not the requester's own, was made on the task's
    current binding hash and template version, and is younger than ``approval_ttl``. Approvers
    are told apart by person: two approvals sharing an identity (issuer, subject) or a person
    value (``Approval.persons``) count once, and one sharing either with the requester (its
    identity, ``Task.requester_persons``) never counts.
    """
    binding = task_binding(task)
    seen = identities(task.issuer, task.subject, task.requester_persons)
    counted: list[Approval] = []
    for a in sorted(approvals, key=lambda a: a.created_at, reverse=True):
        keys = identities(a.issuer, a.subject, a.persons)
        if (
            a.decision != APPROVE
            or keys & seen
            or a.binding_hash != binding
            or a.template_hash != task.template_hash
            or now >= a.created_at + approval_ttl
        ):
            continue
        seen |= keys
        counted.append(a)
    return Tally(tuple(counted), required, approval_ttl)


def identities(issuer: str, subject: str, persons: Iterable[str] | None) -> set[tuple[str, str]]:
    """What tells one person from another: the identity and every person value it carries."""
    keys = {("identity", f"{issuer}\n{subject}")}
    keys.update(("person", p) for p in persons or ())
    return keys
