"""A test OIDC issuer: real keys, discovery and JWKS over real HTTP, tokens signed on demand."""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm


@dataclass
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey

    def jwk(self) -> dict[str, Any]:
        data = json.loads(ECAlgorithm.to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "use": "sig", "alg": "ES256"})
        return data


def new_key(kid: str | None = None) -> SigningKey:
    return SigningKey(kid or uuid.uuid4().hex[:12], ec.generate_private_key(ec.SECP256R1()))


@dataclass
class TestIssuer:
    """Serves ``/.well-known/openid-configuration`` and ``/jwks``; counts every fetch."""

    __test__ = False  # not a test class

    audience: str = "broker"
    keys: list[SigningKey] = field(default_factory=lambda: [new_key()])
    down: bool = False
    fetches: dict[str, int] = field(default_factory=dict)
    _server: ThreadingHTTPServer | None = None

    def start(self) -> TestIssuer:
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                issuer.fetches[self.path] = issuer.fetches.get(self.path, 0) + 1
                if issuer.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}/jwks"}
                elif self.path == "/jwks":
                    body = {"keys": [k.jwk() for k in issuer.keys]}
                else:
                    self.send_response(404)
                    self.end_headers()
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def token(
        self,
        sub: str = "agent-1",
        *,
        key: SigningKey | None = None,
        ttl: int = 600,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        key = key or self.keys[0]
        now = int(time.time())
        body = {
            "iss": self.url,
            "sub": sub,
            "aud": self.audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(
            body, key.private, algorithm="ES256", headers={"kid": key.kid, **(headers or {})}
        )

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": "test",
            "issuer": self.url,
            "audiences": [self.audience],
            "algorithms": ["ES256"],
            **overrides,
        }
