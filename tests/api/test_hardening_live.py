"""Backend hardening against a real ``python -m broker serve`` on PostgreSQL with the real
OpenBao: forbidden policies compared as Vault sees them, and the grant shown to approvers.

(The lost-mint confirmation runs against ``broker serve`` in ``tests/services/test_crash.py``;
redaction is the client's, exercised by ``broker exec`` and ``broker mcp`` against a live broker
in ``tests/cli`` and ``tests/mcp``.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store.migrate import upgrade
from tests.replicas.cluster import (
    Cluster,
    base_config,
    login,
    mint,
    request_task,
    scope_folder,
    vault_config,
)
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao, pg_database

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

EXTRA_SCOPES = {
    # A parameter picks the policy, within kv-*; the admin forbade kv-write.
    "kv-pick": """\
name: kv-pick
description: Read the demo secrets with a policy the agent picks among kv-*.
owner: platform-team
backend:
  type: vault_token
  policies: ["{{params.policy}}"]
  maximum:
    policies: ["kv-*"]
parameters:
  policy:
    description: The policy.
    pattern: "[A-Za-z-]{2,20}"
requester:
  all:
    - claim: sub
      regex: ".+"
ttl:
  default: 600
  max: 900
risk: low
approval:
  mode: auto
""",
    # Vault reads "Root" as root: the template is refused when loaded.
    "kv-rooted": """\
name: kv-rooted
description: A template that asks for root in capitals.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read, Root]
requester:
  all:
    - claim: sub
      regex: ".+"
ttl:
  default: 600
  max: 900
risk: low
approval:
  mode: auto
""",
}


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, pg_store: str, issuer: TestIssuer, openbao: OpenBao
) -> Iterator[httpx.Client]:
    base: Path = tmp_path_factory.mktemp("hardening")
    upgrade(pg_store)
    config = base_config(
        database_url=pg_store,
        issuer=issuer,
        scopes_dir=scope_folder(base, EXTRA_SCOPES),
        vault={
            **vault_config(openbao.addr, openbao.broker_token),
            "forbidden_policies": [" KV-Write"],
        },
    )
    cluster = Cluster(base, config, count=1)
    try:
        cluster.start()
    except Exception:
        print(cluster.logs())
        cluster.stop()
        raise
    (client,) = cluster.clients()
    try:
        yield client
    finally:
        client.close()
        cluster.stop()


@pytest.fixture(scope="module")
def pg_store(pg_admin_ok: None) -> Iterator[str]:
    """One fresh PostgreSQL database for this module's broker."""
    with pg_database() as url:
        yield url


def test_forbidden_policies_are_refused_in_any_spelling_by_a_running_broker(
    node: httpx.Client, issuer: TestIssuer, openbao: OpenBao
) -> None:
    """With ``vault.forbidden_policies: [" KV-Write"]``: a request whose parameter spells
    ``KV-WRITE``, ``kv-write`` or ``ROOT`` is refused (422 ``forbidden_policy``) before anything
    exists; ``KV-Read`` mints a token whose policy is the normalised ``kv-read``; a template
    naming ``Root`` is not served at all."""
    agent = login(node, issuer, "policy-agent")
    for spelling in ("KV-WRITE", "kv-write", "ROOT", "Root"):
        refused = request_task(node, agent, "kv-pick", {"policy": spelling})
        assert refused.status_code == 422, refused.text
        assert refused.json()["code"] == "forbidden_policy"
    task = request_task(node, agent, "kv-pick", {"policy": "KV-Read"})
    assert task.status_code == 201, task.text
    minted = mint(node, agent, task.json()["id"])
    assert minted.status_code == 201, minted.text
    token = minted.json()["secret"]["token"]
    with openbao.client() as root:
        info = root.post("/v1/auth/token/lookup", json={"token": token}).json()["data"]
    assert info["policies"] == ["default", "kv-read"]
    scopes = node.get("/v1/scopes", headers=agent.auth).json()
    names = {s["name"] for s in (scopes if isinstance(scopes, list) else scopes["scopes"])}
    assert "kv-pick" in names and "kv-rooted" not in names
    gone = request_task(node, agent, "kv-rooted")
    assert (gone.status_code, gone.json()["code"]) == (404, "unknown_scope")


def test_a_running_broker_shows_approvers_the_rendered_grant(
    node: httpx.Client, issuer: TestIssuer
) -> None:
    """``GET /v1/approvals/{task}`` on ``broker serve``: the deploy role, the requested
    environment and change ticket as session tags, beside the template's placeholders."""
    agent = login(node, issuer, "deploy-agent", groups=["release"])
    approver = login(node, issuer, "rm-1", groups=["release-managers"], broker_roles=["approver"])
    params: dict[str, Any] = {"environment": "production", "change": "CHG-5150"}
    task = request_task(node, agent, "aws-deploy", params)
    assert task.status_code == 201, task.text
    detail = node.get(f"/v1/approvals/{task.json()['id']}", headers=approver.auth).json()
    grant = detail["grant"]
    assert grant["role_arn"] == "arn:aws:iam::123456789012:role/broker-deploy"
    assert grant["session_tags"]["environment"] == "production"
    assert grant["session_tags"]["change"] == "CHG-5150"
    assert detail["template_backend"]["tags"]["change"] == "{{params.change}}"
    assert agent.token not in json.dumps(detail)
