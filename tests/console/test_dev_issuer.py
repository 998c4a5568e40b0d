"""The dev issuer's sign-in (authorization code with PKCE) over real HTTP, and that its JSON
token endpoint for agents still works as before."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from tests.console.stack import DevIssuer

pytestmark = pytest.mark.integration


def challenge(verifier: str) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


def request(verifier: str, **changes: str) -> dict[str, str]:
    values = {
        "response_type": "code",
        "client_id": "broker-console",
        "redirect_uri": "http://127.0.0.1:9/ui/callback",
        "scope": "openid profile",
        "state": "state-1",
        "nonce": "nonce-1",
        "code_challenge": challenge(verifier),
        "code_challenge_method": "S256",
    }
    values.update(changes)
    return values


def code_for(issuer: DevIssuer, query: dict[str, str], **form: Any) -> str:
    fields = {**query, "sub": "sam", "name": "Sam", "groups": "sre, ops", **form}
    fields.setdefault("role", ["approver", "auditor"])
    back = httpx.post(f"{issuer.url}/authorize", data={**fields, "action": "sign-in"})
    assert back.status_code == 303, back.text
    location = urlsplit(back.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == query["redirect_uri"]
    answer = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert answer["state"] == query["state"]
    assert answer["iss"] == issuer.url
    return answer["code"]


def redeem(issuer: DevIssuer, code: str, verifier: str, **changes: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": "http://127.0.0.1:9/ui/callback",
        "client_id": "broker-console",
        "code_verifier": verifier,
        **changes,
    }
    return httpx.post(f"{issuer.url}/token", data=form)


def test_discovery_advertises_the_code_flow_with_pkce(issuer_app: DevIssuer) -> None:
    """The discovery document names the authorization endpoint, the code flow and S256."""
    doc = httpx.get(f"{issuer_app.url}/.well-known/openid-configuration").json()
    assert doc["authorization_endpoint"] == f"{issuer_app.url}/authorize"
    assert "code" in doc["response_types_supported"]
    assert doc["code_challenge_methods_supported"] == ["S256"]


def test_a_person_signs_in_and_the_client_gets_an_id_token_for_it(issuer_app: DevIssuer) -> None:
    """The sign-in page carries the request along and has a strict CSP; the code, redeemed once
    with the right verifier, gives an ID token for the client (aud, azp) with the nonce, the
    subject, name, groups and broker roles entered; it verifies with the published keys."""
    verifier = secrets.token_urlsafe(32)
    query = request(verifier)
    page = httpx.get(f"{issuer_app.url}/authorize", params=query)
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "form-action 'self' http://127.0.0.1:9" in csp
    assert "<script" not in page.text
    assert re.search(r'name="nonce" value="nonce-1"', page.text)
    code = code_for(issuer_app, query)
    answer = redeem(issuer_app, code, verifier)
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    id_token = answer.json()["id_token"]
    keys = httpx.get(f"{issuer_app.url}/jwks").json()["keys"]
    claims = jwt.decode(
        id_token, jwt.PyJWK(keys[0]).key, algorithms=["ES256"], audience="broker-console"
    )
    assert claims["iss"] == issuer_app.url
    assert claims["sub"] == "sam"
    assert claims["nonce"] == "nonce-1"
    assert claims["azp"] == "broker-console"
    assert claims["groups"] == ["sre", "ops"]
    assert claims["broker_roles"] == ["approver", "auditor"]
    assert claims["name"] == "Sam"
    assert redeem(issuer_app, code, verifier).status_code == 400  # a code works once


def test_codes_need_their_verifier_client_and_redirect(issuer_app: DevIssuer) -> None:
    """A code is refused with a wrong PKCE verifier, another client id or another redirect
    URI - and is spent by the failed attempt."""
    for changes in (
        {"code_verifier": secrets.token_urlsafe(32)},
        {"client_id": "someone-else"},
        {"redirect_uri": "http://127.0.0.1:9/elsewhere"},
    ):
        verifier = secrets.token_urlsafe(32)
        code = code_for(issuer_app, request(verifier))
        refused = redeem(issuer_app, code, verifier, **changes)
        assert refused.status_code == 400, changes
        assert refused.json()["code"] == "invalid_grant"
        assert redeem(issuer_app, code, verifier).status_code == 400


def test_requests_the_dev_issuer_will_not_serve(issuer_app: DevIssuer) -> None:
    """No sign-in page for a redirect URI off this machine, without PKCE S256, without openid,
    or for another response type; a cancelled sign-in goes back with access_denied; a bad
    subject re-shows the form."""
    verifier = secrets.token_urlsafe(32)
    for changes in (
        {"redirect_uri": "https://evil.example/cb"},
        {"code_challenge_method": "plain"},
        {"scope": "profile"},
        {"response_type": "token"},
        {"code_challenge": "short"},
    ):
        page = httpx.get(f"{issuer_app.url}/authorize", params=request(verifier, **changes))
        assert page.status_code == 400, changes
    query = request(verifier)
    cancel = httpx.post(f"{issuer_app.url}/authorize", data={**query, "action": "cancel"})
    assert cancel.status_code == 303
    assert "error=access_denied" in cancel.headers["location"]
    bad = httpx.post(
        f"{issuer_app.url}/authorize", data={**query, "sub": "no spaces allowed", "action": "x"}
    )
    assert bad.status_code == 200
    assert "The subject must be" in bad.text


def test_the_json_token_endpoint_for_agents_still_works(issuer_app: DevIssuer) -> None:
    """``broker dev token`` posts JSON: that path is unchanged (aud, claims, TTL), and a bad
    body is a 422 problem."""
    answer = httpx.post(
        f"{issuer_app.url}/token",
        json={"sub": "agent-1", "aud": "broker", "ttl": 60, "claims": {"groups": ["dev"]}},
    )
    assert answer.status_code == 200
    claims = jwt.decode(answer.json()["id_token"], options={"verify_signature": False})
    assert (claims["sub"], claims["aud"], claims["groups"]) == ("agent-1", "broker", ["dev"])
    assert claims["exp"] - claims["iat"] == 60
    assert httpx.post(f"{issuer_app.url}/token", json={"ttl": 5}).status_code == 422
    wrong_grant = httpx.post(f"{issuer_app.url}/token", data={"grant_type": "password"})
    assert wrong_grant.status_code == 403
