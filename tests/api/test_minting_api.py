"""Minting over HTTP against the real backends: the credentials response per backend, outages,
idempotent retries, broker-signed tokens (JWKS, introspection) and the operators' endpoints."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest

from broker.settings import AwsSettings
from tests.api.flows import Person, cast, events, login, running, scope_folder, settings_for
from tests.support.issuer import TestIssuer
from tests.support.services import Moto, OpenBao
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration

INTERNAL_API = """\
name: internal-api
description: A broker-signed token for the internal API.
owner: platform-team
backend:
  type: broker_jwt
  audience: internal-api
  claims:
    team: platform
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 300
  max: 600
risk: low
approval:
  mode: auto
"""


@pytest.fixture
def scopes(tmp_path: Path) -> Path:
    return scope_folder(tmp_path, ("internal-api", INTERNAL_API))


def mint_ok(person: Person, task_id: str, **headers: str) -> dict[str, Any]:
    resp = person.post(f"/v1/tasks/{task_id}/credentials", headers=headers)
    assert resp.status_code == 201, resp.text
    assert resp.headers["cache-control"] == "no-store"
    body: dict[str, Any] = resp.json()
    assert body["credential_id"].startswith("crd_") and body["state"] == "active"
    return body


def test_each_backend_answers_once_with_its_environment_form(
    openbao_db: OpenBao, moto_server: Moto, issuer: TestIssuer, make_settings: Any, scopes: Path
) -> None:
    """Vault token, database login, STS and broker JWT: the secret and its environment form appear
    in the mint response only (no-store), with the credential id and an expiry within the
    template's cap; asking again is a 409 without any secret."""
    settings = settings_for(
        make_settings,
        issuer,
        scopes_dir=scopes,
        vault=openbao_db.vault_settings(),
        aws=AwsSettings(endpoint_url=moto_server.endpoint),
    )
    expected_env = {
        "vault-kv-read": {"VAULT_ADDR", "VAULT_TOKEN"},
        "postgres-readonly": {
            "PGHOST",
            "PGPORT",
            "PGDATABASE",
            "PGUSER",
            "PGPASSWORD",
            "DATABASE_URL",
        },
        "aws-s3-read": {
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_REGION",
            "AWS_DEFAULT_REGION",
            "AWS_CREDENTIAL_EXPIRATION",
            "AWS_ENDPOINT_URL",
        },
        "internal-api": {"BROKER_JWT"},
    }
    params = {"aws-s3-read": {"bucket": "example-data-logs", "prefix": "2024/05"}}
    caps = {
        "vault-kv-read": 3600,
        "postgres-readonly": 3600,
        "aws-s3-read": 3600,
        "internal-api": 600,
    }
    with running(settings) as (broker, client):
        agent = cast(client, issuer).agent
        for scope, env_keys in expected_env.items():
            task = agent.request(scope, params.get(scope, {})).json()
            assert task["state"] == "approved", task
            before = time.time()
            body = mint_ok(agent, task["id"])
            assert set(body["env"]) >= env_keys, scope
            assert body["secret"]
            assert body["expires_at"] <= before + min(caps[scope], task["ttl"]) + 5
            again = agent.post(f"/v1/tasks/{task['id']}/credentials")
            assert again.status_code == 409
            assert "secret" not in again.json() and "env" not in again.json()
            for value in body["secret"].values():
                if value != body["details"].get("accessor") and not value.startswith("ASIA"):
                    assert value not in again.text
        stored = str(events(broker))
        for scope in expected_env:
            assert scope in stored


