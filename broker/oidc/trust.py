"""From verified claims to a principal: trust rules, claim mapping and roles.

Everything here runs after the signature and the standard claims are verified, so it only ever
sees claims the issuer vouched for. Trust rules are :class:`~broker.domain.conditions.ConditionSet`
values compiled when the configuration loads; in ``audit`` mode a failing rule is reported in the
:class:`TrustDecision` instead of refusing the token - except the conditions that pin a
multi-tenant preset's tenant, which are enforced in every mode.

Two more facts are read here: the token's *run identity* (``claims.run_identity``: which CI run
or pod it was issued to; tasks are reachable from later sessions of the same run) and the
*persons* behind it (``claims.person``: who it is across identities, for counting approvers).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.domain.audit import canonical_json
from broker.domain.conditions import Verdict, claim_value
from broker.domain.principal import ROLES, Principal
from broker.settings import IssuerConfig

MAX_SUBJECT = 1024
MAX_DISPLAY_NAME = 256
MAX_GROUPS = 256
MAX_GROUP = 256
MAX_PERSON = 256
MAX_RUN_VALUE = 256


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
    """Apply the issuer's trust rules (no rules: every verified token of the issuer is trusted).

    The tenant pin of a multi-tenant preset is enforced first, in ``audit`` mode too: audit mode
    is for rolling out rules on top of the pin, and must never admit another tenant's token.
    """
    if issuer.trust is None:
        return TrustDecision(Verdict(True, "no trust rules"), enforced=True)
    if issuer.tenant_pin is not None:
        pinned = issuer.tenant_pin.evaluate(claims)
        if not pinned:
            return TrustDecision(pinned, enforced=True)
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


def _scalar(value: Any) -> str | None:
    """A claim value usable as an identifier: a non-empty string or an integer, as text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str) and value.strip() and value.isprintable():
        return value.strip()
    return None


def run_identity_of(issuer: IssuerConfig, claims: Mapping[str, Any]) -> str | None:
    """A digest naming the run the token was issued to, or None when the issuer names no run
    claims or the token lacks one of them (then a task belongs to its session alone)."""
    paths = issuer.claims.run_identity
    if not paths:
        return None
    values = []
    for path in paths:
        value = _scalar(claim_value(claims, path))
        if value is None or len(value) > MAX_RUN_VALUE:
            return None
        values.append([path, value])
    body = canonical_json({"issuer": issuer.issuer, "run": values})
    return hashlib.sha256(body).hexdigest()


def _verified_email(claims: Mapping[str, Any]) -> bool:
    verified = claims.get("email_verified")
    # Some providers (Amazon Cognito) send the boolean as a string.
    return verified is True or verified == "true"


def persons_of(issuer: IssuerConfig, claims: Mapping[str, Any]) -> tuple[str, ...] | None:
    """Who the token's holder is across identities, normalised (case-folded).

    None when the issuer names no person claim (people are told apart by (issuer, subject));
    an empty tuple when it names some but the token carries none that counts (an absent claim,
    or an ``email`` without ``email_verified: true``).
    """
    paths = issuer.claims.person
    if not paths:
        return None
    found: list[str] = []
    for path in paths:
        if path == "email" and not _verified_email(claims):
            continue
        value = _scalar(claim_value(claims, path))
        if value is None or len(value) > MAX_PERSON:
            continue
        person = value.casefold()
        if person not in found:
            found.append(person)
    return tuple(found)


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
        persons=persons_of(issuer, claims),
    )
