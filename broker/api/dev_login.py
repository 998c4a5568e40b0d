"""The dev issuer's sign-in page: the authorization code flow with PKCE for people, on loopback.

``broker dev`` has no real identity provider, so its issuer lets anyone sign in as anyone: a form
asks for a subject, a display name, groups and broker roles, and the issuer sends the browser back
to the client with a one-time code. ``POST /token`` redeems the code (``grant_type=
authorization_code``) for an ID token whose ``aud`` is the client id and whose ``nonce`` is the
one the client asked for, after checking the PKCE verifier (S256 only) and the redirect URI.

Only loopback redirect URIs are accepted, codes live 60 seconds and work once, and the page has
a strict Content-Security-Policy. It is a development tool and nothing more: ``broker serve``
never starts it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from broker.errors import InvalidRequest
from broker.settings import is_loopback_url

#: How long an issued authorization code may be redeemed, in seconds.
CODE_TTL = 60
#: Lifetime of the ID tokens the sign-in issues, in seconds.
ID_TOKEN_TTL = 3600
MAX_FORM_BYTES = 16 * 1024
ROLES = ("agent", "approver", "auditor", "admin")
_SUBJECT = re.compile(r"[A-Za-z0-9._@:+-]{1,128}")
_GROUP = re.compile(r"[A-Za-z0-9._@:/+-]{1,64}")
_B64URL = re.compile(r"[A-Za-z0-9_-]{43}")
_OPAQUE = re.compile(r"[\x21-\x7e]{1,512}")

_CSS = (
    "body{font:16px system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem;"
    "color:#1d2330}h1{font-size:1.4rem}label{display:block;margin:.8rem 0 .2rem;font-weight:600}"
    "input[type=text]{width:100%;padding:.45rem;font:inherit;box-sizing:border-box}"
    "fieldset{border:1px solid #ccd;margin-top:1rem}fieldset label{display:inline;font-weight:400;"
    "margin-right:1rem}.note{color:#555;font-size:.9rem}button{margin-top:1.2rem;padding:.5rem 1.2rem;"
    "font:inherit}.warn{background:#fff3cd;padding:.6rem;border-radius:4px}"
)
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()


class LoginError(InvalidRequest):
    """An authorization or token request the dev issuer will not serve."""

    code = "invalid_request"


@dataclass
class _Grant:
    client_id: str
    redirect_uri: str
    challenge: str
    nonce: str
    claims: dict[str, Any]
    expires_at: float


@dataclass
class DevLogin:
    """The sign-in page and the codes it issued (in memory: the dev issuer is one process)."""

    issuer: str
    sign: Callable[[dict[str, Any], int], str]
    clock: Callable[[], float] = time.time
    _codes: dict[str, _Grant] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the authorization request -----------------------------------------------------

    @staticmethod
    def check_request(params: dict[str, str]) -> dict[str, str]:
        """The authorization request's parameters, if the dev issuer can serve it."""
        if params.get("response_type") != "code":
            raise LoginError("only response_type=code is supported")
        if params.get("code_challenge_method") != "S256":
            raise LoginError("PKCE with code_challenge_method=S256 is required")
        if not _B64URL.fullmatch(params.get("code_challenge", "")):
            raise LoginError("code_challenge must be a base64url SHA-256 (43 characters)")
        redirect = params.get("redirect_uri", "")
        parts = urlsplit(redirect)
        if (
            parts.scheme not in ("http", "https")
            or not is_loopback_url(redirect)
            or parts.fragment
            or len(redirect) > 2048
        ):
            raise LoginError("redirect_uri must be an http(s) URL on this machine")
        for name in ("client_id", "state", "nonce"):
            if not _OPAQUE.fullmatch(params.get(name, "")):
                raise LoginError(f"{name} is missing or malformed")
        if "openid" not in params.get("scope", "").split():
            raise LoginError("scope must include openid")
        return {
            k: params[k]
            for k in (
                "response_type",
                "client_id",
                "redirect_uri",
                "scope",
                "state",
                "nonce",
                "code_challenge",
                "code_challenge_method",
            )
        }

    def page(self, params: dict[str, str], *, error: str | None = None) -> HTMLResponse:
        """The sign-in form; the authorization request rides along in hidden fields."""
        request = self.check_request(params)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in request.items()
        )
        roles = "".join(
            f'<label><input type="checkbox" name="role" value="{r}"'
            f"{' checked' if r == 'approver' else ''}> {r}</label>"
            for r in ROLES
        )
        hint = html.escape(params.get("login_hint", "")[:128])
        warn = f'<p class="warn" role="alert">{html.escape(error)}</p>' if error else ""
        body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in - broker dev issuer</title><style>{_CSS}</style></head>
