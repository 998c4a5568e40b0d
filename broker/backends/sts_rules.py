"""AWS STS's own rules, enforced by the broker before it calls AssumeRole.

moto's STS accepts much that real STS rejects (oversized or invalid session policies, durations
above the role's maximum, more than 50 tags, bad session names, roles that do not exist), so the
broker checks every rule itself: what passes here also passes on AWS. Pure functions, no I/O;
each rule has a unit test in ``tests/backends/test_sts_rules.py``.

References: the AssumeRole API reference (parameter constraints) and "IAM and AWS STS quotas".
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

from broker.errors import Conflict, InvalidRequest

#: STS issues credentials for 15 minutes at least.
MIN_DURATION = 900
#: The largest MaxSessionDuration a role can have (12 hours).
MAX_DURATION = 43_200
#: Role chaining (the broker itself runs under an assumed role) caps sessions at one hour.
CHAINED_MAX_DURATION = 3600
#: The plaintext of inline and managed session policies together, in characters.
SESSION_POLICY_MAX_CHARS = 2048
MAX_POLICY_ARNS = 10
MAX_TAGS = 50
TAG_KEY_MAX = 128
TAG_VALUE_MAX = 256
MAX_TRANSITIVE_TAG_KEYS = 50
NAME_MIN, NAME_MAX = 2, 64
EXTERNAL_ID_MIN, EXTERNAL_ID_MAX = 2, 1224
#: PackedPolicySize is a percentage of the limit; warn from here, STS itself refuses above 100.
PACKED_POLICY_WARN = 90

#: RoleSessionName and SourceIdentity: ``[\w+=,.@-]``, where ``\w`` is ASCII.
_NAME_CHAR = re.compile(r"[A-Za-z0-9_+=,.@-]")
_NAME = re.compile(r"[A-Za-z0-9_+=,.@-]{2,64}")
_EXTERNAL_ID = re.compile(r"[A-Za-z0-9_+=,.@:/-]{2,1224}")
_POLICY_ARN = re.compile(r"arn:aws[a-z-]*:iam::(\d{12}|aws):policy/[\x21-\x7e]{1,1900}")
#: Characters a policy document may contain: tab, LF, CR, and U+0020 to U+00FF.
_POLICY_CHARS = re.compile(r"[\t\n\r\x20-\xff]*")
_STATEMENT_KEYS = frozenset(
    {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}
)


def _refuse(message: str, code: str, internal: str | None = None) -> InvalidRequest:
    return InvalidRequest(message, code=code, internal=internal)


# --- names ------------------------------------------------------------------------------------


def sanitize_name(value: str, *, prefix: str = "") -> str:
    """Fit ``prefix + value`` to STS's name alphabet (other characters become ``-``) and length."""
    cleaned = "".join(ch if _NAME_CHAR.fullmatch(ch) else "-" for ch in prefix + value)
    cleaned = cleaned[:NAME_MAX]
    if len(cleaned) < NAME_MIN:
        cleaned = cleaned.ljust(NAME_MIN, "-")
    return cleaned


def check_name(value: str, what: str) -> str:
    """Refuse a RoleSessionName or SourceIdentity STS would refuse."""
    if not _NAME.fullmatch(value):
        raise _refuse(
            f"the {what} must be 2 to 64 characters of letters, digits and +=,.@_-",
            code="sts_invalid_name",
        )
    return value


def role_session_name(credential_id: str, subject: str) -> str:
    """``<credential id>.<subject>``: CloudTrail shows it on every call the session makes."""
    return check_name(sanitize_name(f"{credential_id}.{subject}"), "role session name")


def source_identity(credential_id: str, subject: str) -> str:
    """``<credential id>.<subject>``: unique per credential, so the kill switch can deny one
    session (a lost mint) while another of the same task (its retry) keeps working; it survives
    role chaining and names the principal in CloudTrail."""
    value = sanitize_name(f"{credential_id}.{subject}")
    if value.lower().startswith("aws:"):
        # Cannot happen with a task id prefix (and ':' is outside the alphabet), but STS forbids
        # it, so the rule is stated here too.
        raise _refuse("a source identity cannot start with 'aws:'", code="sts_invalid_name")
    return check_name(value, "source identity")