def test_an_outage_is_a_503_problem_and_the_idempotent_retry_mints_once(
    openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """OpenBao unreachable: the mint is a 503 problem+json, no credential is left active and the
    task stays approved; once OpenBao is back the same Idempotency-Key mints exactly once."""
    proxy = TcpProxy(urlsplit(openbao.addr).port or 0).up()
    settings = settings_for(
        make_settings, issuer, vault=openbao.vault_settings(addr=proxy.url, timeout=3)
    )
    try:
        with running(settings) as (broker, client):
            agent = cast(client, issuer).agent
            task = agent.request("vault-kv-read").json()
            proxy.down()
            resp = agent.post(
                f"/v1/tasks/{task['id']}/credentials", headers={"Idempotency-Key": "k-1"}
            )
            assert resp.status_code == 503
            assert resp.headers["content-type"].startswith("application/problem+json")
            assert resp.json()["code"] in ("backend_unavailable", "backend_outcome_unknown")
            assert agent.task(task["id"])["state"] == "approved"
            from broker.store import repo

            with broker.db.read() as conn:
                states = [c.state.value for c in repo.credentials_for(conn, task["id"])]
            assert states in (["failed"], ["revoke_pending"])
            proxy.up()
            body = mint_ok(agent, task["id"], **{"Idempotency-Key": "k-1"})
            with openbao.client(body["env"]["VAULT_TOKEN"]) as vault:
                assert vault.get("/v1/secret/data/demo/hello").status_code == 200
            replay = agent.post(
                f"/v1/tasks/{task['id']}/credentials", headers={"Idempotency-Key": "k-1"}
            )
            assert replay.status_code == 409
            assert replay.json()["credential_id"] == body["credential_id"]
    finally:
        proxy.down()


def test_broker_signed_tokens_verify_by_jwks_and_introspect_until_completed(
    issuer: TestIssuer, make_settings: Any, scopes: Path
) -> None:
    """The JWT verifies against /.well-known/jwks.json; RFC 7662 introspection says active with
    its claims, then ``{"active": false}`` once the task is completed; each introspection is a
    use in the task's trace; introspection needs a session."""
    settings = settings_for(make_settings, issuer, scopes_dir=scopes)
    with running(settings) as (broker, client):
        people = cast(client, issuer)
        agent = people.agent
        service = login(client, issuer, "internal-api-svc", broker_roles=["agent"])
        task = agent.request("internal-api").json()
        body = mint_ok(agent, task["id"])
        token = body["env"]["BROKER_JWT"]
        jwks = client.get("/.well-known/jwks.json")
        assert jwks.status_code == 200
        assert jwks.headers["content-type"].startswith("application/jwk-set+json")
        keyset = jwt.PyJWKSet.from_dict(jwks.json())
        header = jwt.get_unverified_header(token)
        assert header["typ"] == "at+jwt"
        key = next(k for k in keyset.keys if k.key_id == header["kid"])
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[header["alg"]],
            audience="internal-api",
            issuer=settings.public_url,
        )
        assert claims["sub"] == "agent-1" and claims["team"] == "platform"
        assert claims["jti"] == body["credential_id"] and claims["broker_task"] == task["id"]
        assert claims["exp"] - claims["iat"] <= 600

        def introspect(who: Person | None, value: str) -> httpx.Response:
            headers = who.auth if who else {}
            return client.post("/oauth2/introspect", data={"token": value}, headers=headers)

        active = introspect(service, token)
        assert active.status_code == 200 and active.headers["cache-control"] == "no-store"
        answer = active.json()
        assert answer["active"] is True
        assert answer["sub"] == "agent-1" and answer["aud"] == "internal-api"
        assert answer["scope"] == "internal-api" and answer["jti"] == body["credential_id"]
        assert introspect(None, token).status_code == 401
        assert introspect(service, "not.a.token").json() == {"active": False}
        forged = jwt.encode({"jti": body["credential_id"]}, "s" * 32, algorithm="HS256")
        assert introspect(service, forged).json() == {"active": False}

        assert agent.post(f"/v1/tasks/{task['id']}/complete").status_code == 200
        assert introspect(service, token).json() == {"active": False}
        uses = [e for e in events(broker, task["id"]) if e["name"] == "broker.credential.use"]
        assert [e["attributes"]["broker.use.source"] for e in uses] == ["introspection"] * 2
        assert {e["trace_id"] for e in uses} == {task["trace_id"]}


