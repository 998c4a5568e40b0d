"""``POST /oauth2/token``: RFC 8693 token exchange of an ID token for a broker session.

Errors follow RFC 6749 section 5.2 as RFC 8693 section 2.2.2 asks: HTTP 400 with
``error=invalid_request`` for a bad request *and* for a subject token that is invalid or refused
by policy (``unsupported_grant_type`` and ``invalid_target`` where they apply). The body is a
problem document that also carries ``error`` and ``error_description``, and its ``code`` says
precisely why (``token_expired``, ``unknown_issuer``, ...). An issuer that cannot be reached is
a 503 with ``error=temporarily_unavailable`` and ``Retry-After``. Every refusal is audited.

``subject_token_type`` ``...:id_token`` presents an ID token; ``...:jwt`` and ``...:access_token``
present an access token, accepted only from an issuer configured for them (``access_tokens``).
The body is bounded before it is read (``http.max_body_token``, :mod:`broker.api.request_limits`);
parsing, verification and the audit run in the authentication pool, off the event loop.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep, TraceDep, client_address, run_auth_work
from broker.api.models import TokenResponse
from broker.errors import AuthenticationFailed, InvalidRequest
from broker.oidc.verifier import TokenKind
from broker.services.common import TraceContext
from broker.services.sessions import IssuedSession
from broker.wiring import Broker

router = APIRouter(tags=["sessions"])

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105  # a URN
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105  # a URN
#: What each accepted ``subject_token_type`` presents.
SUBJECT_TOKEN_TYPES: dict[str, TokenKind] = {
    ID_TOKEN_TYPE: "id_token",
    JWT_TYPE: "access_token",
    ACCESS_TOKEN_TYPE: "access_token",
}


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


def _parse_form(content_type: str, body: bytes) -> dict[str, str]:
    """The form's fields, each at most once (the body's size is already capped)."""
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the token exchange as application/x-www-form-urlencoded")
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


def _check(fields: dict[str, str], broker: Broker) -> tuple[str, TokenKind]:
    """The subject token and its kind, once the request is an exchange the broker can serve."""
    if fields.get("grant_type") != GRANT_TYPE:
        raise InvalidRequest(f"grant_type must be {GRANT_TYPE}", code="unsupported_grant_type")
    kind = SUBJECT_TOKEN_TYPES.get(fields.get("subject_token_type", ""))
    if kind is None:
        raise InvalidRequest(
            "subject_token_type must be the id_token type (or the jwt or access_token type, "
            "for an issuer whose access tokens the broker accepts)",
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
    return subject_token, kind


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
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()  # at most http.max_body_token: RequestLimits cut it off
    address = client_address(request)
    issued = await run_auth_work(
        request, lambda: _exchange(broker, content_type, body, trace, address)
    )
    expires_in = max(1, int(issued.session.expires_at - broker.clock()))
    return JSONResponse(
        TokenResponse(access_token=issued.token, expires_in=expires_in).model_dump(),
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )


def _exchange(
    broker: Broker,
    content_type: str,
    body: bytes,
    trace: TraceContext | None,
    address: str | None,
) -> IssuedSession:
    """Parse, check and perform the exchange (in the authentication pool); refusals audited."""
    sessions = broker.sessions
    sessions.admit(address, what="token_exchange", trace=trace)
    fields: dict[str, str] = {}
    try:
        fields = _parse_form(content_type, body)
        subject_token, kind = _check(fields, broker)
    except InvalidRequest as exc:
        sessions.audit_failure(
            exc,
            presented=fields.get("subject_token"),
            what="token_exchange",
            reason=exc.code,
            trace=trace,
            address=address,
        )
        raise
    try:
        return sessions.exchange(subject_token, trace, kind=kind, address=address)
    except AuthenticationFailed as exc:  # already audited by the service
        raise SubjectTokenRefused.of(exc) from None
