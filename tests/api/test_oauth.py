"""POST /oauth2/token (RFC 8693) and /v1/sessions/current over real HTTP.

Proves the success response RFC 8693 section 2.2.1 defines, errors as RFC 6749 section 5.2 and
RFC 8693 section 2.2.2 define them (400 invalid_request for a refused subject token, with a
stable code), 503 with Retry-After when the issuer is down, an audit record for every refusal,
approvers and auditors logging in the same way, and DELETE ending the session and what it holds
(a real OpenBao token revoked).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.domain.ids import token_hash
from broker.settings import VaultSettings
from broker.store import repo
from broker.wiring import Broker
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao, live_broker

pytestmark = pytest.mark.integration

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    iss = TestIssuer().start()
    yield iss
    iss.stop()


@pytest.fixture
def humans() -> Iterator[TestIssuer]:
    """A separate identity provider for people (approvers, auditors)."""
    iss = TestIssuer(audience="broker-console").start()
    yield iss
    iss.stop()


@pytest.fixture
def served(
    make_settings: Any, idp: TestIssuer, humans: TestIssuer
) -> Iterator[tuple[httpx.Client, Broker]]:
    human = humans
    settings = make_settings(
        issuers=[
            idp.issuer_config(claims={"roles": "broker_roles"}),
            human.issuer_config(
                name="humans",
                audiences=["broker-console"],
                roles=[],
                claims={
                    "role_rules": [
                        {
                            "role": "approver",
                            "when": {"all": [{"claim": "groups", "equals": "sre"}]},
                        },
                        {
                            "role": "auditor",
                            "when": {"any": [{"claim": "groups", "one_of": ["security", "audit"]}]},
                        },
                    ]
                },
            ),
        ]
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        yield client, broker


def exchange(client: httpx.Client, token: str, **extra: str) -> httpx.Response:
    return client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token, **extra},
    )


def failures(broker: Broker) -> list[dict[str, Any]]:
    with broker.db.read() as conn:
        return [
            e for e in repo.audit_events(conn, limit=1000) if e["name"] == "broker.auth.failure"
        ]


def test_success_is_an_rfc8693_response(served: Any, idp: TestIssuer) -> None:
    """200 with access_token (brk_sess_...), issued_token_type access_token, token_type Bearer,
    expires_in no later than the ID token, and no-store caching. The jwt subject type means an
    access token, which this issuer is not configured to accept: the same ID token sent as one
    is refused."""
    client, _ = served
    resp = exchange(client, idp.token(ttl=300))
    assert resp.status_code == 200
    assert resp.headers["cache-control"] == "no-store"
    assert resp.headers["pragma"] == "no-cache"
    body = resp.json()
    assert set(body) == {"access_token", "issued_token_type", "token_type", "expires_in"}
    assert body["access_token"].startswith("brk_sess_")
    assert body["issued_token_type"] == ACCESS
    assert body["token_type"] == "Bearer"
    assert 290 <= body["expires_in"] <= 300
    resp = client.post(
        "/oauth2/token",
        data={
            "grant_type": GRANT,
            "subject_token_type": JWT,
            "subject_token": idp.token(),
            "requested_token_type": ACCESS,
            "scope": "ignored",
            "unknown_parameter": "ignored",
        },
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["code"] == "access_token_not_accepted"


@pytest.mark.parametrize(
    ("claims", "code"),
    [
        ({"aud": "someone-else"}, "audience_mismatch"),
        ({"exp": 1000}, "token_expired"),
        ({"iss": "https://evil.example"}, "unknown_issuer"),
    ],
)
def test_refused_subject_tokens_are_400_invalid_request(
    served: Any, idp: TestIssuer, claims: dict[str, Any], code: str
) -> None:
    """A refused subject token is 400 with error=invalid_request (RFC 8693 2.2.2), a problem
    document with a stable code, no WWW-Authenticate, no token echoed, and an audit record."""
    client, broker = served
    token = idp.token(**claims)
    resp = exchange(client, token)
    assert resp.status_code == 400
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.headers["cache-control"] == "no-store"
    body = resp.json()
    assert (body["error"], body["code"]) == ("invalid_request", code)
    assert body["error_description"] == body["detail"]
    assert token not in resp.text
    assert failures(broker)[-1]["attributes"]["broker.auth.token_sha256"] == token_hash(token)


@pytest.mark.parametrize(
    ("data", "code", "error"),
    [
        ({"grant_type": "client_credentials"}, "unsupported_grant_type", "unsupported_grant_type"),
        (
            {"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"},
            "unsupported_token_type",
            "invalid_request",
        ),
        ({"subject_token": ""}, "invalid_request", "invalid_request"),
        ({"actor_token": "x", "actor_token_type": ID_TOKEN}, "invalid_request", "invalid_request"),
        ({"requested_token_type": ID_TOKEN}, "invalid_request", "invalid_request"),
        ({"audience": "https://elsewhere.example"}, "invalid_target", "invalid_target"),
        ({"resource": "https://elsewhere.example"}, "invalid_target", "invalid_target"),
    ],
)
def test_bad_requests(
    served: Any, idp: TestIssuer, data: dict[str, str], code: str, error: str
) -> None:
    """Malformed or unsupported exchanges are 400s with RFC 6749 error codes, and audited."""
    client, broker = served
    form = {"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": idp.token()}
    form.update(data)
    before = len(failures(broker))
    resp = client.post("/oauth2/token", data=form)
    assert resp.status_code == 400, resp.text
    assert (resp.json()["code"], resp.json()["error"]) == (code, error)
    assert len(failures(broker)) == before + 1
    assert failures(broker)[-1]["attributes"]["broker.auth.reason"] == code


def test_malformed_bodies(served: Any, idp: TestIssuer) -> None:
    """Repeated parameters and JSON instead of a form are 400s; an oversized body is 413."""
    client, _ = served
    token = idp.token()
    repeated = f"grant_type={GRANT}&subject_token_type={ID_TOKEN}&subject_token={token}&subject_token={token}"
    resp = client.post(
        "/oauth2/token",
        content=repeated,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 400
    assert "repeated" in resp.json()["detail"]
    resp = client.post("/oauth2/token", json={"grant_type": GRANT})
    assert resp.status_code == 400
    resp = client.post(
        "/oauth2/token",
        content=b"a=" + b"b" * 70_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert resp.status_code == 413
    assert resp.json()["code"] == "payload_too_large"


def test_issuer_down_is_503_temporarily_unavailable(served: Any, idp: TestIssuer) -> None:
    """An unreachable issuer (never reached before) is 503 temporarily_unavailable with
    Retry-After: the caller may try again; it is not told its token is bad."""
    client, broker = served
    idp.down = True
    resp = exchange(client, idp.token())
    assert resp.status_code == 503
    assert resp.json()["error"] == "temporarily_unavailable"
    assert resp.json()["code"] == "issuer_unavailable"
    assert int(resp.headers["retry-after"]) >= 1
    assert failures(broker)[-1]["attributes"]["broker.auth.reason"] == "issuer_unavailable"


def test_approvers_and_auditors_log_in_the_same_way(
    served: Any, idp: TestIssuer, humans: TestIssuer
) -> None:
    """A human identity provider is a separate issuer; roles come from its claims. Agents'
    roles come from their own issuer's role claim; unknown role names grant nothing."""
    client, _ = served

    def roles(token: str) -> list[str]:
        resp = exchange(client, token)
        assert resp.status_code == 200, resp.text
        me = client.get(
            "/v1/sessions/current",
            headers={"Authorization": f"Bearer {resp.json()['access_token']}"},
        ).json()
        return list(me["roles"])

    assert roles(humans.token("ann", groups=["sre"])) == ["approver"]
    assert roles(humans.token("sam", groups=["security"])) == ["auditor"]
    assert roles(humans.token("bob", groups=["sales"])) == []
    assert roles(idp.token("bot", broker_roles=["agent", "root"])) == ["agent"]