<body><main>
<h1>Sign in to the dev issuer</h1>
<p class="note">Development only: anyone may sign in as anyone. Client
<code>{html.escape(request["client_id"])}</code> will receive an ID token for what you enter.</p>
{warn}
<form method="post" action="/authorize">{hidden}
<label for="sub">Subject (sub)</label>
<input type="text" id="sub" name="sub" required maxlength="128" value="{hint}" autocomplete="username">
<label for="name">Display name</label>
<input type="text" id="name" name="name" maxlength="128">
<label for="groups">Groups (comma separated)</label>
<input type="text" id="groups" name="groups" maxlength="512">
<fieldset><legend>Broker roles</legend>{roles}</fieldset>
<button type="submit" name="action" value="sign-in" id="sign-in">Sign in</button>
<button type="submit" name="action" value="cancel" formnovalidate>Cancel</button>
</form></main></body></html>"""
        origin = urlsplit(request["redirect_uri"])
        return HTMLResponse(
            body,
            headers={
                "Content-Security-Policy": (
                    f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; "
                    f"form-action 'self' {origin.scheme}://{origin.netloc}; "
                    "frame-ancestors 'none'; base-uri 'none'"
                ),
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "X-Content-Type-Options": "nosniff",
            },
        )

    def submit(self, form: dict[str, str]) -> Response:
        """The form was sent: issue a one-time code and send the browser back to the client."""
        request = self.check_request(form)
        back = request["redirect_uri"]
        sep = "&" if "?" in back else "?"
        if form.get("action") == "cancel":
            query = urlencode(
                {"error": "access_denied", "state": request["state"], "iss": self.issuer}
            )
            return RedirectResponse(f"{back}{sep}{query}", status_code=303)
        sub = form.get("sub", "").strip()
        if not _SUBJECT.fullmatch(sub):
            return self.page(
                form, error="The subject must be 1 to 128 letters, digits or ._@:+- characters."
            )
        groups = [g for g in re.split(r"[,\s]+", form.get("groups", "")) if g]
        if any(not _GROUP.fullmatch(g) for g in groups) or len(groups) > 20:
            return self.page(form, error="Groups: at most 20 names of letters, digits, ._@:/+-.")
        claims: dict[str, Any] = {"sub": sub, "groups": groups}
        roles = [r for r in form.get("role", "").split(",") if r in ROLES]
        claims["broker_roles"] = roles
        name = form.get("name", "").strip()
        if name:
            claims["name"] = name[:128]
        code = secrets.token_urlsafe(32)
        with self._lock:
            now = self.clock()
            for stale in [c for c, g in self._codes.items() if g.expires_at <= now]:
                del self._codes[stale]
            self._codes[code] = _Grant(
                client_id=request["client_id"],
                redirect_uri=back,
                challenge=request["code_challenge"],
                nonce=request["nonce"],
                claims=claims,
                expires_at=now + CODE_TTL,
            )
        query = urlencode({"code": code, "state": request["state"], "iss": self.issuer})
        return RedirectResponse(f"{back}{sep}{query}", status_code=303)

    # --- the token request -------------------------------------------------------------

    def redeem(self, form: dict[str, str]) -> dict[str, Any]:
        """``grant_type=authorization_code``: the code, once, with its PKCE verifier."""
        with self._lock:
            grant = self._codes.pop(form.get("code", ""), None)
        if grant is None or grant.expires_at <= self.clock():
            raise LoginError("the code is unknown, used or expired", code="invalid_grant")
        if (
            form.get("client_id") != grant.client_id
            or form.get("redirect_uri") != grant.redirect_uri
        ):
            raise LoginError(
                "client_id or redirect_uri differ from the request", code="invalid_grant"
            )
        verifier = form.get("code_verifier", "")
        digest = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=")
        if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(
            digest.decode(), grant.challenge
        ):
            raise LoginError("the PKCE code_verifier does not match", code="invalid_grant")
        now = int(self.clock())
        claims = {
            **grant.claims,
            "aud": grant.client_id,
            "azp": grant.client_id,
            "nonce": grant.nonce,
            "auth_time": now,
        }
        return {
            "id_token": self.sign(claims, ID_TOKEN_TTL),
            "token_type": "Bearer",
            "access_token": secrets.token_urlsafe(32),
            "expires_in": ID_TOKEN_TTL,
        }


async def read_form(request: Request) -> dict[str, str]:
    """A url-encoded form, size-capped; repeated fields (checkboxes) joined with commas."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise LoginError("the form is too large")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: ",".join(v) for k, v in fields.items()}


def install_login(app: FastAPI, login: DevLogin) -> None:
    """Serve ``GET``/``POST /authorize`` on the dev issuer's app."""

    @app.get("/authorize", response_class=HTMLResponse)
    def authorize(request: Request) -> Response:
        params = dict(request.query_params.items())
        return login.page(params)

    @app.post("/authorize")
    async def authorize_submit(request: Request) -> Response:
        return login.submit(await read_form(request))
