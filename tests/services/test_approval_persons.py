"""N approvers are N people, against a real `broker serve`.

Issuers name the claims that identify a person across identities (``claims.person``): the
people's identity provider a verified e-mail and the GitHub login, HR's directory a verified
e-mail, the GitHub Actions preset the ``actor`` who triggered the run. Distinct approvers are
counted by person, the requester's person (the actor) cannot approve, an e-mail without
``email_verified`` is no person, and an issuer without a person claim keeps the
(issuer, subject) rule.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store import Database, repo
from tests.oidc.test_presets import github_claims
from tests.support.issuer import TestIssuer
from tests.support.serve import bearer, open_session, serve

pytestmark = pytest.mark.integration

TWO_PEOPLE = """\
name: two-people
description: Read the demo secrets once two reviewers agreed.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{1,128}"
ttl:
  default: 600
  max: 900
max_active_tasks: 50
risk: high
approval:
  mode: manual
  count: 2
  approvers:
    all:
      - claim: groups
        equals: reviewers
"""


@dataclass
class Node:
    url: str
    base: Path
    ci: TestIssuer
    people: TestIssuer
    hr: TestIssuer
    plain: TestIssuer

    def approvals(self, task_id: str) -> list[Any]:
        db = Database(f"sqlite:///{self.base / 'broker.db'}")
        try:
            with db.read() as conn:
                return repo.approvals_for(conn, task_id)
        finally:
            db.dispose()

    def refusal_codes(self, task_id: str) -> list[str]:
        db = Database(f"sqlite:///{self.base / 'broker.db'}")
        try:
            with db.read() as conn:
                rows = repo.audit_events(conn, task_id=task_id, name="broker.approval.refused")
        finally:
            db.dispose()
        return [e["attributes"]["broker.refusal.code"] for e in rows if e["outcome"] == "denied"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    """`broker serve` with a GitHub Actions issuer (agents) and three issuers of people."""
    idps = [TestIssuer().start() for _ in range(4)]
    ci, people, hr, plain = idps
    base = tmp_path_factory.mktemp("persons")

    def human(idp: TestIssuer, name: str, person: list[str]) -> dict[str, Any]:
        return idp.issuer_config(
            name=name, roles=[], claims={"roles": "broker_roles", "person": person}
        )

    try:
        with serve(
            base,
            ci,
            scopes={"two-people": TWO_PEOPLE},
            issuers=[
                ci.issuer_config(
                    name="ci",
                    preset="github-actions",
                    algorithms=["ES256"],
                    trust={"all": [{"claim": "repository_owner_id", "equals": "7"}]},
                ),
                human(people, "people", ["email", "github_login"]),
                human(hr, "hr", ["email"]),
                plain.issuer_config(name="plain", roles=[], claims={"roles": "broker_roles"}),
            ],
        ) as cluster:
            yield Node(cluster.urls[0], base, ci, people, hr, plain)
    finally:
        for idp in idps:
            idp.stop()


def ci_session(client: httpx.Client, node: Node, actor: str) -> str:
    """A GitHub Actions job of acme/api triggered by ``actor``."""
    claims = github_claims(node.ci, 0, actor=actor)
    for name in ("iss", "aud", "iat", "exp", "nbf", "sub", "jti"):
        claims.pop(name, None)
    return open_session(client, node.ci.token("repo:acme/api:ref:refs/heads/main", **claims))


def reviewer(client: httpx.Client, idp: TestIssuer, sub: str, **claims: Any) -> str:
    token = idp.token(sub, groups=["reviewers"], broker_roles=["approver"], **claims)
    return open_session(client, token)


def request(client: httpx.Client, agent: str) -> str:
    resp = client.post(
        "/v1/tasks",
        json={"scope": "two-people", "purpose": "count the people"},
        headers=bearer(agent),
    )
    assert resp.status_code == 201 and resp.json()["state"] == "pending", resp.text
    return str(resp.json()["id"])


def approve(client: httpx.Client, session: str, task_id: str) -> httpx.Response:
    return client.post(
        f"/v1/approvals/{task_id}/approve", json={"reason": "fine"}, headers=bearer(session)
    )


def test_one_person_under_two_identities_approves_once(node: Node) -> None:
    """Alice approves at the people's IdP, then as her HR identity (the same verified e-mail,
    in another case): the second approval is refused (409 ``already_decided``) and the task stays
    pending; Bob's approval makes two people, and the task is approved with the persons recorded
    on each approval."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        task_id = request(client, ci_session(client, node, actor="octocat"))
        alice = reviewer(
            client, node.people, "alice", email="alice@corp.example", email_verified=True
        )
        assert approve(client, alice, task_id).json()["state"] == "pending"
        alice_hr = reviewer(
            client, node.hr, "emp-1001", email="Alice@Corp.Example", email_verified=True
        )
        again = approve(client, alice_hr, task_id)
        assert (again.status_code, again.json()["code"]) == (409, "already_decided")
        assert "one person counts once" in again.json()["detail"]
        listed = client.get("/v1/approvals", headers=bearer(alice_hr)).json()
        assert task_id not in {v["task"]["id"] for v in listed}
        bob = reviewer(client, node.people, "bob", email="bob@corp.example", email_verified=True)
        assert approve(client, bob, task_id).json()["state"] == "approved"
    persons = sorted(a.persons for a in node.approvals(task_id))
    assert persons == [("alice@corp.example",), ("bob@corp.example",)]
    assert node.refusal_codes(task_id) == ["already_decided"]


