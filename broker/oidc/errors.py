"""Why a token was refused: stable reason codes, public messages, and audit context kept apart.

Each refusal is a :class:`TokenRefused` whose ``code`` is one of :data:`REASONS`. Its public
``detail`` says what failed, never the expected value, pattern or policy. What the audit record
needs (the issuer, the subject once the signature is verified, what the token *claimed* before
that) rides on attributes that never reach a response body.

An issuer that cannot be reached is not the caller's fault: :class:`IssuerUnavailable` is a 503.
"""

from __future__ import annotations

from typing import Any

from broker.errors import AuthenticationFailed, ServiceUnavailable

#: Every reason a token can be refused for, with its public message.
REASONS: dict[str, str] = {
    "token_too_large": "the token is larger than the broker accepts",
    "malformed_token": "the token is not a well-formed signed JWT",
    "unknown_issuer": "the token's issuer is not trusted by this broker",
    "algorithm_not_allowed": "the token's signing algorithm is not accepted for its issuer",
    "unsupported_critical_header": "the token requires a header extension the broker does not support",
    "unknown_key": "the token was signed with a key its issuer does not publish",
    "invalid_signature": "the token's signature is not valid",
    "invalid_claim": "a claim of the token has the wrong type or value",
    "missing_claim": "the token lacks a claim its issuer must provide",
    "audience_mismatch": "the token is not meant for this broker",
    "token_expired": "the token has expired",
    "token_not_yet_valid": "the token is not valid yet",
    "token_too_old": "the token was issued too long ago",
    "token_lifetime_too_long": "the token's lifetime exceeds what the broker accepts",
    "untrusted_token": "the token's claims do not satisfy its issuer's trust rules",
    "token_replayed": "this token was already used",
    "wrong_token_type": "the token's type (its typ header) is not the subject_token_type sent",
    "access_token_not_accepted": "the token's issuer is not configured to accept access tokens",
    "unauthorized_party": "the token was issued to a client this broker does not accept",
    # Console sign-in (broker.api.console): the token must answer this browser's sign-in.
    "nonce_mismatch": "the token does not answer this sign-in",
    "unexpected_issuer": "the token's issuer is not the one people sign in with here",
}


class TokenRefused(AuthenticationFailed):
    """A presented ID token the broker will not accept.

    ``issuer`` is the configured issuer the token named (when it named one), ``subject`` is set
    only once the signature has been verified; ``claimed`` holds unverified values for forensics.
    """

    def __init__(
        self,
        reason: str,
        *,
        issuer: str | None = None,
        subject: str | None = None,
        claimed: dict[str, str] | None = None,
        internal: str | None = None,
        claim: str | None = None,
    ) -> None:
        if reason not in REASONS:  # a programming error, caught by the tests
            raise ValueError(f"unknown refusal reason {reason!r}")
        extra: dict[str, Any] = {"claim": claim} if claim else {}
        super().__init__(REASONS[reason], code=reason, internal=internal, extra=extra)
        self.reason = reason
        self.issuer = issuer
        self.subject = subject
        self.claimed = claimed or {}


class IssuerUnavailable(ServiceUnavailable):
    """The issuer's discovery document or keys could not be fetched (and no usable keys remain)."""

    code = "issuer_unavailable"
    title = "The token's issuer cannot be reached"

    def __init__(self, issuer: str, *, internal: str | None = None, retry_after: int = 5) -> None:
        super().__init__(
            "the token's issuer cannot be reached to verify the token; try again shortly",
            internal=internal,
        )
        self.issuer = issuer
        self.reason = "issuer_unavailable"
        self.retry_after = retry_after
