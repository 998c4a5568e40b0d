"""Broker-signed tokens: short-lived JWTs for internal services, no external service needed.

The broker signs with its own rotating key (:mod:`broker.keyring`, EdDSA or ES256). Services
verify locally against ``/.well-known/jwks.json`` or ask ``POST /oauth2/introspect`` (RFC 7662),
which also answers whether the task still holds the token: a revoked token is reported inactive
at once, while a service that only verifies signatures accepts it until ``exp``. Keep TTLs short.

Claims: ``iss`` (the broker's public URL), ``sub`` (the requesting principal), ``aud`` (the
template's audience), ``iat``/``nbf``/``exp``, ``jti`` (the credential id), ``scope``,
``broker_task``, ``broker_issuer`` (the principal's issuer), plus the template's rendered claims,
which may not override any of these.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jwt

from broker.backends.base import Minted, MintRequest, Revocation, RevokeRef
from broker.domain.scope import BrokerJwtBackend as BrokerJwtSpec
from broker.domain.scope import ScopeTemplate
from broker.errors import InvalidRequest
from broker.keyring import KeyRing
from broker.scopes.prerequisites import Requirement, requirements

#: Claims the broker owns; a template cannot set them.
RESERVED_CLAIMS = frozenset(
    {
        "iss",
        "sub",
        "aud",
        "exp",
        "iat",
        "nbf",
        "jti",
        "scope",
        "broker_task",
        "broker_issuer",
        "client_id",
    }
)
#: The JWT ``typ`` header: a JWT access token (RFC 9068 section 2.1).
TOKEN_TYPE = "at+jwt"  # noqa: S105  # a media type, not a secret


class BrokerJwtBackend:
    """Signs JWTs with the broker's key ring."""

    name = "broker_jwt"
    #: Revocation lives in the broker's record: introspection reports a revoked token inactive.
    revocation: Revocation = "record"

    def __init__(
        self, keyring: KeyRing, issuer: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.keyring = keyring
        self.issuer = issuer.rstrip("/")
        self.clock = clock

    def plan(self, request: MintRequest) -> dict[str, Any]:
        spec = request.spec
        if not isinstance(spec, BrokerJwtSpec):
            raise InvalidRequest(f"the broker_jwt backend cannot mint {type(spec).__name__}")
        clash = sorted(RESERVED_CLAIMS.intersection(spec.claims))
        if clash:
            raise InvalidRequest(
                "a scope's claims cannot override the broker's own claims",
                code="reserved_claim",
                internal=f"reserved claims {clash}",
            )
        return {"jti": request.credential_id, "audience": spec.audience}

    def mint(self, request: MintRequest) -> Minted:
        self.plan(request)
        spec: BrokerJwtSpec = request.spec
        key = self.keyring.current()
        now = int(self.clock())
        exp = now + request.ttl
        claims: dict[str, Any] = {
            **spec.claims,
            "iss": self.issuer,
            "sub": request.subject,
            "aud": spec.audience,
            "iat": now,
            "nbf": now,
            "exp": exp,
            "jti": request.credential_id,
            "client_id": request.cluster,
            "scope": request.scope,
            "broker_task": request.task_id,
            "broker_issuer": request.issuer,
        }
        token = jwt.encode(
            claims, key.private, algorithm=key.alg, headers={"kid": key.kid, "typ": TOKEN_TYPE}
        )
        return Minted(
            kind="broker_jwt",
            handle=request.credential_id,
            expires_at=float(exp),
            secret={"token": token},
            env={"BROKER_JWT": token},
            details={
                "jti": request.credential_id,
                "audience": spec.audience,
                "kid": key.kid,
                "ttl": request.ttl,
            },
        )

    def revoke(self, ref: RevokeRef) -> None:
        """Nothing to delete: the record's state makes introspection answer ``active: false``."""

    def health(self) -> None:
        self.keyring.current()

    def check(self, template: ScopeTemplate) -> list[Requirement]:
        """A broker-signed token needs only the broker's signing key."""
        try:
            key = self.keyring.current()
        except Exception as exc:  # a key file that cannot be read, whatever the reason
            return [
                r.checked("missing", f"no signing key ({type(exc).__name__})")
                for r in requirements(template)
            ]
        return [r.checked("ok", f"key {key.kid} ({key.alg})") for r in requirements(template)]

    def describe(self) -> dict[str, Any]:
        key = self.keyring.current()
        return {
            "backend": self.name,
            "issuer": self.issuer,
            "kinds": ["broker_jwt"],
            "algorithm": key.alg,
            "key_id": key.kid,
            "revocation": "introspection reports revoked tokens inactive; JWKS-only verifiers "
            "accept a token until it expires",
        }
