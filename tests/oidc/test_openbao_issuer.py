"""OpenBao as a real third-party issuer: its identity tokens, discovery and JWKS, over HTTP.

OpenBao signs ID tokens for entities (here: users who logged in through a userpass mount). The
broker discovers OpenBao's keys itself, maps OpenBao's claims to principals and roles, applies
trust rules to them, and follows a key rotation on OpenBao without a restart.
"""

from __future__ import annotations

import base64
import json
import secrets
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker.store import repo
from tests.support.services import OpenBao, live_broker

pytestmark = pytest.mark.integration

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


@dataclass
class BaoIdp:
    """An OIDC issuer set up on the shared OpenBao server, with its own names."""

    bao: OpenBao
    issuer: str
    key: str
    role: str
    other_role: str
    client_id: str
    approvers_group: str
    user_tokens: dict[str, str]
    entity_ids: dict[str, str]

    def id_token(self, user: str, role: str | None = None) -> str:
        with self.bao.client(self.user_tokens[user]) as client:
            resp = client.get(f"/v1/identity/oidc/token/{role or self.role}")
            resp.raise_for_status()
            return str(resp.json()["data"]["token"])

    def issuer_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": "openbao",
            "issuer": self.issuer,
            "audiences": [self.client_id],
            "algorithms": ["ES256", "RS256"],
            "roles": [],
            "claims": {
                "display_name": "username",
                "groups": "groups",
                "role_rules": [
                    {
                        "role": "agent",
                        "when": {"all": [{"claim": "username", "glob": "agent-*"}]},
                    },
                    {
                        "role": "approver",
                        "when": {"all": [{"claim": "groups", "equals": self.approvers_group}]},
                    },
                ],
            },
            "trust": {
                "all": [{"cel": 'claims.namespace == "root"'}],
                "any": [
                    {"claim": "username", "glob": "agent-*"},
                    {"claim": "groups", "equals": self.approvers_group},
                ],
            },
            **overrides,
        }


def _ok(resp: httpx.Response) -> httpx.Response:
    assert resp.status_code < 300, resp.text
    return resp


@pytest.fixture(scope="module")
def bao_idp(openbao: OpenBao) -> BaoIdp:
    """Configure OpenBao's identity tokens: a key, two roles (two audiences), three users."""
    tag = secrets.token_hex(4)
    mount, key, role, other_role = f"up-{tag}", f"broker-{tag}", f"agents-{tag}", f"other-{tag}"
    client_id, group = f"broker-{tag}", f"broker-approvers-{tag}"
    with openbao.client() as root:
        _ok(root.post(f"/v1/sys/auth/{mount}", json={"type": "userpass"}))
        accessor = _ok(root.get("/v1/sys/auth")).json()["data"][f"{mount}/"]["accessor"]
        _ok(
            root.post(
                f"/v1/identity/oidc/key/{key}",
                json={
                    "algorithm": "ES256",
                    "allowed_client_ids": ["*"],
                    "rotation_period": "24h",
                    "verification_ttl": "1h",
                },
            )
        )
        template = (
            f'{{"username": {{{{identity.entity.aliases.{accessor}.name}}}}, '
            '"groups": {{identity.entity.groups.names}}}'
        )
        for name, cid in ((role, client_id), (other_role, f"other-{tag}")):
            _ok(
                root.post(
                    f"/v1/identity/oidc/role/{name}",
                    json={
                        "key": key,
                        "client_id": cid,
                        "ttl": "10m",
                        "template": base64.b64encode(template.encode()).decode(),
                    },
                )
            )
        policy = 'path "identity/oidc/token/*" { capabilities = ["read"] }'
        _ok(root.put(f"/v1/sys/policies/acl/oidc-{tag}", json={"policy": policy}))
        tokens, entities = {}, {}
        for user in ("agent-alice", "human-bob", "mallory"):
            _ok(
                root.post(
                    f"/v1/auth/{mount}/users/{user}",
                    json={"password": "pw-" + tag, "token_policies": [f"oidc-{tag}"]},
                )
            )
            auth = _ok(
                root.post(f"/v1/auth/{mount}/login/{user}", json={"password": "pw-" + tag})
            ).json()["auth"]
            tokens[user], entities[user] = auth["client_token"], auth["entity_id"]
        _ok(
            root.post(
                "/v1/identity/group",
                json={"name": group, "member_entity_ids": [entities["human-bob"]]},
            )
        )
    return BaoIdp(
        bao=openbao,
        issuer=f"{openbao.addr}/v1/identity/oidc",
        key=key,
        role=role,
        other_role=other_role,
        client_id=client_id,
        approvers_group=group,
        user_tokens=tokens,
        entity_ids=entities,
    )


