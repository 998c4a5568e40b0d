"""Does an IAM role's trust policy let the broker use it the way it does? (pure, no I/O)

The broker calls ``AssumeRole`` with session tags and a SourceIdentity, so a role's trust policy
must allow ``sts:AssumeRole``, ``sts:TagSession`` and ``sts:SetSourceIdentity`` to the broker's
principal (its role or user ARN, its account root, or ``*``). ``broker scopes check --live`` uses
this to say exactly which statement to add. Conditions are not evaluated: a statement with a
condition counts as allowing, and the check says so.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from broker.scopes.prerequisites import STS_ACTIONS


def principal_arn(caller_arn: str) -> str:
    """The principal a trust policy names for a caller: an assumed-role session is its role, a
    user is its IAM user (some STS implementations, moto among them, say ``sts`` for users)."""
    if ":assumed-role/" in caller_arn:
        prefix, rest = caller_arn.split(":assumed-role/", 1)
        partition_account = prefix.replace(":sts:", ":iam:")
        return f"{partition_account}:role/{rest.split('/', 1)[0]}"
    if ":user/" in caller_arn:
        return caller_arn.replace(":sts:", ":iam:", 1)
    return caller_arn


def account_of(arn: str) -> str:
    parts = arn.split(":")
    return parts[4] if len(parts) > 4 else ""


def parse_document(document: Any) -> dict[str, Any]:
    """A policy document as IAM returns it (a dict, or URL-encoded JSON text)."""
    if isinstance(document, str):
        document = json.loads(unquote(document))
    return dict(document) if isinstance(document, dict) else {}


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


@dataclass(frozen=True, slots=True)
class TrustVerdict:
    """What a trust policy allows the broker: the STS actions, and whether conditions apply."""

    allowed: frozenset[str]
    conditional: bool

    @property
    def missing(self) -> list[str]:
        return [a for a in STS_ACTIONS if a not in self.allowed]


def _names_principal(statement: dict[str, Any], principals: Iterable[str]) -> bool:
    raw = statement.get("Principal")
    if raw == "*":
        return True
    values = _as_list(raw.get("AWS")) if isinstance(raw, dict) else []
    wanted = set(principals)
    return any(v == "*" or v in wanted for v in values)


def trust_verdict(document: Any, caller_arn: str) -> TrustVerdict:
    """Which of the broker's STS actions the trust policy allows to ``caller_arn``."""
    principal = principal_arn(caller_arn)
    account = account_of(principal)
    principals = {principal, caller_arn, f"arn:aws:iam::{account}:root", account}
    allowed: set[str] = set()
    denied: set[str] = set()
    conditional = False
    for statement in _as_list(parse_document(document).get("Statement")):
        if not isinstance(statement, dict) or not _names_principal(statement, principals):
            continue
        patterns = [str(a).lower() for a in _as_list(statement.get("Action"))]
        matched = {
            a for a in STS_ACTIONS if any(fnmatch.fnmatchcase(a.lower(), p) for p in patterns)
        }
        if statement.get("Effect") == "Deny" and not statement.get("Condition"):
            denied |= matched
        elif statement.get("Effect") == "Allow":
            allowed |= matched
            conditional = conditional or (bool(statement.get("Condition")) and bool(matched))
    return TrustVerdict(frozenset(allowed - denied), conditional)
