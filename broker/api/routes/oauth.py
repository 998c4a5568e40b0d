"""``POST /oauth2/token``: RFC 8693 token exchange of an ID token for a broker session.

Errors follow RFC 6749 section 5.2 as RFC 8693 section 2.2.2 asks: HTTP 400 with
``error=invalid_request`` for a bad request *and* for a subject token that is invalid or refused
by policy (``unsupported_grant_type`` and ``invalid_target`` where they apply). The body is a
problem document that also carries ``error`` and ``error_description``, and its ``code`` says
precisely why (``token_expired``, ``unknown_issuer``, ...). An issuer that cannot be reached is
a 503 with ``error=temporarily_unavailable`` and ``Retry-After``. Every refusal is audited.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from broker.api.deps import BrokerDep, TraceDep
from broker.api.models import TokenResponse
from broker.errors import AuthenticationFailed, InvalidRequest
from broker.services.common import TraceContext
from broker.wiring import Broker

router = APIRouter(tags=["sessions"])

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = {
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
}
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105  # a URN
MAX_FORM_BYTES = 64 * 1024


class SubjectTokenRefused(InvalidRequest):
    """A refused subject token, as RFC 8693 section 2.2.2 reports it: 400 ``invalid_request``."""

    title = "The subject token was refused"

    @classmethod
    def of(cls, exc: AuthenticationFailed) -> SubjectTokenRefused:
        return cls(
            exc.detail,
            code=exc.code,
            internal=exc.internal,
            extra={**exc.extra, "error": "invalid_request"},
        )


async def _read_form(request: Request) -> dict[str, str]:
    """The form's fields; each at most once, the body at most ``MAX_FORM_BYTES``."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the token exchange as application/x-www-form-urlencoded")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidRequest("the request body is too large")
    try:
        form = parse_qs(
            body.decode("utf-8"), keep_blank_values=False, strict_parsing=False, max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a valid form") from None
    fields = {}
    for key, values in form.items():
        if len(values) != 1:
            raise InvalidRequest(f"parameter {key[:40]!r} is repeated")
        fields[key] = values[0]
    return fields


def _check(fields: dict[str, str], broker: Broker) -> str:
    """The subject token, once the request is a token exchange the broker can serve."""
    if fields.get("grant_type") != GRANT_TYPE:
        raise InvalidRequest(f"grant_type must be {GRANT_TYPE}", code="unsupported_grant_type")
    if fields.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest(
            "subject_token_type must be the id_token or jwt token type",
            code="unsupported_token_type",
            extra={"error": "invalid_request"},
        )
    subject_token = fields.get("subject_token", "")
    if not subject_token:
        raise InvalidRequest("subject_token is required")
    if "actor_token" in fields or "actor_token_type" in fields:
        raise InvalidRequest("delegation (actor_token) is not supported")
    requested = fields.get("requested_token_type")
    if requested is not None and requested != ACCESS_TOKEN_TYPE:
        raise InvalidRequest(f"requested_token_type can only be {ACCESS_TOKEN_TYPE}")
    for target in ("audience", "resource"):
        if target in fields and fields[target] != broker.settings.public_url:
            raise InvalidRequest(
                f"this endpoint issues sessions for {broker.settings.public_url} only",
                code="invalid_target",
            )
    return subject_token


@router.post(
    "/oauth2/token",
    response_model=TokenResponse,
    openapi_extra={
        "requestBody": {
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "required": ["grant_type", "subject_token", "subject_token_type"],
                        "properties": {
                            "grant_type": {"type": "string", "enum": [GRANT_TYPE]},
                            "subject_token": {"type": "string"},
                            "subject_token_type": {
                                "type": "string",
                                "enum": sorted(SUBJECT_TOKEN_TYPES),
                            },
                            "requested_token_type": {
                                "type": "string",
                                "enum": [ACCESS_TOKEN_TYPE],
                            },
                            "audience": {"type": "string"},
                            "resource": {"type": "string"},
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def token_exchange(request: Request, broker: BrokerDep, trace: TraceDep) -> JSONResponse:
    """Exchange an OIDC ID token for an opaque, short-lived session token (RFC 8693)."""
    fields: dict[str, str] = {}
    try:
        fields = await _read_form(request)
        subject_token = _check(fields, broker)
    except InvalidRequest as exc:
        await _audit(broker, exc, fields.get("subject_token"), trace)
        raise
    try:
        issued = await run_in_threadpool(broker.sessions.exchange, subject_token, trace)
    except AuthenticationFailed as exc:  # already audited by the service
        raise SubjectTokenRefused.of(exc) from None
    expires_in = max(1, int(issued.session.expires_at - broker.clock()))
    return JSONResponse(
        TokenResponse(access_token=issued.token, expires_in=expires_in).model_dump(),
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


async def _audit(
    broker: Broker, exc: InvalidRequest, presented: str | None, trace: TraceContext | None
) -> None:
    def write() -> None:
        broker.sessions.audit_failure(
            exc, presented=presented, what="token_exchange", reason=exc.code, trace=trace
        )

    await run_in_threadpool(write)
