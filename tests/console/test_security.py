"""The console's protections over real HTTP: sign-in (state, nonce, PKCE, issuer), cookie flags,
CSRF on every form, security headers, sign-out, and where people may be sent after sign-in.

The broker and the dev issuer run on real sockets; the tests speak HTTP as a browser would.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from broker.api.app import create_app
from broker.api.console.security import CONTENT_SECURITY_POLICY
from broker.domain.ids import token_hash
from broker.store import repo
from broker.wiring import build_broker
from tests.console.stack import (
    DevIssuer,
    Stack,
    console_settings,
    console_stack,
    csrf_of,
    sign_in,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def stack(tmp_path: Path, issuer_app: DevIssuer) -> Iterator[Stack]:
    with console_stack(tmp_path, issuer_app) as s:
        yield s


def cookies_of(resp: httpx.Response) -> dict[str, str]:
    """Set-Cookie headers by cookie name (the whole header line)."""
    return {h.split("=", 1)[0]: h for h in resp.headers.get_list("set-cookie")}


def auth_failures(stack: Stack) -> list[dict[str, Any]]:
    with stack.broker.db.read() as conn:
        rows = repo.audit_events(conn, name="broker.auth.failure", limit=100)
    return [r["attributes"] for r in rows]


def pending_task(stack: Stack) -> dict[str, Any]:
    agent = stack.agent("agent-1", groups=["developers"], broker_roles=["agent"])
    return agent.request(
        "deploy-notes", {"environment": "staging", "ticket": "CHG-1"}, "a task to decide"
    )


# --- sign-in -----------------------------------------------------------------------------------


def test_sign_in_sets_a_hardened_session_cookie_whose_value_is_only_stored_hashed(
    stack: Stack,
) -> None:
    """On loopback http: the login cookie and the session cookie are HttpOnly, SameSite=Lax,
    Path=/, not Secure (browsers drop Secure cookies over http); the session cookie lives no
    longer than the session; the store holds the value's SHA-256 only; the session start is
    audited as opened via the console; the ID token is never kept."""
    with httpx.Client(base_url=stack.url) as client:
        login = client.get("/ui/login")
        cookie = cookies_of(login)["broker_console_login"]
        assert "HttpOnly" in cookie
        assert "SameSite=lax" in cookie
        assert "Max-Age=600" in cookie
        assert "Secure" not in cookie
        answer = sign_in(client, sub="sam", roles=["approver"], groups="sre")
        assert answer.status_code == 303
        assert answer.headers["location"] == "/ui"
        set_cookies = cookies_of(answer)
        session_cookie = set_cookies["broker_console"]
        assert "HttpOnly" in session_cookie
        assert "SameSite=lax" in session_cookie
        assert "Path=/" in session_cookie
        assert "Secure" not in session_cookie
        max_age = int(re.search(r"Max-Age=(\d+)", session_cookie).group(1))  # type: ignore[union-attr]
        assert 0 < max_age <= 3600
        assert "Max-Age=0" in set_cookies["broker_console_login"]  # the sign-in is over
        value = client.cookies["broker_console"]
    with stack.broker.db.read() as conn:
        session = repo.session_by_token_hash(conn, token_hash(value))
        started = repo.audit_events(conn, name="broker.session.start", limit=10)
    assert session is not None
    assert session.principal.subject == "sam"
    assert session.principal.has_role("approver")
    assert session.expires_at - session.created_at <= 3600
    console_start = [e for e in started if e["actor_subject"] == "sam"]
    assert console_start[0]["attributes"]["broker.session.via"] == "console"
    assert value not in str(started)


def _https_client(tmp_path: Path, issuer: DevIssuer, **console: Any) -> TestClient:
    """The broker as if behind https://localhost (a loopback name the dev issuer accepts)."""
    port = 8443
    settings = console_settings(
        tmp_path, issuer, port, public_url="https://localhost", console={"issuer": "dev", **console}
    )
    app = create_app(settings, broker=build_broker(settings), start_background=False)
    return TestClient(app, base_url="https://localhost", follow_redirects=False)


