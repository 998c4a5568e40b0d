"""The broker as an OpenID Connect relying party: people signing in to the console.

Authorization code flow with PKCE (S256), ``state`` and ``nonce`` (OpenID Connect Core 3.1, RFC
7636). This module only talks to the identity provider: it finds the provider's endpoints through
its discovery document, builds the authorization URL and redeems a code for an ID token. The ID
token is then verified by :class:`~broker.oidc.verifier.TokenVerifier` like any other, and its
``nonce`` by the caller, who alone knows what it expects.

The provider is outside the broker's control, so its answers are bounded like every issuer fetch
(:mod:`broker.oidc.fetch`): the discovery document must name exactly the configured issuer, the
token endpoint must be https (loopback http in dev mode) on the issuer's own host or one listed
in its ``jwks_hosts``, redirects are never followed and answers are size-capped strict JSON. The
access token a provider may return is never kept: the console needs only the ID token.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from broker.errors import AuthenticationFailed
from broker.oidc.errors import IssuerUnavailable
from broker.oidc.fetch import FetchFailed, check_fetch_url, fetch_json, is_loopback_host, origin
from broker.oidc.jose import MalformedInput, strict_json
from broker.settings import IssuerConfig

#: A token response is a few KiB (an ID token and perhaps an access token).
MAX_TOKEN_RESPONSE = 64 * 1024
#: Longest authorization code accepted from the browser.
MAX_CODE = 2048


class SignInFailed(AuthenticationFailed):
    """The identity provider did not complete the sign-in (refused code, error answer, ...)."""

    code = "sign_in_failed"
    title = "Sign-in failed"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as PKCE and JOSE spell it."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def pkce_challenge(verifier: str) -> str:
    """The S256 code challenge of a PKCE code verifier (RFC 7636 section 4.2)."""
    return b64url(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True, slots=True)
class ProviderEndpoints:
    """Where the browser signs in and where the broker redeems the code."""

    authorization_endpoint: str
    token_endpoint: str


class RelyingParty:
    """Signs people in at one configured issuer with the authorization code flow and PKCE."""

    def __init__(
        self,
        issuer: IssuerConfig,
        *,
        client_id: str,
        redirect_url: str,
        http: httpx.Client,
        client_secret: str | None = None,
        scopes: list[str] | None = None,
        allow_http_loopback: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.client_id = client_id
        self.redirect_url = redirect_url
        self.http = http
        self.client_secret = client_secret
        wanted = scopes or []
        self.scopes = ["openid", *[s for s in wanted if s != "openid"]]
        self.allow_http_loopback = allow_http_loopback
        self.monotonic = monotonic
        self._endpoints: ProviderEndpoints | None = None
        self._discovered_at = 0.0

    # --- discovery ------------------------------------------------------------------------

    def _browser_url(self, url: Any, what: str) -> str:
        """An endpoint the browser is sent to: https, or loopback http in dev mode."""
        if not isinstance(url, str) or not url or len(url) > 2048:
            raise FetchFailed(f"the discovery document has no usable {what}")
        parts = urlsplit(url)
        host = parts.hostname or ""
        secure = parts.scheme == "https" or (
            parts.scheme == "http" and self.allow_http_loopback and is_loopback_host(host)
        )
        if not secure or not host or parts.fragment or parts.username is not None:
            raise FetchFailed(f"the {what} {url[:200]!r} is not https")
        return url

    def endpoints(self) -> ProviderEndpoints:
        """The provider's endpoints from its discovery document (cached for ``jwks_refresh``)."""
        now = self.monotonic()
        if self._endpoints is not None and now - self._discovered_at < self.issuer.jwks_refresh:
            return self._endpoints
        url = self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            check_fetch_url(url, allow_http_loopback=self.allow_http_loopback)
            doc = fetch_json(self.http, url, timeout=self.issuer.fetch_timeout)
            if doc.get("issuer") != self.issuer.issuer:
                raise FetchFailed(f"{url}: the discovery document names another issuer")
            authorize = self._browser_url(
                doc.get("authorization_endpoint"), "authorization_endpoint"
            )
            token = doc.get("token_endpoint")
            if not isinstance(token, str) or len(token) > 2048:
                raise FetchFailed(f"{url}: no usable token_endpoint")
            where = check_fetch_url(token, allow_http_loopback=self.allow_http_loopback)
            allowed = {origin(self.issuer.issuer)} | {
                origin(f"https://{h}") for h in self.issuer.jwks_hosts
            }
            if where not in allowed:
                raise FetchFailed(
                    f"{url}: token_endpoint {where!r} is neither the issuer's nor allowed"
                )
            methods = doc.get("code_challenge_methods_supported")
            if isinstance(methods, list) and "S256" not in methods:
                raise FetchFailed(f"{url}: the provider does not support PKCE with S256")
        except FetchFailed as exc:
            raise IssuerUnavailable(self.issuer.issuer, internal=str(exc)) from None
        self._endpoints = ProviderEndpoints(authorize, token)
        self._discovered_at = now
        return self._endpoints

    # --- the flow -------------------------------------------------------------------------

    def authorization_url(self, *, state: str, nonce: str, code_challenge: str) -> str:
        """Where to send the browser to sign in (response_type=code, PKCE S256)."""
        endpoint = self.endpoints().authorization_endpoint
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.client_id,
                "redirect_uri": self.redirect_url,
                "scope": " ".join(self.scopes),
                "state": state,
                "nonce": nonce,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            }
        )
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    def redeem(self, code: str, code_verifier: str) -> str:
        """Trade an authorization code for the ID token (not yet verified: the caller does it)."""
        if not code or len(code) > MAX_CODE or not code.isprintable():
            raise SignInFailed("the identity provider sent back no usable authorization code")
        endpoint = self.endpoints().token_endpoint
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": self.redirect_url,
            "code_verifier": code_verifier,
            "client_id": self.client_id,
        }
        auth = (self.client_id, self.client_secret) if self.client_secret else None
        answer = self._post(endpoint, form, auth)
        id_token = answer.get("id_token")
        if not isinstance(id_token, str) or not id_token:
            raise SignInFailed(
                "the identity provider answered without an ID token",
                internal=f"token endpoint answer without id_token (keys {sorted(answer)[:10]})",
            )
        return id_token

    def _post(self, url: str, form: dict[str, str], auth: tuple[str, str] | None) -> dict[str, Any]:
        timeout = self.issuer.fetch_timeout
        deadline = self.monotonic() + timeout
        try:
            with self.http.stream(
                "POST",
                url,
                data=form,
                auth=auth,
                follow_redirects=False,
                timeout=httpx.Timeout(timeout),
                headers={"Accept": "application/json", "Accept-Encoding": "identity"},
            ) as response:
                body = bytearray()
                for chunk in response.iter_raw():
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE or self.monotonic() > deadline:
                        raise IssuerUnavailable(
                            self.issuer.issuer, internal=f"{url}: oversized or slow answer"
                        )
                status = response.status_code
        except httpx.HTTPError as exc:
            raise IssuerUnavailable(
                self.issuer.issuer, internal=f"{url}: {type(exc).__name__}"
            ) from None
        try:
            value = strict_json(bytes(body))
        except MalformedInput:
            value = None
        if status >= 500:
            raise IssuerUnavailable(self.issuer.issuer, internal=f"{url}: HTTP {status}")
        if status != 200 or not isinstance(value, dict):
            error = value.get("error") if isinstance(value, dict) else None
            raise SignInFailed(
                "the identity provider refused to complete the sign-in; sign in again",
                internal=f"{url}: HTTP {status}, error {str(error)[:64]!r}",
            )
        return value
