"""A mint that fails is told for what it is, and a task that never got its credential ends
``failed``, over real HTTP against the real OpenBao."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from tests.api.flows import Clock, events, login, running, scope_folder, settings_for
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

TEMPLATE = """\
name: {name}
description: Read the team's secrets.
owner: team-{name}
backend:
  type: vault_token
  policies: [{policy}]
requester:
  all:
    - claim: groups
      one_of: [developers]
ttl:
  default: 600
  max: 1200
max_active_tasks: 10
risk: low
approval:
  mode: auto
  approval_ttl: 600
"""


def test_a_misconfigured_scope_fails_as_such_and_the_task_ends_failed(
    tmp_path: Path, issuer: TestIssuer, make_settings: Any, openbao: OpenBao
) -> None:
    """A scope naming a policy OpenBao lacks: each mint is 500 scope_misconfigured naming the
    scope and its owner but not the policy; the task stays approved (nothing was issued) with
    the failed attempt on GET /v1/tasks/{id}; /readyz stays ready and names the cause; the
    third failure ends the task failed (a fourth mint is refused). Once the admin creates the
    policy and allows it, the next task mints at once and /readyz forgets the problem."""
    policy = f"kv-team-{secrets.token_hex(3)}"
    folder = scope_folder(tmp_path, ("kv-team", TEMPLATE.format(name="kv-team", policy=policy)))
    settings = settings_for(make_settings, issuer, folder, vault=openbao.vault_settings())
    with running(settings) as (broker, client):
        agent = login(client, issuer, "agent-1", groups=["developers"], broker_roles=["agent"])
        task = agent.request("kv-team").json()
        assert task["state"] == "approved"
        first = agent.mint(task["id"])
        assert first.status_code == 500
        problem = first.json()
        assert problem["code"] == "scope_misconfigured"
        assert (
            "'kv-team' is misconfigured" in problem["detail"] and problem["owner"] == "team-kv-team"
        )
        assert policy not in first.text
        seen = agent.task(task["id"])
        assert seen["state"] == "approved"
        assert [(c["state"], c["error_code"]) for c in seen["credentials"]] == [
            ("failed", "scope_misconfigured")
        ]
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert policy in ready.json()["scopes"]["kv-team"]["cause"]

        assert agent.mint(task["id"]).status_code == 500
        assert agent.mint(task["id"]).status_code == 500
        ended = agent.task(task["id"])
        assert ended["state"] == "failed"
        assert "3 mints failed" in ended["reason"]
        assert agent.mint(task["id"]).json()["code"] == "task_not_approved"
        end = [e for e in events(broker, task["id"]) if e["name"] == "broker.task.complete"]
        assert [(e["outcome"], e["attributes"]["broker.task.state"]) for e in end] == [
            ("failure", "failed")
        ]

        with openbao.client() as root:
            role = root.get("/v1/auth/token/roles/broker-child").json()["data"]
            root.put(
                f"/v1/sys/policies/acl/{policy}",
                json={"policy": 'path "secret/data/demo/*" { capabilities = ["read"] }'},
            )
            root.post(
                "/v1/auth/token/roles/broker-child",
                json={"allowed_policies": [*role["allowed_policies"], policy]},
            )
            try:
                fresh = agent.request("kv-team").json()
                minted = agent.mint(fresh["id"])
                assert minted.status_code == 201, minted.text
            finally:
                root.post(
                    "/v1/auth/token/roles/broker-child",
                    json={"allowed_policies": role["allowed_policies"]},
                )
        assert client.get("/readyz").json()["scopes"] == {}


def test_ending_a_task_whose_mint_failed_says_failed_never_completed(
    tmp_path: Path, issuer: TestIssuer, make_settings: Any, openbao: OpenBao
) -> None:
    """Completing an approved task after a failed mint ends it failed (with why), not completed;
    an approval that expires after a failed mint ends it failed too."""
    folder = scope_folder(
        tmp_path, ("kv-gone", TEMPLATE.format(name="kv-gone", policy="kv-gone-nowhere"))
    )
    clock = Clock()
    settings = settings_for(make_settings, issuer, folder, vault=openbao.vault_settings())
    with running(settings, clock=clock) as (broker, client):
        agent = login(client, issuer, "agent-2", groups=["developers"], broker_roles=["agent"])
        task = agent.request("kv-gone").json()
        assert agent.mint(task["id"]).status_code == 500
        done = agent.post(f"/v1/tasks/{task['id']}/complete").json()
        assert done["state"] == "failed"
        assert done["reason"].startswith("no credential was issued: minting failed (1 attempt")

        later = agent.request("kv-gone").json()
        assert agent.mint(later["id"]).status_code == 500
        clock.advance(601)
        broker.tasks.expire_due()
        assert agent.task(later["id"])["state"] == "failed"