def _idp_round_trip(client: Any, login_location: str, **changes: str) -> str:
    """Sign in at the dev issuer for the authorization request at ``login_location`` (with
    ``changes`` made to it, as an attacker would); returns the callback path and query."""
    parts = urlsplit(login_location)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    origin = f"{parts.scheme}://{parts.netloc}"
    page = httpx.get(f"{origin}/authorize", params=query)
    assert page.status_code == 200, page.text
    form = {**query, "sub": "sam", "groups": "sre", "role": ["approver"], "action": "sign-in"}
    back = httpx.post(f"{origin}/authorize", data=form)
    assert back.status_code == 303, back.text
    callback = urlsplit(back.headers["location"])
    return f"{callback.path}?{callback.query}"


def test_outside_loopback_the_cookies_are_secure_host_only_and_may_be_strict(
    tmp_path: Path, issuer_app: DevIssuer
) -> None:
    """With an https public URL both cookies carry Secure and the ``__Host-`` prefix (no Domain,
    Path=/). With ``cookie_samesite: strict`` the session cookie is SameSite=Strict and the
    callback continues from a page of the console's own (a Strict cookie is not sent on the
    redirect chain that began at the identity provider)."""
    client = _https_client(tmp_path / "lax", issuer_app)
    login = client.get("/ui/login?next=/ui/audit")
    assert "Secure" in cookies_of(login)["__Host-broker_console_login"]
    answer = client.get(_idp_round_trip(client, login.headers["location"]))
    assert answer.status_code == 303
    assert answer.headers["location"] == "/ui/audit"
    cookie = cookies_of(answer)["__Host-broker_console"]
    for flag in ("Secure", "HttpOnly", "Path=/", "SameSite=lax"):
        assert flag in cookie
    assert "Domain" not in cookie

    strict = _https_client(tmp_path / "strict", issuer_app, cookie_samesite="strict")
    login = strict.get("/ui/login?next=/ui/approvals")
    answer = strict.get(_idp_round_trip(strict, login.headers["location"]))
    assert answer.status_code == 200
    assert '<meta http-equiv="refresh" content="0;url=/ui/approvals">' in answer.text
    assert "SameSite=strict" in cookies_of(answer)["__Host-broker_console"]
    assert strict.get("/ui/approvals").status_code == 200


def test_an_answer_for_another_sign_in_is_refused_and_audited(stack: Stack) -> None:
    """The callback is refused, audited and opens no session when: the state is not this
    browser's, there is no sign-in cookie, the identity provider names another issuer (RFC
    9207), the provider reports an error, the ID token's nonce is another sign-in's, or the
    code was issued for another PKCE challenge."""
    with httpx.Client(base_url=stack.url) as client:
        location = client.get("/ui/login").headers["location"]
        # A code and state captured from someone else's sign-in, replayed in this browser.
        with httpx.Client(base_url=stack.url) as other:
            theirs = _idp_round_trip(other, other.get("/ui/login").headers["location"])
        answer = client.get(theirs)
        assert answer.status_code == 400
        assert "does not belong to your sign-in" in answer.text
        assert "broker_console" not in client.cookies

        with httpx.Client(base_url=stack.url) as fresh:  # no sign-in cookie at all
            assert fresh.get(theirs).status_code == 400

        location = client.get("/ui/login").headers["location"]
        callback = _idp_round_trip(client, location)
        mixed = re.sub(r"iss=[^&]+", "iss=https%3A%2F%2Fevil.example", callback)
        assert client.get(mixed).status_code == 400

        location = client.get("/ui/login").headers["location"]
        state = parse_qs(urlsplit(location).query)["state"][0]
        cancelled = client.get("/ui/callback", params={"error": "access_denied", "state": state})
        assert cancelled.status_code == 400
        assert "access_denied" in cancelled.text

        location = client.get("/ui/login").headers["location"]
        wrong_nonce = client.get(_idp_round_trip(client, location, nonce="n" * 43))
        assert wrong_nonce.status_code == 403
        assert "does not answer this sign-in" in wrong_nonce.text

        location = client.get("/ui/login").headers["location"]
        wrong_pkce = client.get(_idp_round_trip(client, location, code_challenge="c" * 43))
        assert wrong_pkce.status_code == 400
        assert "refused to complete the sign-in" in wrong_pkce.text
        assert "broker_console" not in client.cookies
    reasons = [a["broker.auth.reason"] for a in auth_failures(stack)]
    for reason in (
        "state_mismatch",
        "no_sign_in",
        "issuer_mismatch",
        "provider_error",
        "nonce_mismatch",
        "code_refused",
    ):
        assert reason in reasons, reasons
    nonce = next(a for a in auth_failures(stack) if a["broker.auth.reason"] == "nonce_mismatch")
    assert nonce["broker.principal.sub"] == "sam"
    assert nonce["broker.auth.token_sha256"]  # the token's hash, never the token


