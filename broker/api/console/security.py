"""The console's cookies, CSRF tokens, sign-in secrets and response headers.

**Session cookie.** The value is a broker session token (``brk_sess_...``) opened by
:meth:`~broker.services.sessions.SessionService.exchange` from the person's verified ID token; the
store keeps only its SHA-256, as for API sessions. The cookie is ``HttpOnly``, ``SameSite``
(``lax`` by default), ``Path=/`` and, unless the broker's public URL is plain http on loopback,
``Secure`` with the ``__Host-`` prefix (no ``Domain``: only this host ever receives it).

**CSRF.** Every form carries ``HMAC-SHA256(session token, "broker-console-csrf")``: only a page
served to the holder of the session can know it, and it needs no storage. A ``POST`` is also
refused when the browser says it comes from another site (``Origin`` or ``Sec-Fetch-Site``).

**Sign-in.** A short-lived, HttpOnly login cookie holds 256 random bits; the ``state``, the
``nonce`` and the PKCE ``code_verifier`` are derived from it with distinct labels, so nothing of
a sign-in in flight is stored server-side and the callback only works in the browser that
started it (a code and state captured elsewhere are useless without the cookie).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal
from urllib.parse import parse_qs, urlsplit

from broker.errors import InvalidRequest
from broker.settings import Settings, is_loopback_url

MAX_FORM_BYTES = 16 * 1024
#: Where the console lives; ``next`` after sign-in must stay below it.
PREFIX = "/ui"

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Sent with every response under /ui.
SECURITY_HEADERS: dict[str, str] = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # The sign-in callback's URL carries a code: it must never leak to another site in a
    # Referer. (``no-referrer`` would also blank the Origin of our own form posts.)
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
}


class CsrfRefused(InvalidRequest):
    """A form without the right CSRF token, or sent from another site."""

    code = "csrf_refused"
    status = 403
    title = "The form could not be accepted"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _derive(secret: str, label: str) -> str:
    return b64url(hmac.new(secret.encode(), label.encode(), hashlib.sha256).digest())


def csrf_token(session_token: str) -> str:
    """The CSRF token of a session (an HMAC of the session token, which it does not reveal)."""
    return _derive(session_token, "broker-console-csrf")


def check_csrf(session_token: str, presented: str | None) -> None:
    """Refuse unless ``presented`` is the session's CSRF token (constant-time comparison)."""
    if not presented or not hmac.compare_digest(
        csrf_token(session_token).encode(), presented.encode("utf-8", "replace")
    ):
        raise CsrfRefused("the form has expired or did not come from this console; reload it")


def check_same_origin(headers: dict[str, str], public_url: str) -> None:
    """Refuse a state-changing request the browser marks as cross-site."""
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        raise CsrfRefused("the form was sent from another site")
    origin = headers.get("origin")
    if origin == "null":
        # An opaque origin (a sandboxed frame, a data: URL, a no-referrer policy): only a
        # browser that also says the request is same-origin is believed.
        if site != "same-origin":
            raise CsrfRefused("the form was sent from an opaque origin")
    elif origin is not None:
        want = urlsplit(public_url)
        got = urlsplit(origin)
        if (got.scheme, got.netloc) != (want.scheme, want.netloc):
            raise CsrfRefused("the form was sent from another site")


@dataclass(frozen=True, slots=True)
class SignIn:
    """One sign-in in flight: the login cookie's secret and what is derived from it."""

    secret: str
    next_path: str

    @classmethod
    def start(cls, next_path: str) -> SignIn:
        return cls(secrets.token_urlsafe(32), next_path)

    @property
    def state(self) -> str:
        return _derive(self.secret, "broker-console-state")

    @property
    def nonce(self) -> str:
        return _derive(self.secret, "broker-console-nonce")

    @property
    def code_verifier(self) -> str:
        """43 characters of base64url: a valid PKCE verifier (RFC 7636 section 4.1)."""
        return _derive(self.secret, "broker-console-pkce")

    def cookie_value(self) -> str:
        return f"{self.secret}.{b64url(self.next_path.encode())}"

    @classmethod
    def from_cookie(cls, value: str | None) -> SignIn | None:
        if not value or len(value) > 4096:
            return None
        secret, _, encoded = value.partition(".")
        if len(secret) < 43:
            return None
        try:
            next_path = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return cls(secret, safe_next(next_path))


def safe_next(value: str | None) -> str:
    """A path below /ui to return to after sign-in; anything else becomes /ui."""
    if not value or len(value) > 1024 or not value.isprintable() or "\\" in value:
        return PREFIX
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith("//"):
        return PREFIX
    if parts.path != PREFIX and not parts.path.startswith(PREFIX + "/"):
        return PREFIX
    if ".." in parts.path.split("/"):
        return PREFIX
    return value


@dataclass(frozen=True, slots=True)
class CookiePolicy:
    """How the console's cookies are set for this deployment."""

    secure: bool
    samesite: Literal["lax", "strict"]

    @classmethod
    def of(cls, settings: Settings) -> CookiePolicy:
        # Browsers drop Secure cookies over plain http; http is only ever allowed on loopback.
        secure = not (
            urlsplit(settings.public_url).scheme == "http" and is_loopback_url(settings.public_url)
        )
        return cls(secure=secure, samesite=settings.console.cookie_samesite)

    def name(self, base: str) -> str:
        return f"__Host-{base}" if self.secure else base

    @property
    def session_cookie(self) -> str:
        return self.name("broker_console")

    @property
    def login_cookie(self) -> str:
        return self.name("broker_console_login")


async def read_form(stream: object) -> dict[str, str]:
    """A url-encoded form body (at most 16 KiB); each field at most once."""
    body = bytearray()
    async for chunk in stream:  # type: ignore[attr-defined]  # Request.stream()
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise InvalidRequest("the form is too large")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the form is not UTF-8") from None
    fields = parse_qs(text, keep_blank_values=True, max_num_fields=32)
    if any(len(v) != 1 for v in fields.values()):
        raise InvalidRequest("each form field may be sent once")
    return {k: v[0] for k, v in fields.items()}
