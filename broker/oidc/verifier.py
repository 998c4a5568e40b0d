"""Verify ID tokens from trusted issuers, in numbered steps.

1. Parse strictly (:mod:`broker.oidc.jose`): size, shape, canonical base64url, strict JSON.
2. Read the unverified ``iss`` only to look it up, as an exact string, among the configured
   issuers. An unknown issuer is refused here, before anything is fetched.
3. Check the header: ``alg`` on the issuer's allow-list (asymmetric only, so never ``none`` or
   HMAC), no ``crit`` (the broker implements no JWS extension), a sane ``kid``, and a ``typ``
   fitting the kind of token presented: an ID token is untyped or ``JWT``, never ``at+jwt``
   (RFC 9068) or any other explicit type; an access token is accepted only from an issuer
   configured for them (``access_tokens``). The headers that name keys or key locations
   (``jku``, ``x5u``, ``jwk``, ``x5c``) are never read.
4. Find the key among the issuer's own published keys (:class:`~broker.oidc.jwks.JwksCache`),
   by ``kid`` and fitting the algorithm, and verify the signature (at most
   :data:`MAX_SIGNATURE_CHECKS` keys are tried, whatever the key set holds).
5. Verify the claims: ``exp``, ``nbf``, ``iat`` as finite numbers within the leeway, the token's
   lifetime and age, ``aud`` naming this broker and nothing else (the ID token audiences or the
   access token audiences, by kind), ``azp``/``client_id`` when the issuer names its clients,
   the subject, required claims, and a ``jti`` when the issuer wants one-time tokens.

Every step runs in time linear in the token's size, which is capped first.
6. Apply the issuer's trust rules (enforced, or recorded in audit mode).
7. Map the claims to a :class:`~broker.domain.principal.Principal` with its roles.

Every refusal is a :class:`~broker.oidc.errors.TokenRefused` with a stable reason; an issuer
that cannot be reached is :class:`~broker.oidc.errors.IssuerUnavailable`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import httpx

from broker.domain.conditions import claim_value
from broker.domain.principal import Principal
from broker.oidc.errors import TokenRefused
from broker.oidc.jose import MAX_TOKEN_BYTES, MalformedInput, parse_compact
from broker.oidc.jwks import JwksCache, key_source_for
from broker.oidc.trust import TrustDecision, evaluate_trust, principal_of, subject_of
from broker.settings import IssuerConfig

MAX_KID = 256
MAX_JTI = 256
MAX_AUDIENCES = 16
#: Signature checks one token may cost, however many published keys share its ``kid``.
MAX_SIGNATURE_CHECKS = 2
_MISSING = object()

#: What the caller says it presents (``subject_token_type``).
TokenKind = Literal["id_token", "access_token"]
#: ``typ`` values of an ordinary (untyped) JWT; anything else is an explicitly typed token.
_PLAIN_TYPES = frozenset({"jwt"})
_ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105  # a media type


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check, and what it established."""

    principal: Principal
    claims: dict[str, Any]
    issuer: IssuerConfig
    expires_at: float
    jti: str | None
    trust: TrustDecision
    kind: TokenKind = "id_token"


def _claimed(value: Any) -> str:
    """An unverified claim, shortened and made printable for the audit record."""
    text = value if isinstance(value, str) else repr(value)
    return "".join(c if c.isprintable() else "?" for c in text[:256])


def _present(value: Any) -> bool:
    """A claim is present when it holds a JSON value other than null."""
    return value is not None and isinstance(value, (str, int, float, bool, list, dict))


def _number(claims: dict[str, Any], name: str, issuer: str, *, required: bool) -> float | None:
    value = claims.get(name, _MISSING)
    if value is _MISSING or value is None:
        if required:
            raise TokenRefused("missing_claim", issuer=issuer, claim=name)
        return None
    # bool is an int in Python; 1e400 parses as inf; both are nonsense here. Integers are kept as
    # they are (a 400-digit exp compares fine, it would only overflow a float).
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenRefused("invalid_claim", issuer=issuer, claim=name)
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenRefused("invalid_claim", issuer=issuer, claim=name)
    if value < 0:
        raise TokenRefused("invalid_claim", issuer=issuer, claim=name)
    return value


