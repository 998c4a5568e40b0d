"""``POST /oauth2/token``: RFC 8693 token exchange of an ID token for a broker session."""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from broker.api.deps import BrokerDep, TraceDep
from broker.api.models import TokenResponse
from broker.errors import InvalidRequest

router = APIRouter(tags=["sessions"])

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
SUBJECT_TOKEN_TYPES = {
    "urn:ietf:params:oauth:token-type:id_token",
    "urn:ietf:params:oauth:token-type:jwt",
}
MAX_FORM_BYTES = 64 * 1024


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
                        },
                    }
                }
            },
            "required": True,
        }
    },
)
async def token_exchange(request: Request, broker: BrokerDep, trace: TraceDep) -> JSONResponse:
    """Exchange an OIDC ID token for an opaque, short-lived session token."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/x-www-form-urlencoded":
        raise InvalidRequest("send the token exchange as application/x-www-form-urlencoded")
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidRequest("the request body is too large")
    try:
        form = parse_qs(
            body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=20
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequest("the request body is not a valid form") from None
    fields = {}
    for key, values in form.items():
        if len(values) != 1:
            raise InvalidRequest(f"parameter {key!r} is repeated")
        fields[key] = values[0]
    if fields.get("grant_type") != GRANT_TYPE:
        raise InvalidRequest(f"grant_type must be {GRANT_TYPE}", code="unsupported_grant_type")
    if fields.get("subject_token_type") not in SUBJECT_TOKEN_TYPES:
        raise InvalidRequest(
            "subject_token_type must be an id_token or jwt token type",
            code="unsupported_token_type",
        )
    subject_token = fields.get("subject_token", "")
    if not subject_token:
        raise InvalidRequest("subject_token is required")
    from starlette.concurrency import run_in_threadpool

    issued = await run_in_threadpool(broker.sessions.exchange, subject_token, trace)
    expires_in = max(1, int(issued.session.expires_at - broker.clock()))
    return JSONResponse(
        TokenResponse(access_token=issued.token, expires_in=expires_in).model_dump(),
        headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
    )
