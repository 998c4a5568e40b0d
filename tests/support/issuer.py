"""A test OIDC issuer: real keys, discovery and JWKS over real HTTP, tokens signed on demand."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import get_default_algorithms

#: A custom answer: status, headers, body.
Canned = tuple[int, dict[str, str], bytes]


@dataclass
class SigningKey:
    kid: str
    private: Any  # an EC (default), RSA or Ed25519 private key
    alg: str = "ES256"

    def jwk(self) -> dict[str, Any]:
        data = json.loads(get_default_algorithms()[self.alg].to_jwk(self.private.public_key()))
        data.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return data


def new_key(kid: str | None = None, alg: str = "ES256") -> SigningKey:
    """A fresh signing key: ES256 (P-256) by default, RS256/PS256 (RSA 2048) or EdDSA."""
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        curve = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}[alg]
        private = ec.generate_private_key(curve)
    return SigningKey(kid or uuid.uuid4().hex[:12], private, alg)


@dataclass
class TestIssuer:
    """Serves ``/.well-known/openid-configuration`` and ``/jwks``; counts every fetch.

    For hostile-issuer tests: ``responses`` replaces the answer for a path, ``hook`` may answer
    any request itself (return True when it did), ``extra_jwks`` adds raw JWKs to the key set,
    and ``discovery`` adds or overrides members of the discovery document.
    """

    __test__ = False  # not a test class

    audience: str = "broker"
    keys: list[SigningKey] = field(default_factory=lambda: [new_key()])
    down: bool = False
    fetches: dict[str, int] = field(default_factory=dict)
    responses: dict[str, Canned] = field(default_factory=dict)
    hook: Callable[[BaseHTTPRequestHandler], bool] | None = None
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    discovery: dict[str, Any] = field(default_factory=dict)
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
                if issuer.hook is not None and issuer.hook(self):
                    return
                if self.path in issuer.responses:
                    status, headers, raw = issuer.responses[self.path]
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body = {
                        "issuer": issuer.url,
                        "jwks_uri": f"{issuer.url}/jwks",
                        **issuer.discovery,
                    }
                elif self.path == "/jwks":
                    body = {"keys": [k.jwk() for k in issuer.keys] + issuer.extra_jwks}
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
        # A short poll interval keeps stop() quick: many tests start their own issuer.
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
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
            body, key.private, algorithm=key.alg, headers={"kid": key.kid, **(headers or {})}
        )

    def fetch_count(self, path: str = "/jwks") -> int:
        """How many times ``path`` was fetched so far."""
        return self.fetches.get(path, 0)

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": "test",
            "issuer": self.url,
            "audiences": [self.audience],
            "algorithms": ["ES256"],
            **overrides,
        }
