"""Errors as RFC 9457 ``application/problem+json``; nothing internal ever reaches the body."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.errors import BrokerError

log = logging.getLogger("broker.api")

PROBLEM = "application/problem+json"
_STATUS_CODES = {
    400: "invalid_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
}


def problem(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"https://broker.dev/problems/{code}",
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
        **extra,
    }
    if instance:
        body["instance"] = instance
    return JSONResponse(
        body,
        status_code=status,
        media_type=PROBLEM,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def broker_error_response(request: Request, exc: BrokerError) -> JSONResponse:
    if exc.internal:
        log.info("%s %s -> %s (%s)", request.method, request.url.path, exc.code, exc.internal)
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="broker"'
    extra = {
        k: v for k, v in exc.extra.items() if k not in {"type", "title", "status", "detail", "code"}
    }
    if request.url.path.startswith("/oauth2/"):
        # RFC 6749 section 5.2 members, alongside the problem members.
        extra.setdefault("error", _oauth_error(exc))
        extra.setdefault("error_description", exc.detail)
    return problem(
        exc.status,
        exc.code,
        exc.title,
        exc.detail,
        instance=request.url.path,
        headers=headers,
        **extra,
    )


def _oauth_error(exc: BrokerError) -> str:
    if exc.status == 401:
        return "invalid_grant"
    if exc.code in {"unsupported_grant_type", "unsupported_token_type", "invalid_target"}:
        return exc.code
    if exc.status >= 500:
        return "temporarily_unavailable" if exc.status == 503 else "server_error"
    return "invalid_request"


def install(app: FastAPI) -> None:
    """Route every error through problem+json."""

    @app.exception_handler(BrokerError)
    async def _broker(request: Request, exc: BrokerError) -> JSONResponse:
        return broker_error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"),
                "message": e.get("msg", ""),
            }
            for e in exc.errors()
        ]
        return problem(
            422,
            "validation_failed",
            "The request does not match its schema",
            "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors[:10]),
            instance=request.url.path,
            errors=errors[:50],
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _STATUS_CODES.get(exc.status_code, "error")
        detail = exc.detail if isinstance(exc.detail, str) else code
        return problem(
            exc.status_code,
            code,
            detail,
            detail,
            instance=request.url.path,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__
        )
        return problem(
            500,
            "internal_error",
            "Internal error",
            "the broker hit an unexpected error; nothing was issued",
            instance=request.url.path,
        )