def test_after_sign_in_people_only_ever_land_inside_the_console(stack: Stack) -> None:
    """``next`` is honoured for console paths and replaced by /ui for anything else (another
    site, a scheme-relative URL, a path outside /ui, a traversal)."""
    for given, expected in (
        ("/ui/tasks/tsk_abc?decided=approve", "/ui/tasks/tsk_abc?decided=approve"),
        ("https://evil.example/ui", "/ui"),
        ("//evil.example/ui", "/ui"),
        ("/v1/tasks", "/ui"),
        ("/ui/../v1/tasks", "/ui"),
        ("/ui\\@evil.example", "/ui"),
    ):
        with httpx.Client(base_url=stack.url) as client:
            answer = sign_in(client, sub="sam", roles=["approver"], next_path=given)
            assert answer.headers["location"] == expected, given


def test_sign_out_ends_the_session_everywhere(stack: Stack) -> None:
    """Signing out ends the broker session (the old cookie value no longer works, even replayed)
    and clears the cookie; the next page asks to sign in again."""
    with httpx.Client(base_url=stack.url) as client:
        sign_in(client, sub="sam", roles=["approver"], groups="sre")
        value = client.cookies["broker_console"]
        page = client.get("/ui/approvals")
        out = client.post("/ui/logout", data={"csrf": csrf_of(page.text)})
        assert out.status_code == 303
        assert out.headers["location"] == "/ui/signed-out"
        assert "Max-Age=0" in cookies_of(out)["broker_console"]
    with httpx.Client(base_url=stack.url, cookies={"broker_console": value}) as replay:
        again = replay.get("/ui/approvals")
        assert again.status_code == 303
        assert again.headers["location"].startswith("/ui/login?next=")
    with stack.broker.db.read() as conn:
        session = repo.session_by_token_hash(conn, token_hash(value))
    assert session is not None
    assert session.ended_at is not None


# --- CSRF --------------------------------------------------------------------------------------


def test_every_form_refuses_a_post_without_this_sessions_csrf_token(stack: Stack) -> None:
    """Deciding, signing out and verifying the audit chain are refused (403, nothing done) with
    no token, a wrong one, another session's valid one, or from another site (Origin or
    Sec-Fetch-Site) even with the right token; with the right token from the console itself
    the decision is recorded."""
    task = pending_task(stack)
    with (
        httpx.Client(base_url=stack.url) as client,
        httpx.Client(base_url=stack.url) as other,
    ):
        sign_in(client, sub="sam", roles=["approver", "auditor"], groups="sre")
        sign_in(other, sub="sue", roles=["approver", "auditor"], groups="sre")
        mine = csrf_of(client.get("/ui/approvals").text)
        theirs = csrf_of(other.get("/ui/approvals").text)
        decide = f"/ui/tasks/{task['id']}/decision"
        body = {"decision": "approve", "reason": "fine"}
        for form, headers in (
            (body, {}),
            ({**body, "csrf": "x" * 43}, {}),
            ({**body, "csrf": theirs}, {}),
            ({**body, "csrf": mine}, {"Origin": "https://evil.example"}),
            ({**body, "csrf": mine}, {"Sec-Fetch-Site": "cross-site"}),
            ({**body, "csrf": mine}, {"Origin": "null"}),
        ):
            refused = client.post(decide, data=form, headers=headers)
            assert refused.status_code == 403, (form, headers)
            assert (
                "did not come from this console" in refused.text
                or "another site" in (refused.text)
                or "opaque origin" in refused.text
            )
        for path in ("/ui/logout", "/ui/audit/verify"):
            assert client.post(path, data={"csrf": theirs}).status_code == 403
        assert client.get("/ui/approvals").status_code == 200  # still signed in
        with stack.broker.db.read() as conn:
            assert repo.approvals_for(conn, task["id"]) == []

        ok = client.post(
            decide,
            data={**body, "csrf": mine},
            headers={"Origin": stack.url, "Sec-Fetch-Site": "same-origin"},
        )
        assert ok.status_code == 303
    with stack.broker.db.read() as conn:
        assert [a.subject for a in repo.approvals_for(conn, task["id"])] == ["sam"]


