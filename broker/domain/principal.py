"""Who a verified token says it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from broker.errors import Forbidden

#: What a principal may do besides being itself: ``agent`` requests tasks, ``approver`` decides
#: them, ``auditor`` reads the audit record, ``admin`` administers the broker.
Role = Literal["agent", "approver", "auditor", "admin"]
ROLES: frozenset[str] = frozenset(get_args(Role))
#: The stable code of the refusal for each missing role.
ROLE_REFUSAL_CODES: dict[str, str] = {
    "agent": "agent_role_required",
    "approver": "not_an_approver",
    "auditor": "auditor_role_required",
    "admin": "admin_required",
}


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity. Two principals are the same iff (issuer, subject) match.

    ``roles`` is drawn from :data:`ROLES`, derived per issuer from configuration and claims when
    the token is verified; ``claims`` holds every verified claim (for scope and approval rules).
    ``persons`` names the person behind the identity, when the issuer says how (approvals).
    """

    issuer: str
    subject: str
    display_name: str | None = None
    groups: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: Who this is across identities (the issuer's ``claims.person`` values, case-folded); None
    #: when the issuer names no person claim, empty when the token carries none that counts.
    persons: tuple[str, ...] | None = field(default=None, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        """The identity: (issuer, subject)."""
        return (self.issuer, self.subject)

    def same_as(self, other: Principal) -> bool:
        """Whether ``other`` is the same identity (names and roles do not matter)."""
        return self.key == other.key

    def same_person(self, persons: tuple[str, ...] | None, key: tuple[str, str]) -> bool:
        """Whether this principal is the person of identity ``key`` with ``persons``: the same
        identity, or a person value in common."""
        if self.key == key:
            return True
        return bool(self.persons and persons and set(self.persons) & set(persons))

    def has_role(self, role: str) -> bool:
        """Whether this principal holds ``role`` (one of :data:`ROLES`)."""
        return role in self.roles


def role_refusal(principal: Principal, role: str, *, doing: str) -> Forbidden:
    """The refusal for a principal without ``role``: which role, and where roles come from."""
    held = ", ".join(sorted(principal.roles)) or "none"
    return Forbidden(
        f"you do not hold the {role} role, which {doing} needs (your roles: {held}). Roles come "
        f"from the configuration of issuer {principal.issuer}: its `roles` (given to all its "
        "principals), the claim named by `claims.roles`, and `claims.role_rules` (see "
        "docs/authentication.md, Roles)",
        code=ROLE_REFUSAL_CODES[role],
        extra={"missing_role": role, "roles": sorted(principal.roles)},
    )
