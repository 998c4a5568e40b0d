"""Strict parsing of compact JWS tokens and of the JSON documents issuers serve.

Parsing happens before anything is trusted, so it is written for hostile input: sizes are
checked before decoding, base64url must be canonical, JSON objects may not repeat a member
(``{"sub": "a", "sub": "b"}`` means different things to different parsers), ``NaN`` and
``Infinity`` are refused, nesting is bounded before the parser sees the text, and no string may
hold a NUL or a lone surrogate (neither survives a round trip through the store). Every failure
is a :class:`MalformedInput`; nothing here raises anything else for bad input.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any

#: The largest token the broker reads at all. Real ID tokens are 1 to 4 KiB.
MAX_TOKEN_BYTES = 16 * 1024
#: Deepest JSON nesting accepted in a token or an issuer document.
MAX_JSON_DEPTH = 16

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
#: A JSON string (possibly unterminated: the parser refuses that later). Possessive quantifiers
#: and an optional closing quote mean a match never backtracks, so removing strings is linear in
#: the text: ``"\\"\\"\\"...`` without a closing quote once cost a second per 12 KB token.
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"?', re.DOTALL)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]++")
_AS_PARENTHESES = str.maketrans("[{]}", "(())")


class MalformedInput(ValueError):
    """Input that is not what it claims to be; the message is for operators only."""


@dataclass(frozen=True, slots=True)
class CompactJws:
    """The three parts of a compact JWS, decoded but not verified."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url, refusing anything but its one canonical spelling."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise MalformedInput("not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise MalformedInput("not base64url") from None
    # Non-zero padding bits would let many strings decode to the same bytes.
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise MalformedInput("non-canonical base64url")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise MalformedInput(f"duplicate JSON member {key[:40]!r}")
        out[key] = value
    return out


def _refuse_constant(name: str) -> Any:
    raise MalformedInput(f"JSON constant {name} is not allowed")


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` before the (recursive) parser sees the text."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # the common case, counted in C
    # Strings removed, brackets as parentheses: each pass drops the innermost pairs, so what is
    # left after max_depth passes is nesting deeper than that (or brackets that never close,
    # which is no JSON either). Every step is a linear pass in C.
    skeleton = _NOT_BRACKETS.sub("", _JSON_STRING.sub("", text)).translate(_AS_PARENTHESES)
    for _ in range(max_depth):
        if not skeleton:
            return
        skeleton = skeleton.replace("()", "")
    if skeleton:
        raise MalformedInput(f"JSON nested deeper than {max_depth} (or not balanced)")


def _check_strings(value: Any) -> None:
    """Refuse NUL and lone surrogates anywhere (keys included); depth is already bounded."""
    if isinstance(value, str):
        if "\x00" in value:
            raise MalformedInput("NUL in a JSON string")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedInput("lone surrogate in a JSON string") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_strings(key)
            _check_strings(item)
    elif isinstance(value, list):
        for item in value:
            _check_strings(item)


def strict_json(data: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON strictly (see the module docstring)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedInput("not UTF-8") from None
    _check_depth(text, max_depth)
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
    except MalformedInput:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError, too many digits for an int
        raise MalformedInput("not valid JSON") from None
    # NUL and lone surrogates can only come from \u escapes (the text is UTF-8 and the parser
    # refuses raw control characters in strings): without one there is nothing to walk.
    if "\\u" in text:
        _check_strings(value)
    return value


def parse_compact(token: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> CompactJws:
    """Split and decode a compact JWS; refuse JWE, unsigned and oversized tokens early."""
    if len(token) > max_bytes:
        raise MalformedInput("oversized")
    if not token.isascii():
        raise MalformedInput("non-ASCII characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedInput(f"{len(parts)} segments, a compact JWS has 3")
    header_b64, payload_b64, signature_b64 = parts
    header = strict_json(b64url_decode(header_b64))
    claims = strict_json(b64url_decode(payload_b64))
    signature = b64url_decode(signature_b64)
    if not isinstance(header, dict):
        raise MalformedInput("the header is not a JSON object")
    if not isinstance(claims, dict):
        raise MalformedInput("the payload is not a JSON object")
    return CompactJws(
        header=header,
        claims=claims,
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        signature=signature,
    )
