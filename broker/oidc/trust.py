"""From verified claims to a principal: trust rules, claim mapping and roles.

Everything here runs after the signature and the standard claims are verified, so it only ever
sees claims the issuer vouched for. Trust rules are :class:`~broker.domain.conditions.ConditionSet`
values compiled when the configuration loads; in ``audit`` mode a failing rule is reported in the
:class:`TrustDecision` instead of refusing the token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.domain.conditions import Verdict, claim_value
from broker.domain.principal import ROLES, Principal
from broker.settings import IssuerConfig

MAX_SUBJECT = 1024
MAX_DISPLAY_NAME = 256
MAX_GROUPS = 256
MAX_GROUP = 256


@dataclass(frozen=True, slots=True)
class TrustDecision:
    """The trust rules' verdict and whether it was enforced (``audit`` mode does not)."""

    verdict: Verdict
    enforced: bool

    @property
    def admitted(self) -> bool:
        """Whether the token may open a session."""
        return self.verdict.ok or not self.enforced

    @property
    def audit_only_denial(self) -> bool:
        """The rules failed, but the issuer is in audit mode: record it, do not deny."""
        return not self.verdict.ok and not self.enforced


def evaluate_trust(issuer: IssuerConfig, claims: Mapping[str, Any]) -> TrustDecision:
    """Apply the issuer's trust rules (no rules: every verified token of the issuer is trusted)."""
    if issuer.trust is None:
        return TrustDecision(Verdict(True, "no trust rules"), enforced=True)
    return TrustDecision(issuer.trust.evaluate(claims), enforced=issuer.trust_mode == "enforce")


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def subject_of(issuer: IssuerConfig, claims: Mapping[str, Any]) -> str | None:
    """The subject named by the claim mapping, when it is a usable string."""
    subject = _string(claim_value(claims, issuer.claims.subject))
    if subject is None or len(subject) > MAX_SUBJECT or not subject.isprintable():
        return None
    return subject


def _strings(value: Any, limit: int) -> list[str]:
    items = value if isinstance(value, list) else [value]
    return [v[:MAX_GROUP] for v in items[:limit] if isinstance(v, str) and v]


def roles_of(issuer: IssuerConfig, claims: Mapping[str, Any]) -> frozenset[str]:
    """The issuer's base roles, the roles a role claim names, and those role rules grant."""
    roles: set[str] = set(issuer.roles)
    if issuer.claims.roles:
        roles |= ROLES & set(_strings(claim_value(claims, issuer.claims.roles), 64))
    for rule in issuer.claims.role_rules:
        if rule.when.evaluate(claims):
            roles.add(rule.role)
    return frozenset(roles)


def principal_of(issuer: IssuerConfig, subject: str, claims: dict[str, Any]) -> Principal:
    """The principal for verified claims (``subject`` from :func:`subject_of`)."""
    mapping = issuer.claims
    display = _string(claim_value(claims, mapping.display_name)) if mapping.display_name else None
    groups = _strings(claim_value(claims, mapping.groups), MAX_GROUPS) if mapping.groups else []
    return Principal(
        issuer=issuer.issuer,
        subject=subject,
        display_name=display[:MAX_DISPLAY_NAME] if display else None,
        groups=tuple(groups),
        roles=roles_of(issuer, claims),
        claims=claims,
    )