def test_session_current_and_delete(served: Any, idp: TestIssuer) -> None:
    """GET says who the caller is; DELETE ends the session, ends its open tasks, and the token
    stops working (audited refusal afterwards)."""
    client, broker = served
    resp = exchange(client, idp.token("agent-9", name="Agent Nine", groups=["developers"]))
    session = resp.json()["access_token"]
    auth = {"Authorization": f"Bearer {session}"}
    me = client.get("/v1/sessions/current", headers=auth).json()
    assert me["issuer"] == idp.url
    assert me["subject"] == "agent-9"
    assert me["display_name"] == "Agent Nine"
    assert me["groups"] == ["developers"]
    assert me["roles"] == ["agent"]
    assert me["expires_at"] > me["created_at"]

    task = client.post(
        "/v1/tasks", headers=auth, json={"scope": "vault-kv-read", "purpose": "look around"}
    )
    assert task.status_code == 201, task.text
    assert client.delete("/v1/sessions/current", headers=auth).status_code == 204
    resp = client.get("/v1/sessions/current", headers=auth)
    assert resp.status_code == 401
    assert resp.json()["code"] == "invalid_session"
    with broker.db.read() as conn:
        ended = repo.get_task(conn, task.json()["id"])
    assert ended is not None
    assert ended.state.value in {"completed", "cancelled"}
    assert failures(broker)[-1]["attributes"]["broker.auth.reason"] == "session_ended"
    assert client.delete("/v1/sessions/current", headers=auth).status_code == 401


def test_missing_and_malformed_authorization_are_audited(served: Any) -> None:
    """No bearer and a malformed header are refused and audited (the header's hash only)."""
    client, broker = served
    assert client.get("/v1/sessions/current").status_code == 401
    assert failures(broker)[-1]["attributes"]["broker.auth.reason"] == "missing_token"
    header = "Basic dXNlcjpwYXNz"
    assert client.get("/v1/sessions/current", headers={"Authorization": header}).status_code == 401
    last = failures(broker)[-1]
    assert last["attributes"]["broker.auth.reason"] == "malformed_authorization"
    assert header not in json.dumps(last)


def test_ending_a_session_revokes_its_openbao_token(
    openbao: OpenBao, make_settings: Any, idp: TestIssuer
) -> None:
    """DELETE /v1/sessions/current revokes what the session holds: the real OpenBao token minted
    for its task stops working at OpenBao."""
    settings = make_settings(
        issuers=[idp.issuer_config()],
        vault=VaultSettings(
            addr=openbao.addr, token=openbao.broker_token, token_role="broker-child"
        ),
    )
    with (
        live_broker(settings) as (server, _),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        session = exchange(client, idp.token("agent-bao")).json()["access_token"]
        auth = {"Authorization": f"Bearer {session}"}
        task = client.post(
            "/v1/tasks", headers=auth, json={"scope": "vault-kv-read", "purpose": "read demo"}
        ).json()
        cred = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
        assert cred.status_code == 201, cred.text
        vault_token = cred.json()["secret"]["token"]
        with openbao.client(vault_token) as agent:
            assert agent.get("/v1/auth/token/lookup-self").status_code == 200
        assert client.delete("/v1/sessions/current", headers=auth).status_code == 204
        with openbao.client(vault_token) as agent:
            assert agent.get("/v1/auth/token/lookup-self").status_code == 403
