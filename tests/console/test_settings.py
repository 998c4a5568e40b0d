"""Console settings are checked when the broker starts, and the sign-in's token rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.api.console.routes import Console
from broker.api.console.security import CookiePolicy, SignIn, safe_next
from broker.domain.principal import Principal
from broker.errors import ConfigurationError
from broker.oidc.errors import TokenRefused
from broker.oidc.verifier import VerifiedToken
from broker.settings import IssuerConfig, load_settings

PEOPLE = {
    "name": "people",
    "issuer": "https://login.example.com",
    "audiences": ["broker-console"],
    "roles": [],
}
AGENTS = {"name": "ci", "issuer": "https://ci.example.com", "audiences": ["broker"]}


def build(tmp_path: Path, **values: Any) -> Any:
    return load_settings(issuers=[PEOPLE, AGENTS], signing_key_file=tmp_path / "k.pem", **values)


def test_the_console_issuer_must_be_configured_and_name_the_client(tmp_path: Path) -> None:
    """``console.issuer`` names a configured issuer, whose audiences include the client id."""
    with pytest.raises(ConfigurationError, match="names no configured issuer"):
        build(tmp_path, public_url="https://b.example.com", console={"issuer": "nobody"})
    with pytest.raises(ConfigurationError, match="must be one of the audiences"):
        build(tmp_path, public_url="https://b.example.com", console={"issuer": "people"})
    settings = build(
        tmp_path,
        public_url="https://b.example.com",
        console={"issuer": "people", "client_id": "broker-console"},
    )
    assert settings.console.issuer == "people"


def test_production_needs_https_for_the_console(tmp_path: Path) -> None:
    """Outside dev mode the console refuses a plain-http public URL (its cookies are Secure);
    loopback http stays possible, and a trace URL must carry ``{trace_id}``."""
    console = {"issuer": "people", "client_id": "broker-console"}
    with pytest.raises(ConfigurationError, match="console needs an https public_url"):
        build(tmp_path, public_url="http://broker.example.com", console=console)
    assert build(tmp_path, public_url="http://127.0.0.1:8080", console=console)
    with pytest.raises(ConfigurationError, match="trace_url"):
        build(
            tmp_path,
            public_url="https://b.example.com",
            console={**console, "trace_url": "https://jaeger.example.com/search"},
        )


def test_cookie_policy_follows_the_public_url(tmp_path: Path) -> None:
    """Secure and ``__Host-`` cookies everywhere except plain http on loopback."""
    console = {"issuer": "people", "client_id": "broker-console"}
    secure = CookiePolicy.of(build(tmp_path, public_url="https://b.example.com", console=console))
    assert secure.secure
    assert secure.session_cookie == "__Host-broker_console"
    loopback = CookiePolicy.of(build(tmp_path, public_url="http://127.0.0.1:8080"))
    assert not loopback.secure
    assert loopback.session_cookie == "broker_console"


def test_sign_in_secrets_are_derived_apart_and_survive_the_cookie() -> None:
    """State, nonce and PKCE verifier come from one cookie secret under distinct labels (none
    reveals another); the cookie round-trips the return path, sanitised."""
    sign_in = SignIn.start("/ui/tasks/tsk_1")
    values = {sign_in.state, sign_in.nonce, sign_in.code_verifier, sign_in.secret}
    assert len(values) == 4
    assert 43 <= len(sign_in.code_verifier) <= 128
    again = SignIn.from_cookie(sign_in.cookie_value())
    assert again == sign_in
    assert SignIn.from_cookie("short.x") is None
    assert SignIn.from_cookie(None) is None
    assert safe_next("/ui/audit?task=a") == "/ui/audit?task=a"
    assert safe_next("/uix") == "/ui"


def verified(issuer: IssuerConfig, **claims: Any) -> VerifiedToken:
    from broker.domain.conditions import Verdict
    from broker.oidc.trust import TrustDecision

    return VerifiedToken(
        principal=Principal(issuer.issuer, "sam"),
        claims={"aud": "broker-console", "nonce": "n-1", **claims},
        issuer=issuer,
        expires_at=0,
        jti=None,
        trust=TrustDecision(Verdict(True, ""), True),
    )


def test_the_sign_in_token_must_come_from_the_console_issuer_for_this_client_and_sign_in(
    tmp_path: Path,
) -> None:
    """A token verified for another trusted issuer (an agents' CI issuer), with another nonce or
    none, not naming the client, or authorised for another party (azp) is refused with a
    stable reason."""
    settings = build(
        tmp_path,
        public_url="https://b.example.com",
        console={"issuer": "people", "client_id": "broker-console"},
    )
    console = Console.__new__(Console)
    console.settings = settings.console
    people, agents = settings.issuers
    sign_in = SignIn("s" * 43, "/ui")
    good = {"nonce": sign_in.nonce}
    console._check_sign_in(verified(people, **good), sign_in)
    for issuer, claims, reason in (
        (agents, good, "unexpected_issuer"),
        (people, {"nonce": "other"}, "nonce_mismatch"),
        (people, {"nonce": None}, "nonce_mismatch"),
        (people, {**good, "aud": ["broker"]}, "audience_mismatch"),
        (people, {**good, "azp": "another-client"}, "audience_mismatch"),
    ):
        with pytest.raises(TokenRefused) as info:
            console._check_sign_in(verified(issuer, **claims), sign_in)
        assert info.value.code == reason
