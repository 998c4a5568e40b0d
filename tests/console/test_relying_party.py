"""The relying party's dealings with an identity provider it does not control (a scripted one:
the real exchange with the dev issuer is proven in test_security and test_browser)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.oidc.errors import IssuerUnavailable
from broker.oidc.relying_party import RelyingParty, SignInFailed, pkce_challenge
from broker.settings import IssuerConfig

ISSUER = "https://login.example.com"


def respond(status: int, body: Any) -> httpx.Response:
    """An answer read from the wire as the bounded fetches read it (a raw byte stream)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, stream=httpx.ByteStream(raw))


def party(
    discovery: dict[str, Any], token: Callable[[httpx.Request], httpx.Response] | None = None
) -> tuple[RelyingParty, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/.well-known/openid-configuration":
            return respond(200, discovery)
        if token is not None and request.method == "POST":
            return token(request)
        return httpx.Response(404)

    http = httpx.Client(transport=httpx.MockTransport(answer))
    issuer = IssuerConfig(name="people", issuer=ISSUER, audiences=["broker-console"])
    rp = RelyingParty(
        issuer,
        client_id="broker-console",
        redirect_url="https://broker.example.com/ui/callback",
        http=http,
        client_secret="s3cret-client",
        scopes=["profile", "openid", "groups"],
    )
    return rp, seen


GOOD = {
    "issuer": ISSUER,
    "authorization_endpoint": f"{ISSUER}/authorize",
    "token_endpoint": f"{ISSUER}/token",
    "code_challenge_methods_supported": ["S256"],
}


def test_the_authorization_request_asks_for_a_code_with_pkce_state_and_nonce() -> None:
    """The browser is sent to the discovered endpoint with response_type=code, the client id,
    the exact redirect URI, openid first among the scopes, state, nonce and an S256 challenge."""
    rp, _ = party(GOOD)
    url = rp.authorization_url(state="st", nonce="no", code_challenge=pkce_challenge("v" * 43))
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == f"{ISSUER}/authorize"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query == {
        "response_type": "code",
        "client_id": "broker-console",
        "redirect_uri": "https://broker.example.com/ui/callback",
        "scope": "openid profile groups",
        "state": "st",
        "nonce": "no",
        "code_challenge": pkce_challenge("v" * 43),
        "code_challenge_method": "S256",
    }
    # RFC 7636 appendix B's example.
    assert (
        pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk")
        == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    )


@pytest.mark.parametrize(
    "discovery",
    [
        {**GOOD, "issuer": "https://login.example.com/"},
        {**GOOD, "token_endpoint": "https://elsewhere.example.net/token"},
        {**GOOD, "token_endpoint": "http://login.example.com/token"},
        {**GOOD, "authorization_endpoint": "http://login.example.com/authorize"},
        {**GOOD, "authorization_endpoint": None},
        {**GOOD, "code_challenge_methods_supported": ["plain"]},
    ],
)
def test_a_discovery_document_that_could_misdirect_is_refused(discovery: dict[str, Any]) -> None:
    """Another issuer name, a token endpoint on another host or over http, an authorization
    endpoint over http or missing, or no S256 support: the provider counts as unavailable and
    nothing is sent anywhere."""
    rp, seen = party(discovery)
    with pytest.raises(IssuerUnavailable):
        rp.authorization_url(state="s", nonce="n", code_challenge="c" * 43)
    assert [r.url.path for r in seen] == ["/.well-known/openid-configuration"]


def test_redeeming_sends_the_verifier_and_keeps_only_the_id_token() -> None:
    """The code goes to the token endpoint with the verifier, the redirect URI and the client's
    credentials (HTTP Basic); only the ID token comes back (no access token is kept)."""

    def token(request: httpx.Request) -> httpx.Response:
        form = {k: v[0] for k, v in parse_qs(request.content.decode()).items()}
        assert form == {
            "grant_type": "authorization_code",
            "code": "the-code",
            "redirect_uri": "https://broker.example.com/ui/callback",
            "code_verifier": "v" * 43,
            "client_id": "broker-console",
        }
        assert request.headers["authorization"].startswith("Basic ")
        return respond(200, {"id_token": "a.b.c", "access_token": "at-123"})

    rp, _ = party(GOOD, token)
    assert rp.redeem("the-code", "v" * 43) == "a.b.c"


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (400, {"error": "invalid_grant"}, SignInFailed),
        (200, {"access_token": "only"}, SignInFailed),
        (200, b"not json", SignInFailed),
        (503, {"error": "temporarily_unavailable"}, IssuerUnavailable),
        (200, {"id_token": "x" * 100_000}, IssuerUnavailable),
    ],
)
def test_a_refusing_or_broken_token_endpoint(status: int, body: Any, error: type) -> None:
    """A refusal or an answer without an ID token ends the sign-in; a server error or an
    oversized answer is an unavailable provider."""
    rp, _ = party(GOOD, lambda _r: respond(status, body))
    with pytest.raises(error):
        rp.redeem("the-code", "v" * 43)


def test_an_unusable_code_is_refused_before_anything_is_sent() -> None:
    """An empty, huge or non-printable code never reaches the provider."""
    rp, seen = party(GOOD)
    for code in ("", "x" * 5000, "a\nb"):
        with pytest.raises(SignInFailed):
            rp.redeem(code, "v" * 43)
    assert seen == []