def test_operators_kill_tasks_and_roles_and_see_pending_revocations(
    openbao: OpenBao, moto_server: Moto, issuer: TestIssuer, make_settings: Any
) -> None:
    """Only admins reach /v1/admin; an admin kill revokes the task's Vault token at once; the
    role-wide AWS kill switch is set and lifted; the reaper and backends are visible."""
    settings = settings_for(
        make_settings,
        issuer,
        vault=openbao.vault_settings(),
        aws=AwsSettings(endpoint_url=moto_server.endpoint, kill_switch_policy="broker-kill-api"),
    )
    with running(settings) as (_, client):
        agent = cast(client, issuer).agent
        admin = login(client, issuer, "ada", broker_roles=["admin"])
        denied = agent.get("/v1/admin/credentials")
        assert denied.status_code == 403 and denied.json()["code"] == "admin_required"

        task = agent.request("vault-kv-read").json()
        token = mint_ok(agent, task["id"])["env"]["VAULT_TOKEN"]
        killed = admin.post(f"/v1/admin/tasks/{task['id']}/revoke", json={"reason": "incident 7"})
        assert killed.status_code == 200, killed.text
        assert killed.json()["task"]["state"] == "revoked"
        assert [c["state"] for c in killed.json()["credentials"]] == ["revoked"]
        with openbao.client(token) as vault:
            assert vault.get("/v1/auth/token/lookup-self").status_code == 403
        assert agent.task(task["id"])["state"] == "revoked"

        listed = admin.get("/v1/admin/credentials", params={"state": "revoked"}).json()
        assert task["id"] in {c["task_id"] for c in listed}
        assert admin.get("/v1/admin/credentials", params={"state": "revoke_pending"}).json() == []

        role = "arn:aws:iam::123456789012:role/broker-deploy"
        made = admin.post("/v1/admin/kill-switches", json={"role_arn": role, "reason": "leak"})
        assert made.status_code == 201, made.text
        [entry] = made.json()["kill_switches"]
        assert entry["kind"] == "issued_before" and entry["created_by"].endswith("#ada")
        assert [e["id"] for e in admin.get("/v1/admin/kill-switches").json()] == [entry["id"]]
        lifted = admin.post(f"/v1/admin/kill-switches/{entry['id']}/lift", json={"reason": "ok"})
        assert lifted.status_code == 200 and lifted.json()["lifted_at"]
        assert admin.get("/v1/admin/kill-switches").json() == []
        bad = admin.post("/v1/admin/kill-switches", json={"reason": "neither"})
        assert bad.status_code == 422

        # Per task: the task is killed and its STS sessions denied by their SourceIdentity.
        s3 = agent.request("aws-s3-read", {"bucket": "example-data-logs", "prefix": "x"}).json()
        identity = mint_ok(agent, s3["id"])["details"]["source_identity"]
        made = admin.post("/v1/admin/kill-switches", json={"task_id": s3["id"], "reason": "odd"})
        assert made.status_code == 201, made.text
        assert made.json()["task"]["state"] == "revoked"
        [entry] = made.json()["kill_switches"]
        assert (entry["kind"], entry["value"]) == ("source_identity", identity)
        assert entry["created_by"].endswith("#ada")

        report = admin.post("/v1/admin/reaper/run").json()
        assert report["orphan_scan"] is True and report["errors"] == []
        status = admin.get("/v1/admin/reaper").json()
        assert status["passes"] >= 1 and "revoke_pending" in status
        backends = admin.get("/v1/admin/backends").json()
        assert backends["vault"]["health"] == "ok" and backends["aws_sts"]["health"] == "ok"
        assert backends["broker_jwt"]["health"] == "ok"
        assert openbao.broker_token not in str(backends)
