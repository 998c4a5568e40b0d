"""Sessions: bounded lifetimes, hashed tokens, audited refusals, audit-only trust, ending."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest

from broker.domain.ids import SESSION_TOKEN_PREFIX, token_hash
from broker.errors import AuthenticationFailed, BrokerError
from broker.oidc.errors import IssuerUnavailable, TokenRefused
from broker.store import repo
from broker.wiring import Broker, build_broker
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    iss = TestIssuer().start()
    yield iss
    iss.stop()


@pytest.fixture
def make_broker(make_settings: Any, clock: Clock) -> Iterator[Any]:
    built: list[Broker] = []

    def build(*issuers: dict[str, Any], **settings: Any) -> Broker:
        broker = build_broker(make_settings(issuers=list(issuers), **settings), clock=clock)
        built.append(broker)
        return broker

    yield build
    for broker in built:
        broker.stop()


def events(broker: Broker, name: str) -> list[dict[str, Any]]:
    with broker.db.read() as conn:
        return [e for e in repo.audit_events(conn, limit=1000) if e["name"] == name]


def test_session_token_is_prefixed_hashed_and_bounded(
    idp: TestIssuer, make_broker: Any, clock: Clock
) -> None:
    """The session token carries the scanner-friendly prefix, only its SHA-256 is stored, and
    the session ends with the ID token, the global cap or the issuer's cap, whichever is first."""
    broker = make_broker(idp.issuer_config(), session_max_ttl=900)
    id_token = idp.token(ttl=600)
    issued = broker.sessions.exchange(id_token)
    assert issued.token.startswith(SESSION_TOKEN_PREFIX)
    exp = jwt.decode(id_token, options={"verify_signature": False})["exp"]
    assert issued.session.expires_at == exp  # the ID token's exp, the earliest bound here
    with broker.db.read() as conn:
        stored = json.dumps(
            [dict(r) for r in conn.exec_driver_sql("SELECT * FROM sessions").mappings()],
            default=str,
        )
    assert issued.token not in stored
    assert token_hash(issued.token) in stored

    assert broker.sessions.exchange(idp.token(ttl=3000)).session.expires_at == clock.now + 900
    capped = make_broker(idp.issuer_config(session_max_ttl=120))
    assert capped.sessions.exchange(idp.token(ttl=3000)).session.expires_at == clock.now + 120


def test_session_start_is_audited_with_roles_and_token_hash(
    idp: TestIssuer, make_broker: Any
) -> None:
    """broker.session.start names the principal, its roles and the ID token's hash, never the
    ID token itself."""
    broker = make_broker(idp.issuer_config())
    id_token = idp.token("agent-7")
    issued = broker.sessions.exchange(id_token)
    [start] = events(broker, "broker.session.start")
    assert start["session_id"] == issued.session.id
    assert (start["actor_issuer"], start["actor_subject"]) == (idp.url, "agent-7")
    assert start["attributes"]["broker.principal.roles"] == ["agent"]
    assert start["attributes"]["broker.id_token.sha256"] == token_hash(id_token)
    assert id_token not in json.dumps(start)


def test_refusals_are_audited_with_reason_issuer_subject_and_hash(
    idp: TestIssuer, other_idp: TestIssuer, make_broker: Any
) -> None:
    """Each refusal is one broker.auth.failure: reason, the issuer when the token named a
    trusted one, the subject only once the signature was verified, and the token's SHA-256.
    Unverified claims are kept apart from the actor fields."""
    broker = make_broker(idp.issuer_config(trust={"all": [{"claim": "team", "equals": "x"}]}))
    cases = [
        (other_idp.token("eve"), "unknown_issuer", None, None),
        (idp.token("eve", aud="other"), "audience_mismatch", idp.url, "eve"),
        (idp.token("eve", key=other_idp.keys[0]), "unknown_key", idp.url, None),
        (idp.token("eve"), "untrusted_token", idp.url, "eve"),
    ]
    for token, reason, issuer, subject in cases:
        with pytest.raises(TokenRefused):
            broker.sessions.exchange(token)
        failure = events(broker, "broker.auth.failure")[-1]
        attrs = failure["attributes"]
        assert attrs["broker.auth.reason"] == reason
        assert attrs["broker.auth.token_sha256"] == token_hash(token)
        assert (failure["actor_issuer"], failure["actor_subject"]) == (issuer, subject)
        assert token not in json.dumps(failure)
    unknown = events(broker, "broker.auth.failure")[0]["attributes"]
    assert unknown["broker.auth.claimed_iss"] == other_idp.url
    assert unknown["broker.auth.claimed_sub"] == "eve"