def check_source_identity(value: str) -> str:
    if value.lower().startswith("aws:"):
        raise _refuse("a source identity cannot start with 'aws:'", code="sts_invalid_name")
    return check_name(value, "source identity")


def check_external_id(value: str | None) -> str | None:
    if value is None:
        return None
    if not _EXTERNAL_ID.fullmatch(value):
        raise _refuse(
            "the external id must be 2 to 1,224 characters of letters, digits and +=,.@:/_-",
            code="sts_invalid_external_id",
        )
    return value


# --- duration ---------------------------------------------------------------------------------


def duration(ttl: int, *, template_cap: int, role_max: int | None, chained: bool) -> int:
    """DurationSeconds for a task: its TTL, never above any cap, never below STS's minimum.

    Caps: the template's ``role_max_session``, the role's real MaxSessionDuration (when the broker
    could read it), one hour under role chaining, and twelve hours. A TTL below 900 s cannot be
    honoured (STS would issue a longer credential than the task may hold), so it is refused.
    """
    caps = [template_cap, MAX_DURATION]
    if role_max is not None:
        caps.append(role_max)
    if chained:
        caps.append(CHAINED_MAX_DURATION)
    cap = min(caps)
    if ttl < MIN_DURATION:
        raise Conflict(
            f"AWS STS credentials last at least {MIN_DURATION} s, but this task may hold one for "
            f"only {ttl} s; ask for a longer TTL or start a fresh session",
            code="ttl_below_backend_minimum",
        )
    if cap < MIN_DURATION:
        raise _refuse(
            "the role's maximum session is below STS's minimum", code="sts_invalid_duration"
        )
    return min(ttl, cap)


# --- session policy ---------------------------------------------------------------------------


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _check_statement(statement: Any) -> None:
    if not isinstance(statement, Mapping):
        raise _refuse("each policy statement must be an object", code="sts_invalid_policy")
    if "Principal" in statement or "NotPrincipal" in statement:
        raise _refuse("a session policy cannot name a principal", code="sts_invalid_policy")
    extra = set(statement) - _STATEMENT_KEYS
    if extra:
        raise _refuse(
            "a policy statement has unknown elements",
            code="sts_invalid_policy",
            internal=f"unknown elements {sorted(extra)}",
        )
    if statement.get("Effect") not in ("Allow", "Deny"):
        raise _refuse("each statement's Effect must be Allow or Deny", code="sts_invalid_policy")
    for one, other in (("Action", "NotAction"), ("Resource", "NotResource")):
        if (one in statement) == (other in statement):
            raise _refuse(
                f"each statement needs exactly one of {one} or {other}", code="sts_invalid_policy"
            )
    for key in ("Action", "NotAction", "Resource", "NotResource"):
        if key in statement:
            values = _as_list(statement[key])
            if not values or not all(isinstance(v, str) and v for v in values):
                raise _refuse(
                    f"each statement's {key} must be one or more non-empty strings",
                    code="sts_invalid_policy",
                )


def session_policy(document: Mapping[str, Any] | None) -> str | None:
    """The session policy as STS receives it (compact JSON), or a refusal STS would give.

    Checks: an object with ``Version`` and one or more ``Statement``; each statement an ``Allow``
    or ``Deny`` with an action and a resource element and no ``Principal`` (session policies
    cannot have one); only characters STS accepts; at most 2,048 characters.
    """
    if document is None:
        return None
    if not isinstance(document, Mapping):
        raise _refuse("the session policy must be a JSON object", code="sts_invalid_policy")
    unknown = set(document) - {"Version", "Id", "Statement"}
    if unknown:
        raise _refuse(
            "the session policy has unknown top-level elements",
            code="sts_invalid_policy",
            internal=f"unknown elements {sorted(unknown)}",
        )
    if document.get("Version") not in ("2012-10-17", "2008-10-17"):
        raise _refuse("the session policy needs Version 2012-10-17", code="sts_invalid_policy")
    statements = _as_list(document.get("Statement"))
    if not statements or statements == [None]:
        raise _refuse("the session policy has no statement", code="sts_invalid_policy")
    for statement in statements:
        _check_statement(statement)
    # The exact text sent: compact, non-ASCII escaped (as broker.scopes.render serialises it).
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True)
    if not _POLICY_CHARS.fullmatch(text):
        raise _refuse(
            "the session policy contains characters STS does not accept", code="sts_invalid_policy"
        )
    if len(text) > SESSION_POLICY_MAX_CHARS:
        raise _refuse(
            f"the session policy is {len(text)} characters; STS accepts at most "
            f"{SESSION_POLICY_MAX_CHARS}",
            code="sts_policy_too_large",
        )
    return text


