"""An evaluator of the IAM ``Deny`` statements the broker writes, for tests.

moto stores IAM policies but evaluates no condition on an assumed-role session, so a test cannot
ask moto whether a session is denied. This module decides it the way IAM's documented evaluation
logic does, for the parts the broker's kill-switch policies use:

- a ``Deny`` statement applies when every condition operator in it matches (AND), and an operator
  matches when its key matches any listed value (OR); a negated operator (``StringNotEquals``)
  matches when the key matches none of them;
- a key missing from the request context makes a positive operator false and a negated one true
  (IAM's rule for ``...Not...`` operators without ``IfExists``);
- dates are compared as instants (``aws:TokenIssueTime`` against ISO 8601 values).

Any other operator, effect, or a statement narrower than ``Action: *`` / ``Resource: *`` raises,
so a test fails rather than trusting a document this evaluator does not understand.

References: "Policy evaluation logic", "IAM JSON policy elements: Condition operators" and
"Creating a condition with multiple keys or values" in the IAM User Guide.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

#: Context key -> its value (a string, or a float for dates); a missing key is absent.
Context = Mapping[str, str | float]


def _date(value: str | float) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _values(raw: Any) -> list[Any]:
    return raw if isinstance(raw, list) else [raw]


def _operator_matches(operator: str, key: str, expected: Any, context: Context) -> bool:
    present = key in context
    negated = operator in ("StringNotEquals",)
    if not present:
        return negated
    actual = context[key]
    values = _values(expected)
    if operator == "StringEquals":
        return any(actual == v for v in values)
    if operator == "StringNotEquals":
        return all(actual != v for v in values)
    when = _date(actual)
    if operator == "DateLessThan":
        return any(when < _date(v) for v in values)
    if operator == "DateLessThanEquals":
        return any(when <= _date(v) for v in values)
    if operator == "DateGreaterThan":
        return any(when > _date(v) for v in values)
    if operator == "DateGreaterThanEquals":
        return any(when >= _date(v) for v in values)
    raise AssertionError(f"the evaluator does not model condition operator {operator!r}")


def statement_denies(statement: Mapping[str, Any], context: Context) -> bool:
    """True when this ``Deny *`` statement applies to a request with ``context``."""
    assert statement["Effect"] == "Deny", statement
    assert statement["Action"] == "*" and statement["Resource"] == "*", statement
    for operator, keys in (statement.get("Condition") or {}).items():
        for key, expected in keys.items():
            if not _operator_matches(operator, key, expected, context):
                return False
    return True


def denied_by(document: Mapping[str, Any] | None, context: Context) -> list[str]:
    """The Sids of the statements denying a request with ``context`` (empty: not denied)."""
    if document is None:
        return []
    statements = _values(document["Statement"])
    return [str(s.get("Sid")) for s in statements if statement_denies(s, context)]


def session_context(
    source_identity: str | None, issued_at: float, cluster: str | None
) -> dict[str, str | float]:
    """The request context of any call an STS session makes: the keys the broker's policy reads."""
    context: dict[str, str | float] = {"aws:TokenIssueTime": issued_at}
    if source_identity is not None:
        context["aws:SourceIdentity"] = source_identity
    if cluster is not None:
        context["aws:PrincipalTag/broker:cluster"] = cluster
    return context


def credential_context(
    details: Mapping[str, Any], expires_at: float, cluster: str, *, shift: float = 0.0
) -> dict[str, str | float]:
    """The context of calls made with an STS credential the broker minted: its SourceIdentity,
    its cluster tag and its issue time as STS reported it (``Expiration - DurationSeconds``),
    moved by ``shift`` seconds (to probe the edges)."""
    issued = float(expires_at) - float(details["duration"]) + shift
    return session_context(str(details["source_identity"]), issued, cluster)


def always_denied(document: Mapping[str, Any] | None, source_identity: str, cluster: str) -> bool:
    """True when a session with this SourceIdentity is denied whenever in the last 12 hours it
    was issued (what a mint whose issue time is unknown needs)."""
    import time

    now = time.time()
    return all(
        denied_by(document, session_context(source_identity, now - back, cluster))
        for back in range(-120, 12 * 3600, 60)
    )
