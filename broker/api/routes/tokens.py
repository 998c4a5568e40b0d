"""Broker-signed tokens: the JWKS (``/.well-known/jwks.json``) and RFC 7662 introspection."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, SessionDep
from broker.errors import InvalidRequest, ServiceUnavailable

router = APIRouter(tags=["tokens"])

MAX_FORM_BYTES = 16 * 1024


@router.get("/.well-known/jwks.json")
async def jwks(broker: BrokerDep) -> JSONResponse:
    """The public keys of every broker-signed token that may still be valid (and the next key,
    published ahead of its first use). Private keys never leave their files."""
    if broker.keyring is None:
        raise ServiceUnavailable("the broker has no signing key", code="no_signing_key")
    body = await run_in_threadpool(broker.keyring.jwks)
    return JSONResponse(
        body,
        media_type="application/jwk-set+json",
        headers={"Cache-Control": "public, max-age=60"},
    )


@router.post(
    "/oauth2/introspect",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": ["token"],
                        "properties": {
                            "token": {"type": "string"},
                            "token_type_hint": {"type": "string"},
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def introspect(request: Request, broker: BrokerDep, session: SessionDep) -> JSONResponse:
    """RFC 7662: is this broker-signed token active, and for what? The caller authenticates with
    its own broker session (resource servers log in like any principal)."""
    if broker.introspector is None:
        raise ServiceUnavailable("introspection is not configured", code="no_signing_key")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the introspection request as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequest("the request body is too large")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=5)
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a valid form") from None
    tokens = form.get("token", [])
    if len(tokens) != 1 or not tokens[0]:
        raise InvalidRequest("exactly one token parameter is required")
    client = request.client.host if request.client else None
    answer: dict[str, Any] = await run_in_threadpool(
        broker.introspector.introspect, session, tokens[0], remote_address=client
    )
    return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})