def policy_arns(arns: Iterable[str]) -> list[dict[str, str]]:
    """Managed session policies: at most 10 well-formed ARNs."""
    values = list(arns)
    if len(values) > MAX_POLICY_ARNS:
        raise _refuse(
            f"at most {MAX_POLICY_ARNS} managed session policies may be passed",
            code="sts_too_many_policy_arns",
        )
    for arn in values:
        if not _POLICY_ARN.fullmatch(arn) or len(arn) > 2048:
            raise _refuse(
                "a managed session policy ARN is malformed", code="sts_invalid_policy_arn"
            )
    return [{"arn": a} for a in values]


def check_packed_policy_size(percent: int | None) -> bool:
    """True when the response's PackedPolicySize is close to the limit (worth a warning)."""
    return percent is not None and percent >= PACKED_POLICY_WARN


# --- tags -------------------------------------------------------------------------------------


def _tag_chars_ok(value: str) -> bool:
    """Letters, spaces and numbers in any script, plus ``_.:/=+-@`` (IAM's tag alphabet)."""
    for ch in value:
        if ch in "_.:/=+-@":
            continue
        category = unicodedata.category(ch)
        if category[0] in ("L", "N") or category == "Zs":
            continue
        return False
    return True


def sanitize_tag_value(value: str) -> str:
    """Fit a value (a subject, a scope) to the tag alphabet and length."""
    cleaned = "".join(ch if _tag_chars_ok(ch) else "-" for ch in value)
    return cleaned[:TAG_VALUE_MAX]


def session_tags(tags: Mapping[str, str]) -> list[dict[str, str]]:
    """Session tags as STS receives them: at most 50, keys 1 to 128 and values up to 256
    characters of the tag alphabet, no ``aws:`` prefix, keys unique ignoring case."""
    if len(tags) > MAX_TAGS:
        raise _refuse(f"at most {MAX_TAGS} session tags may be passed", code="sts_too_many_tags")
    seen: set[str] = set()
    out = []
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise _refuse("session tag keys and values must be strings", code="sts_invalid_tag")
        if not 1 <= len(key) <= TAG_KEY_MAX or len(value) > TAG_VALUE_MAX:
            raise _refuse(
                f"session tag keys are 1 to {TAG_KEY_MAX} characters, values at most {TAG_VALUE_MAX}",
                code="sts_invalid_tag",
            )
        if key.lower().startswith("aws:"):
            raise _refuse("session tag keys cannot start with 'aws:'", code="sts_invalid_tag")
        if not _tag_chars_ok(key) or not _tag_chars_ok(value):
            raise _refuse(
                "a session tag contains a character STS does not accept", code="sts_invalid_tag"
            )
        if key.lower() in seen:
            raise _refuse("session tag keys must be unique (ignoring case)", code="sts_invalid_tag")
        seen.add(key.lower())
        out.append({"Key": key, "Value": value})
    return out


def transitive_tag_keys(keys: Iterable[str], tags: Mapping[str, str]) -> list[str]:
    values = list(keys)
    if len(values) > MAX_TRANSITIVE_TAG_KEYS:
        raise _refuse("too many transitive tag keys", code="sts_invalid_tag")
    lower = {k.lower() for k in tags}
    if any(k.lower() not in lower for k in values):
        raise _refuse("a transitive tag key names no session tag", code="sts_invalid_tag")
    return values


# --- dates -------------------------------------------------------------------------------


def iso_utc(ts: float) -> str:
    """An IAM date (seconds, UTC)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
