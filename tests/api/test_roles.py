"""Roles mean something, and a session works only where it was opened: against `broker serve`.

Every route of the API is tried by principals holding exactly one role (or none): only agents
reach the agents' routes (scopes, tasks, credentials, runs), only approvers the approvals, only
auditors the audit record, only admins the admin routes; each refusal names the missing role and
where roles are configured, and is audited. A console session's cookie is refused as an API
bearer token, and an API session's token drives nothing in the console.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store import Database, repo
from tests.console.stack import DevIssuer, dev_issuer, sign_in
from tests.replicas.cluster import wait_until
from tests.support.issuer import TestIssuer
from tests.support.serve import bearer, open_session, serve

pytestmark = pytest.mark.integration

ROLES = ("agent", "approver", "auditor", "admin")

#: (method, path, body, the role the route needs)
ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/v1/scopes", None, "agent"),
    ("GET", "/v1/scopes/vault-kv-read", None, "agent"),
    ("POST", "/v1/tasks", {"scope": "vault-kv-read", "purpose": "roles"}, "agent"),
    ("GET", "/v1/tasks", None, "agent"),
    ("GET", "/v1/tasks/{task}", None, "agent"),
    ("POST", "/v1/tasks/{task}/credentials", None, "agent"),
    (
        "POST",
        "/v1/tasks/{task}/exec",
        {"command": ["true"], "exit_code": 0, "started_at": 1, "ended_at": 2},
        "agent",
    ),
    ("POST", "/v1/tasks/{task}/complete", None, "agent"),
    ("POST", "/v1/tasks/{task}/cancel", None, "agent"),
    ("GET", "/v1/approvals", None, "approver"),
    ("GET", "/v1/approvals/{pending}", None, "approver"),
    ("POST", "/v1/approvals/{pending}/approve", {"reason": "ok"}, "approver"),
    ("POST", "/v1/approvals/{pending}/deny", {"reason": "no"}, "approver"),
    ("GET", "/v1/audit/events", None, "auditor"),
    ("GET", "/v1/audit/status", None, "auditor"),
    ("GET", "/v1/audit/verify", None, "auditor"),
    ("GET", "/v1/audit/tasks/{task}/trace", None, "auditor"),
    ("GET", "/v1/admin/credentials", None, "admin"),
    ("GET", "/v1/admin/kill-switches", None, "admin"),
    ("GET", "/v1/admin/backends", None, "admin"),
    ("POST", "/v1/admin/tasks/{task}/revoke", {"reason": "roles"}, "admin"),
]
#: A scope one SRE approves (the approvals routes need a pending task).
REVIEWED = """\
name: roles-reviewed
description: Read the demo secrets after an SRE approved.
owner: platform-team
backend:
  type: vault_token
  policies: [kv-read]
requester:
  all:
    - claim: sub
      regex: "[a-z-]{1,64}"
ttl:
  default: 600
  max: 900
risk: medium
approval:
  mode: manual
  count: 1
  approvers:
    all:
      - claim: groups
        equals: sre
