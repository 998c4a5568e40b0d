"""Who a verified token says it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, get_args

#: What a principal may do besides being itself: ``agent`` requests tasks, ``approver`` decides
#: them, ``auditor`` reads the audit record, ``admin`` administers the broker.
Role = Literal["agent", "approver", "auditor", "admin"]
ROLES: frozenset[str] = frozenset(get_args(Role))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity. Two principals are the same iff (issuer, subject) match.

    ``roles`` is drawn from :data:`ROLES`, derived per issuer from configuration and claims when
    the token is verified; ``claims`` holds every verified claim (for scope and approval rules).
    """

    issuer: str
    subject: str
    display_name: str | None = None
    groups: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        """The identity: (issuer, subject)."""
        return (self.issuer, self.subject)

    def same_as(self, other: Principal) -> bool:
        """Whether ``other`` is the same identity (names and roles do not matter)."""
        return self.key == other.key

    def has_role(self, role: str) -> bool:
        """Whether this principal holds ``role`` (one of :data:`ROLES`)."""
        return role in self.roles