class TokenVerifier:
    """Verifies ID tokens of the configured issuers (and fetches keys of those issuers only)."""

    def __init__(
        self,
        issuers: list[IssuerConfig],
        http: httpx.Client,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        allow_http_loopback: bool = False,
    ) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.clock = clock
        self.jwks = {
            i.issuer: JwksCache(
                i,
                key_source_for(
                    i, http, allow_http_loopback=allow_http_loopback, monotonic=monotonic
                ),
                monotonic=monotonic,
            )
            for i in issuers
        }

    def verify(self, token: str, kind: TokenKind = "id_token") -> VerifiedToken:
        """Verify ``token`` as a ``kind`` or raise ``TokenRefused`` / ``IssuerUnavailable``."""
        # Step 1: parse.
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRefused("token_too_large")
        try:
            jws = parse_compact(token)
        except MalformedInput as exc:
            raise TokenRefused("malformed_token", internal=str(exc)) from None
        header, claims = jws.header, jws.claims
        claimed = {"iss": _claimed(claims.get("iss")), "sub": _claimed(claims.get("sub"))}

        # Step 2: the issuer, by exact string.
        iss = claims.get("iss")
        issuer = self.issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise TokenRefused("unknown_issuer", claimed=claimed)
        name = issuer.issuer

        # Step 3: the header.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise TokenRefused(
                "algorithm_not_allowed", issuer=name, claimed=claimed, internal=_claimed(alg)
            )
        if "crit" in header:
            raise TokenRefused(
                "unsupported_critical_header",
                issuer=name,
                claimed=claimed,
                internal=_claimed(header["crit"]),
            )
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid or len(kid) > MAX_KID):
            raise TokenRefused("malformed_token", issuer=name, claimed=claimed, internal="bad kid")
        _check_type(issuer, header.get("typ"), kind, claimed)

        # Step 4: the key and the signature.
        keys = self.jwks[name].keys_for(kid, alg)
        if not keys:
            raise TokenRefused(
                "unknown_key", issuer=name, claimed=claimed, internal=f"kid {_claimed(kid)}"
            )
        if not any(
            k.verify(alg, jws.signing_input, jws.signature) for k in keys[:MAX_SIGNATURE_CHECKS]
        ):
            raise TokenRefused("invalid_signature", issuer=name, claimed=claimed)

        # From here on the claims are the issuer's word.
        subject = subject_of(issuer, claims)
        expires_at = self._check_claims(issuer, claims, subject, kind)
        assert subject is not None  # _check_claims refuses a token without one

        # Step 6: trust rules.
        trust = evaluate_trust(issuer, claims)
        if not trust.admitted:
            raise TokenRefused(
                "untrusted_token", issuer=name, subject=subject, internal=trust.verdict.reason
            )

        # Step 7: the principal.
        jti = claims.get("jti")
        return VerifiedToken(
            principal=principal_of(issuer, subject, claims),
            claims=claims,
            issuer=issuer,
            expires_at=expires_at,
            jti=jti if isinstance(jti, str) else None,
            trust=trust,
            kind=kind,
        )

    def _check_claims(
        self, issuer: IssuerConfig, claims: dict[str, Any], subject: str | None, kind: TokenKind
    ) -> float:
        """Step 5; returns ``exp`` as a float once it is known to be sane."""
        exp = self._check_times(issuer, claims, subject)
        _check_audience(issuer, claims, subject, kind)
        _check_party(issuer, claims, subject, kind)

        def refuse(reason: str, claim: str) -> NoReturn:
            raise TokenRefused(reason, issuer=issuer.issuer, subject=subject, claim=claim)

        if subject is None:
            present = _present(claim_value(claims, issuer.claims.subject))
            refuse("invalid_claim" if present else "missing_claim", issuer.claims.subject)
        for required in issuer.required_claims:
            if not _present(claim_value(claims, required)):
                refuse("missing_claim", required)
        jti = claims.get("jti")
        if jti is not None and (not isinstance(jti, str) or not jti or len(jti) > MAX_JTI):
            refuse("invalid_claim", "jti")
        if issuer.require_jti and jti is None:
            refuse("missing_claim", "jti")
        return exp

    def _check_times(
        self, issuer: IssuerConfig, claims: dict[str, Any], subject: str | None
    ) -> float:
        """``exp``, ``nbf`` and ``iat`` against the clock, with the issuer's leeway."""
        name, now, leeway = issuer.issuer, self.clock(), issuer.leeway

        def refuse(reason: str, claim: str | None = None, internal: str | None = None) -> NoReturn:
            raise TokenRefused(reason, issuer=name, subject=subject, claim=claim, internal=internal)

        exp = _number(claims, "exp", name, required=True)
        iat = _number(claims, "iat", name, required=True)
        nbf = _number(claims, "nbf", name, required=False)
        assert exp is not None
        assert iat is not None
        if exp <= now - leeway:
            refuse("token_expired")
        if exp > now + issuer.max_token_lifetime:
            refuse("token_lifetime_too_long", internal=f"exp {str(exp)[:40]} is far ahead")
        if nbf is not None and nbf > now + leeway:
            refuse("token_not_yet_valid", "nbf")
        if iat > now + leeway:
            refuse("token_not_yet_valid", "iat")
        if exp < iat:
            refuse("invalid_claim", "exp", "exp before iat")
        if issuer.max_token_age is not None and now - iat > issuer.max_token_age + leeway:
            refuse("token_too_old")
        return float(exp)


