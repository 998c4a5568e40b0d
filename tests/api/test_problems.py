"""Bad input gets application/problem+json with a stable code, never a 5xx, and mints nothing."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.support.issuer import TestIssuer
from tests.support.services import live_broker

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


@pytest.fixture
def client(make_settings: Any) -> Any:
    with (
        live_broker(make_settings()) as (server, _),
        httpx.Client(base_url=server.url, timeout=10) as c,
    ):
        yield c


def assert_problem(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    body = resp.json()
    assert body["status"] == status
    assert body["code"]
    assert body["title"]
    if code:
        assert body["code"] == code
    return dict(body)


def test_missing_and_malformed_bearer(client: httpx.Client) -> None:
    """No token, a wrong scheme and an unknown session are 401 problems."""
    assert_problem(client.get("/v1/tasks"), 401, "missing_token")
    assert_problem(
        client.get("/v1/tasks", headers={"Authorization": "Basic abc"}), 401, "invalid_session"
    )
    assert_problem(
        client.get("/v1/tasks", headers={"Authorization": "Bearer brk_sess_nope"}),
        401,
        "invalid_session",
    )


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"grant_type": "password"},
        {"grant_type": GRANT, "subject_token_type": "urn:x", "subject_token": "a.b.c"},
        {"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": ""},
    ],
)
def test_token_exchange_refuses_bad_forms(client: httpx.Client, data: dict[str, str]) -> None:
    """RFC 6749 error members ride along with the problem members."""
    body = assert_problem(client.post("/oauth2/token", data=data), 400)
    assert body["error"] in {"invalid_request", "unsupported_grant_type", "unsupported_token_type"}


def test_token_exchange_refuses_garbage_tokens(client: httpx.Client, issuer: TestIssuer) -> None:
    """An invalid subject token is a 400 invalid_request, as RFC 8693 section 2.2.2 requires."""
    for token in ["not-a-jwt", "a.b.c", "e30.e30.", "x" * 20000]:
        body = assert_problem(
            client.post(
                "/oauth2/token",
                data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
            ),
            400,
        )
        assert body["error"] == "invalid_request"
        assert body["code"] in {"malformed_token", "token_too_large", "unknown_issuer"}
        assert token not in str(body)


def test_json_bodies_that_do_not_fit(client: httpx.Client, issuer: TestIssuer) -> None:
    token = client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": issuer.token()},
    ).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    bad_json = client.post(
        "/v1/tasks", headers={**auth, "Content-Type": "application/json"}, content=b"{not json"
    )
    assert_problem(bad_json, 422)
    assert_problem(client.post("/v1/tasks", headers=auth, json={"scope": "vault-kv-read"}), 422)
    assert_problem(client.post("/v1/tasks", headers=auth, json=[1, 2]), 422)
    assert_problem(
        client.post("/v1/tasks", headers=auth, json={"scope": "nope", "purpose": "x"}),
        404,
        "unknown_scope",
    )
    assert_problem(
        client.post(
            "/v1/tasks",
            headers=auth,
            json={"scope": "vault-kv-read", "purpose": "x", "params": {"evil": "1"}},
        ),
        422,
    )
    assert_problem(
        client.post(
            "/v1/tasks",
            headers=auth,
            json={"scope": "vault-kv-read", "purpose": "x", "ttl": 999999},
        ),
        422,
    )
    assert_problem(client.get("/v1/tasks/tsk_missing", headers=auth), 404, "unknown_task")
    assert_problem(
        client.post("/v1/tasks/tsk_missing/credentials", headers=auth), 404, "unknown_task"
    )
    assert_problem(client.get("/nowhere"), 404)
    assert_problem(client.delete("/healthz"), 405)