def test_the_actor_who_triggered_the_run_cannot_approve(node: Node) -> None:
    """A CI job triggered by GitHub user ``octocat`` asks; the person whose IdP identity carries
    ``github_login: octocat`` is refused (403 ``self_approval``, audited) although they are
    another principal; two other people approve."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        task_id = request(client, ci_session(client, node, actor="octocat"))
        octo = reviewer(
            client,
            node.people,
            "oscar",
            email="oscar@corp.example",
            email_verified=True,
            github_login="OctoCat",
        )
        refused = approve(client, octo, task_id)
        assert (refused.status_code, refused.json()["code"]) == (403, "self_approval")
        view = client.get(f"/v1/approvals/{task_id}", headers=bearer(octo)).json()
        assert view["may_decide"] is False and "requested this task" in view["why_not"]
        for name in ("dana", "erin"):
            person = reviewer(
                client, node.people, name, email=f"{name}@corp.example", email_verified=True
            )
            last = approve(client, person, task_id)
        assert last.json()["state"] == "approved"
    assert node.refusal_codes(task_id) == ["self_approval"]


def test_an_unverified_email_is_no_person(node: Node) -> None:
    """At an issuer whose person claim is the e-mail, a token whose e-mail is not verified
    names nobody: its approval is refused (403 ``person_unknown``), so an unverified address can
    never stand in for a second person."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        task_id = request(client, ci_session(client, node, actor="someone"))
        mallory = reviewer(
            client, node.hr, "emp-666", email="alice@corp.example", email_verified=False
        )
        refused = approve(client, mallory, task_id)
        assert (refused.status_code, refused.json()["code"]) == (403, "person_unknown")
        assert "email_verified" in refused.json()["detail"]
    assert node.approvals(task_id) == []


def test_without_a_person_claim_identities_are_told_apart_by_subject(node: Node) -> None:
    """An issuer naming no person claim keeps the (issuer, subject) rule: two of its subjects
    are two approvers (the docs say so), and a subject approving twice is refused."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        task_id = request(client, ci_session(client, node, actor="someone"))
        first = reviewer(client, node.plain, "p-1")
        assert approve(client, first, task_id).json()["state"] == "pending"
        twice = approve(client, reviewer(client, node.plain, "p-1"), task_id)
        assert (twice.status_code, twice.json()["code"]) == (409, "already_decided")
        assert (
            approve(client, reviewer(client, node.plain, "p-2"), task_id).json()["state"]
            == "approved"
        )
    assert [a.persons for a in node.approvals(task_id)] == [None, None]