def test_a_form_that_is_not_urlencoded_or_too_large_is_refused(stack: Stack) -> None:
    """Only small url-encoded forms are read: JSON and repeated-field bodies get a 400 page, an
    oversized one is cut off before the console reads it (413, http.max_body_console); none
    decides anything."""
    task = pending_task(stack)
    with httpx.Client(base_url=stack.url) as client:
        sign_in(client, sub="sam", roles=["approver"], groups="sre")
        csrf = csrf_of(client.get("/ui/approvals").text)
        decide = f"/ui/tasks/{task['id']}/decision"
        as_json = client.post(decide, json={"csrf": csrf, "decision": "approve", "reason": "x"})
        assert as_json.status_code == 400
        big = client.post(
            decide, data={"csrf": csrf, "decision": "approve", "reason": "x" * 20_000}
        )
        assert big.status_code == 413
        twice = client.post(
            decide,
            content=urlencode(
                [("csrf", csrf), ("decision", "approve"), ("decision", "deny"), ("reason", "x")]
            ),
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert twice.status_code == 400
    with stack.broker.db.read() as conn:
        assert repo.approvals_for(conn, task["id"]) == []


# --- headers -----------------------------------------------------------------------------------


def test_every_console_response_carries_a_strict_csp_and_the_pages_need_nothing_inline(
    stack: Stack,
) -> None:
    """Pages, redirects, static files and error pages under /ui all carry the strict CSP (no
    inline script or style allowed), nosniff, frame denial and a same-origin referrer policy, and
    are not cached; the rendered HTML has no inline script, style attribute or event handler,
    so the policy never has to be loosened. The API outside /ui is left alone."""
    task = pending_task(stack)
    with httpx.Client(base_url=stack.url) as client:
        answers = [client.get("/ui"), client.get("/ui/approvals"), client.get("/ui/login")]
        sign_in(client, sub="sam", roles=["approver", "auditor"], groups="sre")
        for path in (
            "/ui/approvals",
            f"/ui/tasks/{task['id']}",
            "/ui/audit",
            "/ui/tasks/nope",
            "/ui/static/console.css",
            "/ui/static/console.js",
            "/ui/static/missing.js",
            "/ui/no/such/page",
        ):
            answers.append(client.get(path))
        for answer in answers:
            headers = answer.headers
            where = str(answer.request.url)
            assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY, where
            assert headers["x-content-type-options"] == "nosniff", where
            assert headers["x-frame-options"] == "DENY", where
            assert headers["referrer-policy"] == "same-origin", where
            if headers.get("content-type", "").startswith("text/html"):
                assert headers["cache-control"] == "no-store", where
                html = answer.text
                assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html), where
                assert not re.search(r"\sstyle=", html), where
                assert not re.search(r"\son[a-z]+=", html), where
        assert "script-src 'self'" in CONTENT_SECURITY_POLICY
        assert "unsafe-inline" not in CONTENT_SECURITY_POLICY
        assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
        assert "content-security-policy" not in client.get("/healthz").headers
        missing = client.get("/ui/no/such/page")
        assert missing.status_code == 404
        assert "There is no such page." in missing.text