"""
CODES = {
    "agent": "agent_role_required",
    "approver": "not_an_approver",
    "auditor": "auditor_role_required",
    "admin": "admin_required",
}


@pytest.fixture(scope="module")
def people_idp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevIssuer]:
    """The dev issuer people sign in to the console with."""
    with dev_issuer(tmp_path_factory.mktemp("dev-issuer")) as idp:
        yield idp


@dataclass
class Node:
    url: str
    base: Path

    def events(self, name: str) -> list[dict[str, Any]]:
        db = Database(f"sqlite:///{self.base / 'broker.db'}")
        try:
            with db.read() as conn:
                return repo.audit_events(conn, name=name, limit=10_000)
        finally:
            db.dispose()


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, issuer: TestIssuer, people_idp: DevIssuer
) -> Iterator[Node]:
    """`broker serve` trusting the test issuer with no base role (roles from the
    ``broker_roles`` claim only) and the dev issuer for the console."""
    base = tmp_path_factory.mktemp("roles")
    with serve(
        base,
        issuer,
        scopes={"roles-reviewed": REVIEWED},
        issuers=[
            issuer.issuer_config(claims={"roles": "broker_roles"}, roles=[]),
            people_idp.config(),
        ],
        console={"issuer": "dev"},
    ) as cluster:
        yield Node(cluster.urls[0], base)


def call(
    client: httpx.Client, token: str, method: str, path: str, body: dict[str, Any] | None
) -> httpx.Response:
    return client.request(method, path, json=body, headers=bearer(token))


def test_each_route_needs_its_own_role_and_nothing_else(node: Node, issuer: TestIssuer) -> None:
    """A principal holding one role reaches the routes of that role and is refused (403, the
    role's stable code) on every other role's route; the refusal names the missing role, the
    caller's roles and where roles come from, and is audited with the role it lacked (a decision
    on the task it concerns). ``GET /v1/sessions/current`` needs no role."""
    with httpx.Client(base_url=node.url, timeout=30) as client:
        tokens = {
            role: open_session(
                client, issuer.token(f"only-{role}", broker_roles=[role], groups=["sre"])
            )
            for role in ROLES
        }
        tokens["none"] = open_session(client, issuer.token("no-role"))
        made = call(client, tokens["agent"], "POST", "/v1/tasks", ROUTES[2][2])
        assert made.status_code == 201, made.text
        requester = open_session(client, issuer.token("requester", broker_roles=["agent"]))
        asked = call(
            client, requester, "POST", "/v1/tasks", {"scope": "roles-reviewed", "purpose": "r"}
        )
        assert asked.json()["state"] == "pending", asked.text
        ids = {"task": made.json()["id"], "pending": asked.json()["id"]}
        for holder, token in tokens.items():
            me = client.get("/v1/sessions/current", headers=bearer(token))
            assert me.status_code == 200
            assert me.json()["roles"] == ([] if holder == "none" else [holder])
            for method, path, body, needs in ROUTES:
                resp = call(client, token, method, path.format(**ids), body)
                if holder == needs:
                    assert resp.status_code != 403, (holder, path, resp.text)
                    continue
                problem = resp.json()
                assert (resp.status_code, problem["code"]) == (403, CODES[needs]), (holder, path)
                assert problem["missing_role"] == needs
                assert f"do not hold the {needs} role" in problem["detail"]
                assert "claims.role_rules" in problem["detail"]
    denied = node.events("broker.request.denied")
    role_refusals = [e for e in denied if e["attributes"].get("broker.role.required")]
    # Agents' routes (9), admins' (4) and approvers' reads (2), each refused to four principals.
    assert len(role_refusals) == 4 * (9 + 4 + 2)
    assert {e["attributes"]["broker.refusal.code"] for e in role_refusals} == {
        "agent_role_required",
        "admin_required",
        "not_an_approver",
    }
    # A decision is refused on the task it concerns; audit reads record their own refusals.
    decisions = [
        e["attributes"]["broker.refusal.code"]
        for e in node.events("broker.approval.refused")
        if e["outcome"] == "denied"
    ]
    assert decisions.count("not_an_approver") == 4 * 2
    auditor_refusals = [
        e
        for e in denied
        if e["attributes"].get("broker.audit.filter.code") == "auditor_role_required"
    ]
    assert len(auditor_refusals) == 4 * 4


def test_a_console_cookie_is_no_bearer_token_and_an_api_session_drives_no_console(
    node: Node, issuer: TestIssuer
) -> None:
    """A person signed in to the console (an approver) presents the cookie's session token as
    an API bearer token: 401 ``wrong_session_kind`` on every route, audited. An API session of
    an approver set as the console cookie is no sign-in: the approvals page sends the browser to
    sign in and the home page is the sign-in page; audited too."""
    with httpx.Client(base_url=node.url, timeout=30) as browser:
        answer = sign_in(browser, sub="pat", roles=["approver", "agent"], groups="sre")
        assert answer.status_code == 303, answer.text
        cookie = browser.cookies["broker_console"]
        assert browser.get("/ui/approvals").status_code == 200
    with httpx.Client(base_url=node.url, timeout=30) as api:
        for path in ("/v1/sessions/current", "/v1/approvals", "/v1/scopes"):
            refused = api.get(path, headers=bearer(cookie))
            assert (refused.status_code, refused.json()["code"]) == (401, "wrong_session_kind")
            assert "console" in refused.json()["detail"]
        approver = open_session(api, issuer.token("quinn", broker_roles=["approver"]))
        assert api.get("/v1/approvals", headers=bearer(approver)).status_code == 200
    with httpx.Client(
        base_url=node.url, timeout=30, cookies={"broker_console": approver}
    ) as forged:
        page = forged.get("/ui/approvals")
        assert page.status_code == 303
        assert page.headers["location"].startswith("/ui/login")
        home = forged.get("/ui")
        assert home.status_code == 200 and "Sign in" in home.text
    reasons = [e["attributes"]["broker.auth.reason"] for e in node.events("broker.auth.failure")]
    # The first refusal from this address is audited in full; the two repeats within the window
    # are counted into one summary event after it (docs/authentication.md, floods).
    assert reasons.count("console_session_used_via_api") == 1

    def repeats() -> int:
        return sum(
            int(e["attributes"]["broker.auth.count"])
            for e in node.events("broker.auth.failure_summary")
            if e["attributes"]["broker.auth.reason"] == "console_session_used_via_api"
        )

    wait_until(lambda: repeats() >= 2, timeout=30, what="the summary of the repeated refusals")
    assert repeats() == 2
    assert reasons.count("api_session_used_via_console") >= 2
    starts = node.events("broker.session.start")
    assert {e["attributes"]["broker.session.via"] for e in starts} == {"api", "console"}
