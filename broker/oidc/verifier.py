"""Verify ID tokens from trusted issuers.

Steps, in order: (1) read the unverified ``iss`` only to look it up among configured issuers
(an unknown issuer is refused before anything is fetched); (2) verify the signature with a key
from that issuer's JWKS, chosen by ``kid``, with the issuer's algorithm allow-list; (3) verify
``iss``, ``aud``, ``exp``, ``nbf``, ``iat`` with the configured leeway; (4) map the claims to a
:class:`~broker.domain.principal.Principal`.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
from jwt import PyJWK

from broker.domain.principal import Principal
from broker.errors import AuthenticationFailed, ServiceUnavailable
from broker.settings import IssuerConfig

MAX_TOKEN_BYTES = 16 * 1024
MAX_DOCUMENT_BYTES = 512 * 1024


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    principal: Principal
    claims: dict[str, Any]
    issuer: IssuerConfig
    expires_at: float
    jti: str | None


def _refuse(reason: str, message: str, **extra: Any) -> AuthenticationFailed:
    return AuthenticationFailed(
        message, code="invalid_token", internal=reason, extra={"reason": reason, **extra}
    )


class JwksCache:
    """Keys of one issuer, fetched through discovery (or a configured ``jwks_uri``)."""

    def __init__(
        self, issuer: IssuerConfig, http: httpx.Client, *, refetch_cooldown: float = 5.0
    ) -> None:
        self.issuer = issuer
        self.http = http
        self.refetch_cooldown = refetch_cooldown
        self._keys: dict[str, PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = threading.Lock()
        self.fetch_count = 0

    def _get_json(self, url: str) -> dict[str, Any]:
        with self.http.stream("GET", url, follow_redirects=False) as response:
            if response.status_code != 200:
                raise ServiceUnavailable(
                    "the token issuer could not be reached",
                    code="issuer_unavailable",
                    internal=f"{url}: HTTP {response.status_code}",
                )
            body = b""
            for chunk in response.iter_bytes():
                body += chunk
                if len(body) > MAX_DOCUMENT_BYTES:
                    raise ServiceUnavailable(
                        "the token issuer sent an oversized document", code="issuer_unavailable"
                    )
        value = json.loads(body)
        if not isinstance(value, dict):
            raise ServiceUnavailable(
                "the token issuer sent an invalid document", code="issuer_unavailable"
            )
        return value

    def _jwks_uri(self) -> str:
        if self.issuer.jwks_uri:
            return self.issuer.jwks_uri
        doc = self._get_json(self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if doc.get("issuer") != self.issuer.issuer:
            raise ServiceUnavailable(
                "the issuer's discovery document names another issuer", code="issuer_mismatch"
            )
        uri = doc.get("jwks_uri")
        if not isinstance(uri, str):
            raise ServiceUnavailable(
                "the issuer's discovery document has no jwks_uri", code="issuer_unavailable"
            )
        return uri

    def _fetch(self) -> None:
        try:
            jwks = self._get_json(self._jwks_uri())
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                "the token issuer could not be reached",
                code="issuer_unavailable",
                internal=repr(exc),
            ) from None
        keys: dict[str, PyJWK] = {}
        for data in jwks.get("keys", []):
            if not isinstance(data, dict) or data.get("use", "sig") != "sig":
                continue
            try:
                key = PyJWK(data)
            except jwt.PyJWTError:
                continue  # keys of types we do not support are skipped, not fatal
            keys[str(data.get("kid", ""))] = key
        self._keys = keys
        self._fetched_at = time.monotonic()
        self.fetch_count += 1

    def key(self, kid: str) -> PyJWK:
        if kid in self._keys:
            return self._keys[kid]
        with self._lock:
            if (
                kid not in self._keys
                and time.monotonic() - self._fetched_at >= self.refetch_cooldown
            ):
                self._fetch()
        if kid not in self._keys:
            raise _refuse("unknown_kid", "the token was signed with an unknown key")
        return self._keys[kid]


class TokenVerifier:
    """Verifies ID tokens of the configured issuers."""

    def __init__(self, issuers: list[IssuerConfig], http: httpx.Client) -> None:
        self.issuers = {i.issuer: i for i in issuers}
        self.jwks = {i.issuer: JwksCache(i, http) for i in issuers}

    def verify(self, token: str) -> VerifiedToken:
        if len(token) > MAX_TOKEN_BYTES:
            raise _refuse("oversized", "the token is too large")
        # Step 1: the unverified issuer only selects among configured issuers.
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise _refuse("malformed", "the token is not a well-formed JWT") from None
        issuer = self.issuers.get(str(unverified.get("iss", "")))
        if issuer is None:
            raise _refuse("unknown_issuer", "the token's issuer is not trusted")
        alg = header.get("alg")
        if alg not in issuer.algorithms:
            raise _refuse(
                "algorithm_not_allowed", "the token's algorithm is not allowed for its issuer"
            )
        # Step 2: signature, with a key of that issuer only.
        key = self.jwks[issuer.issuer].key(str(header.get("kid", "")))
        # Step 3: claims.
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=issuer.audiences,
                issuer=issuer.issuer,
                leeway=issuer.leeway,
                options={"require": ["iss", "sub", "aud", "exp", "iat"]},
            )
        except jwt.ExpiredSignatureError:
            raise _refuse("expired", "the token has expired") from None
        except jwt.InvalidAudienceError:
            raise _refuse("audience", "the token is not meant for this broker") from None
        except jwt.PyJWTError as exc:
            raise _refuse(
                "invalid", "the token could not be verified", detail=type(exc).__name__
            ) from None
        # Step 4: the principal.
        mapping = issuer.claims
        subject = claims.get(mapping.subject)
        if not isinstance(subject, str) or not subject:
            raise _refuse("no_subject", "the token names no subject")
        groups = claims.get(mapping.groups) if mapping.groups else None
        principal = Principal(
            issuer=issuer.issuer,
            subject=subject,
            display_name=str(claims.get(mapping.display_name))
            if mapping.display_name and claims.get(mapping.display_name)
            else None,
            groups=tuple(str(g) for g in groups) if isinstance(groups, list) else (),
            roles=frozenset(issuer.roles),
            claims=claims,
        )
        return VerifiedToken(principal, claims, issuer, float(claims["exp"]), claims.get("jti"))
