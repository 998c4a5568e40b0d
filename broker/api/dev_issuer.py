"""A development OIDC issuer for agents: discovery, JWKS and a token endpoint on loopback.

People sign in to the console through its sign-in page (:mod:`broker.api.dev_login`: the
authorization code flow with PKCE); agents and scripts get tokens from ``POST /token`` with JSON.

Only ``broker dev`` starts it; the broker refuses an issuer with ``preset: dev`` outside dev mode.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from jwt.algorithms import ECAlgorithm
from pydantic import BaseModel, Field, ValidationError

from broker.api import problems
from broker.api.dev_login import DevLogin, install_login, read_form
from broker.devkeys import key_id, load_or_create_ec_key
from broker.errors import Forbidden
from broker.settings import is_loopback_url


class TokenRequest(BaseModel):
    sub: str = Field(min_length=1, max_length=256)
    aud: str | list[str] = "broker"
    ttl: int = Field(default=600, ge=1, le=86_400)
    claims: dict[str, Any] = Field(default_factory=dict)


def create_dev_issuer_app(issuer_url: str, key_path: Path) -> FastAPI:
    """The dev issuer's app; its key lives in ``key_path`` (created on first start)."""
    key = load_or_create_ec_key(key_path, create=True)
    kid = key_id(key)
    public_jwk = json.loads(ECAlgorithm.to_jwk(key.public_key()))
    public_jwk.update({"kid": kid, "use": "sig", "alg": "ES256"})
    issuer = issuer_url.rstrip("/")

    app = FastAPI(title="broker dev issuer", docs_url=None, redoc_url=None)
    problems.install(app)

    @app.get("/.well-known/openid-configuration")
    def discovery() -> dict[str, Any]:
        return {
            "issuer": issuer,
            "jwks_uri": f"{issuer}/jwks",
            "token_endpoint": f"{issuer}/token",
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["code", "id_token"],
            "subject_types_supported": ["public"],
            "authorization_endpoint": f"{issuer}/authorize",
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", "profile", "email", "groups"],
        }

    @app.get("/jwks")
    def jwks() -> dict[str, Any]:
        return {"keys": [public_jwk]}

    def sign(claims: dict[str, Any], ttl: int) -> str:
        now = int(time.time())
        claims = {**claims, "iss": issuer, "iat": now, "nbf": now, "exp": now + ttl}
        claims["jti"] = uuid.uuid4().hex
        return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})

    login = DevLogin(issuer, sign)
    app.state.dev_login = login
    install_login(app, login)

    @app.post("/token")
    async def token(request: Request) -> JSONResponse:
        client = request.client.host if request.client else ""
        if not is_loopback_url(f"http://{client}/"):
            raise Forbidden("the dev issuer only serves loopback clients")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "application/x-www-form-urlencoded":
            form = await read_form(request)
            if form.get("grant_type") != "authorization_code":
                raise Forbidden("only grant_type=authorization_code", code="unsupported_grant_type")
            return JSONResponse(login.redeem(form), headers={"Cache-Control": "no-store"})
        try:
            body = TokenRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            raise RequestValidationError(exc.errors()) from None
        now = int(time.time())
        claims = {
            **body.claims,
            "iss": issuer,
            "sub": body.sub,
            "aud": body.aud,
            "iat": now,
            "nbf": now,
            "exp": now + body.ttl,
            "jti": uuid.uuid4().hex,
        }
        id_token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})
        return JSONResponse(
            {"id_token": id_token, "expires_in": body.ttl}, headers={"Cache-Control": "no-store"}
        )

    return app