def test_issuer_outage_is_a_503_and_audited(idp: TestIssuer, make_broker: Any) -> None:
    """An unreachable issuer refuses with 503 issuer_unavailable, also audited."""
    broker = make_broker(idp.issuer_config())
    idp.down = True
    with pytest.raises(IssuerUnavailable) as info:
        broker.sessions.exchange(idp.token())
    assert info.value.status == 503
    assert events(broker, "broker.auth.failure")[-1]["attributes"]["broker.auth.reason"] == (
        "issuer_unavailable"
    )


def test_audit_only_trust_admits_and_records_the_would_be_denial(
    idp: TestIssuer, make_broker: Any
) -> None:
    """trust_mode: audit opens the session and records on broker.session.start what the trust
    rules would have denied."""
    broker = make_broker(
        idp.issuer_config(trust={"all": [{"claim": "team", "equals": "infra"}]}, trust_mode="audit")
    )
    broker.sessions.exchange(idp.token(team="sales"))
    broker.sessions.exchange(idp.token(team="infra"))
    denied, admitted = events(broker, "broker.session.start")
    assert denied["attributes"]["broker.trust.would_deny"] is True
    assert "team" in denied["attributes"]["broker.trust.reason"]
    assert "broker.trust.would_deny" not in admitted["attributes"]
    assert events(broker, "broker.auth.failure") == []


def test_resolve_refuses_unknown_ended_and_expired_sessions(
    idp: TestIssuer, make_broker: Any, clock: Clock
) -> None:
    """A session token works until the session ends or expires; each refusal after that is an
    audited broker.auth.failure with its own reason."""
    broker = make_broker(idp.issuer_config())
    first = broker.sessions.exchange(idp.token(ttl=600))
    second = broker.sessions.exchange(idp.token(ttl=600))
    assert broker.sessions.resolve(first.token).id == first.session.id
    broker.sessions.end(first.session)
    with pytest.raises(BrokerError):
        broker.sessions.end(first.session)
    # Past the ID tokens' exp, which count from when they were made (a slow set-up may have
    # started the clock seconds earlier).
    clock.now = max(clock.now, time.time()) + 601
    for token, reason in [
        (first.token, "session_ended"),
        (second.token, "session_expired"),
        ("brk_sess_unknown", "unknown_session"),
    ]:
        with pytest.raises(AuthenticationFailed) as info:
            broker.sessions.resolve(token)
        assert info.value.code == "invalid_session"
        failure = events(broker, "broker.auth.failure")[-1]
        assert failure["attributes"]["broker.auth.reason"] == reason
        assert failure["attributes"]["broker.auth.token_sha256"] == token_hash(token)


def test_one_time_tokens_require_a_jti(idp: TestIssuer, make_broker: Any) -> None:
    """With require_jti a token without jti is refused; each jti opens one session."""
    broker = make_broker(idp.issuer_config(require_jti=True))
    with pytest.raises(TokenRefused) as info:
        broker.sessions.exchange(idp.token(jti=None))
    assert info.value.code == "missing_claim"
    token = idp.token()
    broker.sessions.exchange(token)
    with pytest.raises(TokenRefused) as info:
        broker.sessions.exchange(token)
    assert info.value.code == "token_replayed"
    failure = events(broker, "broker.auth.failure")[-1]
    assert failure["attributes"]["broker.auth.reason"] == "token_replayed"
    assert failure["actor_subject"] == "agent-1"
    # Without require_jti, presenting the same token twice is allowed (agents retry).
    relaxed = make_broker(idp.issuer_config())
    relaxed.sessions.exchange(token)
    relaxed.sessions.exchange(token)


@pytest.fixture
def other_idp() -> Iterator[TestIssuer]:
    iss = TestIssuer().start()
    yield iss
    iss.stop()
