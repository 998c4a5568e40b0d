"""Build tokens by hand (raw JSON, any header, any key) and control time, for the attack tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

from jwt.algorithms import get_default_algorithms

from tests.support.issuer import SigningKey, TestIssuer


class FakeTime:
    """Wall clock and monotonic clock that move only when a test says so."""

    def __init__(self) -> None:
        self.wall = float(int(time.time()))
        self.mono = 10_000.0

    def clock(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def b64(data: bytes | str | dict[str, Any]) -> str:
    if isinstance(data, dict):
        data = json.dumps(data)
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(
    header: dict[str, Any] | str,
    claims: dict[str, Any] | str,
    *,
    key: SigningKey | None = None,
    alg: str | None = None,
    secret: bytes | None = None,
) -> str:
    """A compact JWS built by hand: raw JSON text allowed, signed with ``key`` or an HMAC ``secret``."""
    head = b64(header if isinstance(header, str) else json.dumps(header))
    body = b64(claims if isinstance(claims, str) else json.dumps(claims))
    signing_input = f"{head}.{body}".encode()
    if secret is not None:
        # By hand: PyJWT itself refuses to use a public key as an HMAC secret.
        digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
        signature = hmac.new(secret, signing_input, digest[alg or "HS256"]).digest()
    elif key is not None:
        signature = get_default_algorithms()[alg or key.alg].sign(signing_input, key.private)
    else:
        signature = b""
    return f"{head}.{body}.{b64(signature)}"


def claims_for(idp: TestIssuer, now: float, /, **extra: Any) -> dict[str, Any]:
    """A valid claim set of ``idp`` at time ``now`` (``...`` as a value drops that claim)."""
    base: dict[str, Any] = {
        "iss": idp.url,
        "sub": "agent-1",
        "aud": idp.audience,
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 600,
        "jti": "jti-" + str(int(now * 1000)),
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not ...}