def _check_type(issuer: IssuerConfig, typ: Any, kind: TokenKind, claimed: dict[str, str]) -> None:
    """The ``typ`` header must fit the kind presented (RFC 8725 3.11 explicit typing).

    ``typ`` is a media type: case-insensitive, ``application/`` may be left out (RFC 7515
    4.1.9). An ID token is untyped or ``JWT``; ``at+jwt`` is an access token (RFC 9068) and any
    other explicit type (``logout+jwt``, ``secevent+jwt``, ...) is some other token again.
    """

    def refuse(reason: str) -> NoReturn:
        raise TokenRefused(
            reason, issuer=issuer.issuer, claimed=claimed, internal=f"typ {_claimed(typ)}"
        )

    if typ is None:
        media = None
    elif not isinstance(typ, str) or len(typ) > 64:
        refuse("malformed_token")
    else:
        media = typ.strip().lower().removeprefix("application/")
    if kind == "id_token":
        if media is not None and media not in _PLAIN_TYPES:
            refuse("wrong_token_type")
        return
    config = issuer.access_tokens
    if config is None:
        refuse("access_token_not_accepted")
    if media == _ACCESS_TOKEN_TYPE:
        return
    if config.require_typ or (media is not None and media not in _PLAIN_TYPES):
        refuse("wrong_token_type")


def _check_party(
    issuer: IssuerConfig, claims: dict[str, Any], subject: str | None, kind: TokenKind
) -> None:
    """``azp`` (and an access token's ``client_id``) against the clients the issuer names."""

    def refuse(reason: str, claim: str) -> NoReturn:
        raise TokenRefused(reason, issuer=issuer.issuer, subject=subject, claim=claim)

    if kind == "access_token":
        assert issuer.access_tokens is not None  # _check_type refused it otherwise
        allowed, name = issuer.access_tokens.clients, "client_id"
        if "client_id" not in claims and "azp" in claims:
            name = "azp"
        if allowed and claims.get(name) is None:
            refuse("missing_claim", name)
    else:
        allowed, name = issuer.authorized_parties, "azp"
    value = claims.get(name)
    if value is None or not allowed:
        return
    if not isinstance(value, str):
        refuse("invalid_claim", name)
    if value not in allowed:
        refuse("unauthorized_party", name)


def _check_audience(
    issuer: IssuerConfig, claims: dict[str, Any], subject: str | None, kind: TokenKind
) -> None:
    """``aud`` must name this broker, and only audiences this broker answers to."""

    def refuse(reason: str, claim: str | None = None) -> NoReturn:
        raise TokenRefused(reason, issuer=issuer.issuer, subject=subject, claim=claim)

    aud = claims.get("aud")
    if aud is None:
        refuse("missing_claim", "aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(audiences, list)
        or not audiences
        or len(audiences) > MAX_AUDIENCES
        or not all(isinstance(a, str) for a in audiences)
    ):
        refuse("invalid_claim", "aud")
    # Every audience must be ours: a token also meant for another service could be replayed
    # by that service to us (OpenID Connect Core 3.1.3.7, step 3).
    ours = issuer.audiences
    if kind == "access_token":
        assert issuer.access_tokens is not None  # _check_type refused it otherwise
        ours = issuer.access_tokens.audiences
    if not set(audiences) <= set(ours):
        refuse("audience_mismatch")
