"""RFC 7662 token introspection of broker-signed JWTs.

A token is active when, in this order: its header names a key the broker published and an
algorithm of the ring (``EdDSA``/``ES256``); the signature verifies; ``iss`` is this broker,
``exp``/``nbf``/``iat`` hold; and the credential it names (``jti``) is ``active`` in the store
(so a token of a completed, expired or killed task is inactive at once, although it would still
verify against the JWKS until ``exp``). Anything else is ``{"active": false}`` and nothing more,
as the RFC asks. Each introspection of a broker credential is a ``broker.credential.use`` event
in the task's trace.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import jwt

from broker.backends.broker_jwt import TOKEN_TYPE
from broker.domain.records import Session
from broker.domain.task import CredentialState
from broker.keyring import KeyRing, algorithm_of
from broker.services.common import Clock
from broker.store import Database, repo

log = logging.getLogger(__name__)

ALGORITHMS = ("EdDSA", "ES256")
MAX_TOKEN = 8192
INACTIVE: dict[str, Any] = {"active": False}
#: Clock leeway for ``nbf``/``iat`` (not for ``exp``: an expired token is inactive).
LEEWAY = 5


class IntrospectionRecorder(Protocol):
    """Where introspections are recorded as uses (``broker.audit.uses.UseRecorder``)."""

    def record_introspection(
        self, jti: str, *, active: bool, client: str | None = ..., remote_address: str | None = ...
    ) -> object: ...


class Introspector:
    """Answers whether a broker-signed token is active, and for what."""

    def __init__(
        self,
        issuer: str,
        db: Database,
        keyring: KeyRing,
        clock: Clock,
        uses: IntrospectionRecorder | None = None,
    ) -> None:
        self.issuer = issuer.rstrip("/")
        self.db = db
        self.keyring = keyring
        self.clock = clock
        self.uses = uses

    def introspect(
        self, caller: Session, token: str, *, remote_address: str | None = None
    ) -> dict[str, Any]:
        claims = self._verify(token)
        if claims is None:
            return dict(INACTIVE)
        jti = str(claims["jti"])
        now = self.clock()
        with self.db.read() as conn:
            cred = repo.get_credential(conn, jti)
        active = (
            cred is not None
            and cred.backend == "broker_jwt"
            and cred.state is CredentialState.ACTIVE
            and (cred.expires_at is None or now < cred.expires_at)
        )
        if self.uses is not None:
            # A use in the task's trace (or an unmatched-use report): who asked, active or not.
            self.uses.record_introspection(
                jti,
                active=active,
                client=f"{caller.principal.issuer}#{caller.principal.subject}",
                remote_address=remote_address,
            )
        if not active:
            return dict(INACTIVE)
        answer: dict[str, Any] = {
            "active": True,
            "token_type": "Bearer",
            "scope": claims.get("scope"),
            "client_id": claims.get("client_id"),
            "sub": claims["sub"],
            "aud": claims["aud"],
            "iss": claims["iss"],
            "exp": claims["exp"],
            "iat": claims["iat"],
            "nbf": claims.get("nbf"),
            "jti": jti,
            "broker_task": claims.get("broker_task"),
            "broker_issuer": claims.get("broker_issuer"),
        }
        return {k: v for k, v in answer.items() if v is not None}

    def _key_for(self, token: str) -> tuple[Any, str] | None:
        """The published key and algorithm a token's header names, if acceptable."""
        if not token or len(token) > MAX_TOKEN or token.count(".") != 2:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS or not isinstance(kid, str) or header.get("typ") != TOKEN_TYPE:
            return None
        key = self.keyring.public_key(kid)
        if key is None or algorithm_of(key) != alg:
            return None
        return key, str(alg)

    def _verify(self, token: str) -> dict[str, Any] | None:
        """The token's claims if it is a valid, unexpired broker token, else None."""
        found = self._key_for(token)
        if found is None:
            return None
        key, alg = found
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                issuer=self.issuer,
                leeway=LEEWAY,
                options={
                    "require": ["iss", "sub", "aud", "exp", "iat", "jti"],
                    # The audience is the resource server's business; it is reported, not judged.
                    "verify_aud": False,
                },
            )
        except jwt.PyJWTError:
            return None
        if float(claims["exp"]) <= self.clock():
            return None  # no leeway on expiry
        return claims
