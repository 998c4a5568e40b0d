"""Who a verified token says it is."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity. Two principals are the same iff (issuer, subject) match."""

    issuer: str
    subject: str
    display_name: str | None = None
    groups: tuple[str, ...] = ()
    roles: frozenset[str] = frozenset()
    claims: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.issuer, self.subject)

    def same_as(self, other: Principal) -> bool:
        return self.key == other.key

    def has_role(self, role: str) -> bool:
        return role in self.roles
