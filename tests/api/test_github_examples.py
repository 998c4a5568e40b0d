"""The GitHub example templates end to end over HTTP, minting from the GitHub contract stand-in
(GitHub's OpenAPI description under prism): decided as written (two maintainers for the admin
scope), minted with GitHub's expiry, refused and audited when the installation does not hold
what is asked, revoked by DELETE at task end (also by a broker restarted in between), and
recorded 'expired', never 'revoked', once GitHub's hour has passed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from broker.settings import GitHubAppSettings
from broker.store import repo
from tests.api.flows import Clock, cast, events, login, running, scope_folder, settings_for
from tests.backends.github_helpers import app_key
from tests.support.github_contract import EXAMPLE_TOKEN, GitHubStandIn
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration

NOT_HELD = """\
name: github-actions-write
description: Asks for a permission the example installation does not hold.
owner: tests
backend:
  type: github_app
  owner: octo-org
  repositories: [Hello-World]
  permissions:
    actions: write
requester:
  all:
    - claim: groups
      one_of: [developers]
ttl: {default: 900, max: 3600}
"""


def github_settings(
    make_settings: Any, issuer: TestIssuer, github_api: GitHubStandIn, tmp_path: Path
) -> Any:
    key_file, _ = app_key(tmp_path)
    return settings_for(
        make_settings,
        issuer,
        scopes_dir=scope_folder(tmp_path, ("github-actions-write", NOT_HELD)),
        github=GitHubAppSettings(
            app_id=12345,
            private_key_file=key_file,
            api_url=github_api.url,
            git_url="https://github.example",
        ),
    )


def credential(broker: Any, credential_id: str) -> Any:
    with broker.db.read() as conn:
        return repo.get_credential(conn, credential_id)


def test_the_github_examples_decide_mint_and_revoke(
    github_api: GitHubStandIn, issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """github-pull-request mints at once; github-admin waits for two distinct maintainers (the
    requester never counts), then mints; github-read-repo is approved at once, and its mint is
    refused because the stand-in's canned grant is wider than contents: read. Each credential expires when GitHub
    says, the task ends no later than its TTL, and completing the task revokes the token: the
    record says revoked, its sealed copy is gone, and no event holds the token."""
    settings = github_settings(make_settings, issuer, github_api, tmp_path)
    with running(settings) as (broker, client):
        people = cast(client, issuer)
        m1 = login(client, issuer, "mo", groups=["maintainers"], broker_roles=["approver"])
        m2 = login(client, issuer, "meg", groups=["maintainers"], broker_roles=["approver"])
        minted = []
        for scope in ("github-pull-request", "github-admin"):
            task = people.agent.request(scope, {"repo": "Hello-World"}).json()
            if scope == "github-admin":
                assert task["state"] == "pending"
                assert m1.approve(task["id"]).json()["state"] == "pending"
                assert m2.approve(task["id"]).json()["state"] == "approved"
            else:
                assert task["state"] == "approved"
            resp = people.agent.mint(task["id"])
            assert resp.status_code == 201, resp.text
            body = resp.json()
            assert body["secret"] == {"token": EXAMPLE_TOKEN}
            assert body["env"]["GH_TOKEN"] == EXAMPLE_TOKEN
            assert body["expires_at"] == int(github_api.token_expires_at)
            assert people.agent.task(task["id"])["ends_at"] <= body["expires_at"]
            minted.append((task, body))
        # The read scope asks for contents: read; the stand-in's one canned grant is contents
        # and pull requests write, wider than asked: the broker deletes it and issues nothing.
        read = people.agent.request("github-read-repo", {"repo": "Hello-World"}).json()
        assert read["state"] == "approved"
        refused = people.agent.mint(read["id"])
        assert refused.status_code == 503
        assert "wider" in refused.json()["detail"]
        for task, body in minted:
            (issued,) = [
                e
                for e in events(broker, task["id"])
                if e["name"] == "broker.credential.issue" and e["outcome"] == "success"
            ]
            # GitHub's audit log joins on hashed_token: it is on the span and is the handle.
            assert issued["attributes"]["broker.credential.hashed_token"] == (
                credential(broker, body["credential_id"]).handle
            )
            assert people.agent.post(f"/v1/tasks/{task['id']}/complete").status_code == 200
            cred = credential(broker, body["credential_id"])
            assert cred.state.value == "revoked"
            assert cred.sealed is None
        for event in events(broker):
            assert EXAMPLE_TOKEN not in str(event)


def test_what_the_installation_does_not_hold_mints_nothing_and_is_audited(
    github_api: GitHubStandIn, issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """actions: write is not held by the installation: the mint is refused with a stable code,
    the credential is 'failed', and the refusal is a broker.credential.issue failure event."""
    settings = github_settings(make_settings, issuer, github_api, tmp_path)
    with running(settings) as (broker, client):
        agent = cast(client, issuer).agent
        task = agent.request("github-actions-write").json()
        resp = agent.mint(task["id"])
        assert resp.status_code == 400
        assert resp.json()["code"] == "github_permission_not_granted"
        failures = [
            e
            for e in events(broker, task["id"])
            if e["name"] == "broker.credential.issue" and e["outcome"] == "failure"
        ]
        assert [f["attributes"]["broker.error.code"] for f in failures] == [
            "github_permission_not_granted"
        ]
        with broker.db.read() as conn:
            (cred,) = repo.credentials_for(conn, task["id"])
        assert cred.state.value == "failed"


def test_a_restarted_broker_revokes_what_the_last_one_minted(
    github_api: GitHubStandIn, issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """The token is sealed in the store under the key file, not held in one process's memory:
    a broker started after the minting one stopped revokes it when the task completes."""
    settings = github_settings(make_settings, issuer, github_api, tmp_path)
    with running(settings) as (_, client):
        agent = cast(client, issuer).agent
        task = agent.request("github-pull-request", {"repo": "Hello-World"}).json()
        assert agent.mint(task["id"]).status_code == 201
    with running(settings) as (broker, client):
        assert agent.token
        agent.client = client
        assert agent.post(f"/v1/tasks/{task['id']}/complete").status_code == 200
        with broker.db.read() as conn:
            (cred,) = repo.credentials_for(conn, task["id"])
        assert cred.state.value == "revoked"


def test_after_github_s_hour_the_credential_is_expired_not_revoked(
    github_api: GitHubStandIn, issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """Once GitHub's expires_at has passed, the reaper ends the task and the credential is
    recorded 'expired' with a broker.credential.expire event: nothing was taken back, so
    nothing says 'revoked'."""
    settings = github_settings(make_settings, issuer, github_api, tmp_path)
    clock = Clock()
    with running(settings, clock=clock) as (broker, client):
        agent = cast(client, issuer).agent
        task = agent.request("github-pull-request", {"repo": "Hello-World"}).json()
        body = agent.mint(task["id"]).json()
        clock.advance(github_api.token_expires_at - clock() + 120)
        broker.reaper.run_once(orphan_scan=False)
        cred = credential(broker, body["credential_id"])
        assert cred.state.value == "expired"
        assert cred.sealed is None
        names = [e["name"] for e in events(broker, task["id"])]
        assert "broker.credential.expire" in names
        assert not any(
            e["name"] == "broker.credential.revoke" and e["outcome"] == "success"
            for e in events(broker, task["id"])
        )
