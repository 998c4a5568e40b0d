"""Identifiers and opaque secrets with recognisable prefixes."""

from __future__ import annotations

import hashlib
import hmac
import secrets

#: Session tokens start with this prefix so secret scanners can find leaked ones.
SESSION_TOKEN_PREFIX = "brk_sess_"  # noqa: S105  # a public prefix, not a secret


def new_id(prefix: str) -> str:
    """A random, URL-safe identifier such as ``tsk_3mJ0...`` (not a secret)."""
    return f"{prefix}_{secrets.token_urlsafe(12)}"


def new_session_token() -> str:
    """A fresh opaque session token (a secret: only its hash is ever stored)."""
    return SESSION_TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """SHA-256 of a token, hex: what the store and the audit log keep instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def same_secret(a: str, b: str) -> bool:
    """Compare two secrets (or their hashes) in constant time."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )
