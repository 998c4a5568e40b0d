"""Find and remove secrets from text and structured values before they are written anywhere.

The broker never means to log or record a secret; this is the net under that rule. It runs on
every audit event before it is hashed and stored, again on every exported span, and on every log
line (``broker.logs``). It recognises secrets two ways:

* by **shape**: JWTs, the broker's own session tokens, OpenBao/Vault tokens, GitHub tokens, AWS session tokens,
  PEM private keys, passwords in URLs, ``Authorization: Bearer ...`` values and ``key=value``
  pairs whose key names a secret;
* by **name**: in mappings, any value under a key that names a secret (``password``,
  ``client_token``, ``secret_access_key``, ...) is replaced whole.

Identifiers that are not secrets stay: token accessors, lease ids, AWS access key ids, SHA-256
hashes. Pure functions, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

REDACTED = "[REDACTED]"

#: Longest string kept in an audit attribute or log field; longer values are cut (and marked).
MAX_TEXT = 4096
#: Most list items and mapping members kept in one attribute value.
MAX_ITEMS = 256
#: Deepest nesting kept in one attribute value.
MAX_DEPTH = 8

# Each pattern is (name, regex, replacement). Replacements keep a recognisable prefix where it
# helps a reader (the key name, ``Bearer``) and never any part of the secret itself.
_PATTERNS: tuple[tuple[str, re.Pattern[str], str], ...] = (
    (
        "private_key",
        re.compile(
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
            re.DOTALL,
        ),
        "[REDACTED:private_key]",
    ),
    (
        # Three base64url segments, the first two JSON objects: a JWS/JWT (ID tokens, broker JWTs).
        "jwt",
        re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*"),
        "[REDACTED:jwt]",
    ),
    ("session_token", re.compile(r"\bbrk_sess_[A-Za-z0-9_-]{16,}"), "[REDACTED:session_token]"),
    (
        # HashiCorp Vault (hvs./hvb./hvr.) and OpenBao/legacy Vault (s./b./r.) tokens.
        "vault_token",
        re.compile(r"(?<![\w.])(?:hv[sbr]|[sbr])\.[A-Za-z0-9_-]{20,}"),
        "[REDACTED:vault_token]",
    ),
    (
        # GitHub tokens: installation (ghs_), user-to-server (ghu_), OAuth (gho_), personal
        # (ghp_, github_pat_), refresh (ghr_).
        "github_token",
        re.compile(r"\b(?:gh[psuor]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,})"),
        "[REDACTED:github_token]",
    ),
    (
        # STS session tokens start with these base64 prefixes (real AWS and moto alike).
        "aws_session_token",
        re.compile(r"\b(?:FwoGZXIvYXdz|FQoGZXIvYXdz|IQoJb3JpZ2lu)[A-Za-z0-9/+=]{16,}"),
        "[REDACTED:aws_session_token]",
    ),
    (
        "url_password",
        re.compile(r"(?P<keep>\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]+:)[^\s@/]+@"),
        r"\g<keep>[REDACTED]@",
    ),
    (
        "bearer",
        re.compile(r"(?P<keep>\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=-]{8,}", re.IGNORECASE),
        r"\g<keep>[REDACTED]",
    ),
    (
        # key=value / key: value / "key": "value" where the key names a secret.
        "named_secret",
        re.compile(
            r"(?P<keep>(?P<q>[\"']?)\b[\w.-]*(?:password|passwd|passphrase|secret|_token|"
            r"token_value|api[_-]?key|private[_-]?key|client[_-]?secret|access[_-]?token|"
            r"refresh[_-]?token|session[_-]?token|secret[_-]?access[_-]?key|secret[_-]?id)"
            r"(?P=q)\s*[:=]\s*)(?P<vq>[\"']?)(?!\[REDACTED)[^\s\"',;&}]{3,}(?P=vq)",
            re.IGNORECASE,
        ),
        r"\g<keep>\g<vq>[REDACTED]\g<vq>",
    ),
)

#: Mapping keys whose values are secrets whatever they look like (compared case-insensitively,
#: on the last dotted segment, with ``-`` read as ``_``).
SECRET_KEYS = frozenset(
    {
        "password",
        "passwd",
        "passphrase",
        "secret",
        "client_secret",
        "secret_key",
        "secret_access_key",
        "aws_secret_access_key",
        "secretaccesskey",
        "session_token",
        "sessiontoken",
        "aws_session_token",
        "token",
        "client_token",
        "access_token",
        "refresh_token",
        "id_token",
        "subject_token",
        "private_key",
        "privatekey",
        "authorization",
        "cookie",
        "set_cookie",
        "x_vault_token",
        "api_key",
        "apikey",
        "secret_id",
    }
)

#: Key endings that name a secret (``db_password``, ``github_token``, ``vault_secret``).
_SECRET_SUFFIXES = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "_token",
    "secret_key",
    "private_key",
    "api_key",
)

#: Keys that end like a secret name but hold something harmless (hashes, types, counts, ids).
_HARMLESS_SUFFIXES = ("_sha256", "_hash", "_type", "_ttl", "_id", "_count", "_prefix", "_accessor")


#: Keys that look like secret names but hold a one-way hash (GitHub's audit log field).
_HARMLESS_KEYS = frozenset({"hashed_token"})


def is_secret_key(key: str) -> bool:
    """True when a value stored under ``key`` must never be kept, whatever it looks like."""
    last = key.rsplit(".", 1)[-1].lower().replace("-", "_")
    if last in SECRET_KEYS:
        return True
    if last in _HARMLESS_KEYS:
        return False
    if last.endswith(_HARMLESS_SUFFIXES):
        return False
    return last.endswith(_SECRET_SUFFIXES)


def scrub_text(text: str, *, limit: int | None = MAX_TEXT) -> str:
    """``text`` with every secret-shaped part replaced, cut to ``limit`` characters."""
    for _name, pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "...[truncated]"
    return text


def secret_kinds(text: str) -> list[str]:
    """Which secret shapes occur in ``text`` (for tests and diagnostics; never the secrets)."""
    return [name for name, pattern, _ in _PATTERNS if pattern.search(text)]


def scrub_value(value: Any, *, key: str | None = None, depth: int = 0) -> Any:
    """A copy of ``value`` (JSON-like) with secrets removed, bounded in size and depth."""
    if key is not None and is_secret_key(key) and value not in (None, "", [], {}):
        return REDACTED
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return scrub_text(value)
    if depth >= MAX_DEPTH:
        return "[truncated: too deep]"
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):
        return _scrub_container(value, depth)
    return scrub_text(str(value))


def _scrub_container(value: Any, depth: int) -> Any:
    if not isinstance(value, Mapping):
        items = list(value)
        kept = [scrub_value(v, depth=depth + 1) for v in items[:MAX_ITEMS]]
        if len(items) > MAX_ITEMS:
            kept.append(f"[truncated: {len(items) - MAX_ITEMS} more]")
        return kept
    return _scrub_mapping(value, depth)


def _scrub_mapping(value: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (k, v) in enumerate(value.items()):
        if i >= MAX_ITEMS:
            out["..."] = f"[truncated: {len(value) - MAX_ITEMS} more]"
            break
        name = scrub_text(str(k), limit=256)
        out[name] = scrub_value(v, key=name, depth=depth + 1)
    return out