def exchange(client: httpx.Client, token: str) -> httpx.Response:
    return client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
    )


def whoami(client: httpx.Client, session_token: str) -> dict[str, Any]:
    resp = client.get("/v1/sessions/current", headers={"Authorization": f"Bearer {session_token}"})
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def kid_of(token: str) -> str:
    head = token.split(".", maxsplit=1)[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"])


def test_openbao_tokens_open_sessions_with_roles_from_claims(
    bao_idp: BaoIdp, make_settings: Any
) -> None:
    """An agent's and an approver's OpenBao identity tokens become sessions: identity is
    (OpenBao's issuer, entity id), roles come from OpenBao's claims (username, groups);
    a user the trust rules do not admit is refused, and the refusal is audited."""
    settings = make_settings(issuers=[bao_idp.issuer_config()])
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        resp = exchange(client, bao_idp.id_token("agent-alice"))
        assert resp.status_code == 200, resp.text
        me = whoami(client, resp.json()["access_token"])
        assert (me["issuer"], me["subject"]) == (bao_idp.issuer, bao_idp.entity_ids["agent-alice"])
        assert me["display_name"] == "agent-alice"
        assert me["roles"] == ["agent"]

        resp = exchange(client, bao_idp.id_token("human-bob"))
        assert resp.status_code == 200, resp.text
        me = whoami(client, resp.json()["access_token"])
        assert me["roles"] == ["approver"]
        assert bao_idp.approvers_group in me["groups"]

        mallory = bao_idp.id_token("mallory")
        resp = exchange(client, mallory)
        assert resp.status_code == 400
        assert resp.json()["code"] == "untrusted_token"
        assert resp.json()["error"] == "invalid_request"

        with broker.db.read() as conn:
            failures = [
                e for e in repo.audit_events(conn, limit=1000) if e["name"] == "broker.auth.failure"
            ]
        assert failures[-1]["actor_subject"] == bao_idp.entity_ids["mallory"]
        assert failures[-1]["actor_issuer"] == bao_idp.issuer
        attrs = failures[-1]["attributes"]
        assert attrs["broker.auth.reason"] == "untrusted_token"
        assert len(attrs["broker.auth.token_sha256"]) == 64
        assert mallory not in json.dumps(failures)


def test_openbao_token_for_another_audience_or_tampered_is_refused(
    bao_idp: BaoIdp, make_settings: Any
) -> None:
    """A genuine OpenBao token minted for another client id is not for the broker; a genuine
    token with one claim changed no longer matches OpenBao's signature."""
    settings = make_settings(issuers=[bao_idp.issuer_config()])
    with (
        live_broker(settings) as (server, _),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        resp = exchange(client, bao_idp.id_token("agent-alice", bao_idp.other_role))
        assert resp.status_code == 400
        assert resp.json()["code"] == "audience_mismatch"

        head, body, sig = bao_idp.id_token("agent-alice").split(".")
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        claims["username"] = "agent-root"
        forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        resp = exchange(client, f"{head}.{forged}.{sig}")
        assert resp.status_code == 400
        assert resp.json()["code"] == "invalid_signature"


def test_key_rotation_on_openbao_is_followed_without_restart(
    bao_idp: BaoIdp, make_settings: Any
) -> None:
    """After OpenBao rotates its signing key, the very first token signed with the new key is
    accepted by the running broker, and tokens signed before the rotation still are (OpenBao
    keeps publishing the old key for its verification TTL)."""
    settings = make_settings(issuers=[bao_idp.issuer_config()])
    with (
        live_broker(settings) as (server, _),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        before = bao_idp.id_token("agent-alice")
        assert exchange(client, before).status_code == 200
        with bao_idp.bao.client() as root:
            _ok(root.post(f"/v1/identity/oidc/key/{bao_idp.key}/rotate"))
        after = bao_idp.id_token("agent-alice")
        assert kid_of(after) != kid_of(before)
        resp = exchange(client, after)
        assert resp.status_code == 200, resp.text
        assert exchange(client, before).status_code == 200
