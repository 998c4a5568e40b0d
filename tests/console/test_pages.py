"""What each person sees: pages by role, what changed in a template since the last approval,
and the approval service's rules applied unchanged (the console adds none of its own)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store import repo
from tests.console.stack import DEPLOY_NOTES, DevIssuer, Stack, console_stack, csrf_of, sign_in

pytestmark = pytest.mark.integration

NOTES = {"environment": "staging", "ticket": "CHG-1"}


@pytest.fixture
def stack(tmp_path: Path, issuer_app: DevIssuer) -> Iterator[Stack]:
    with console_stack(tmp_path, issuer_app) as s:
        yield s


@contextmanager
def person(stack: Stack, sub: str, roles: list[str], groups: str = "") -> Iterator[httpx.Client]:
    """A browser-like client signed in to the console as ``sub``."""
    with httpx.Client(base_url=stack.url) as client:
        answer = sign_in(client, sub=sub, roles=roles, groups=groups)
        assert answer.status_code == 303, answer.text
        yield client


def decide(client: httpx.Client, task_id: str, decision: str, reason: str) -> httpx.Response:
    csrf = csrf_of(client.get(f"/ui/tasks/{task_id}").text)
    return client.post(
        f"/ui/tasks/{task_id}/decision",
        data={"csrf": csrf, "decision": decision, "reason": reason},
    )


def access_events(stack: Stack) -> list[dict[str, Any]]:
    with stack.broker.db.read() as conn:
        rows = repo.audit_events(conn, names=["broker.audit.access", "broker.request.denied"])
    return [{**r["attributes"], "outcome": r["outcome"]} for r in rows]


def test_pages_follow_the_roles_from_the_identity_provider(stack: Stack) -> None:
    """Someone with no approver or auditor role gets a 403 page on the approvals and audit
    pages, naming the missing role and where roles are configured (the audit refusal is audited,
    as in the API); their console session does not reach the task their API session requested
    (a task belongs to the session that asked for it: no list, and a 404 page). An approver
    lands on the approvals page, an auditor on the audit page."""
    agent = stack.agent("dev-1", groups=["developers"], broker_roles=["agent"])
    task = agent.request("deploy-notes", NOTES, "my own request")
    with person(stack, "dev-1", ["agent"], "developers") as client:
        home = client.get("/ui")
        assert home.status_code == 200
        assert task["id"] not in home.text
        assert client.get(f"/ui/tasks/{task['id']}").status_code == 404
        for path in ("/ui/approvals", "/ui/audit"):
            refused = client.get(path)
            assert refused.status_code == 403
            assert "Not for your roles" in refused.text
            assert "claims.role_rules" in refused.text
    refusals = [e for e in access_events(stack) if e["outcome"] == "denied"]
    assert any(e.get("broker.audit.filter.code") == "auditor_role_required" for e in refusals)
    with person(stack, "sam", ["approver"], "sre") as client:
        assert client.get("/ui").headers["location"] == "/ui/approvals"
    with person(stack, "ines", ["auditor"]) as client:
        assert client.get("/ui").headers["location"] == "/ui/audit"


def test_visibility_and_decisions_are_the_approval_services(stack: Stack) -> None:
    """An approver outside the scope's approver group neither sees the task listed nor can
    open it (404, as the API answers), and a decision posted anyway is refused by the service;
    an auditor who is no approver sees the timeline but gets no decision form, and a decision
    posted anyway is refused (not an approver). Each refusal is audited on the task."""
    agent = stack.agent("dev-1", groups=["developers"], broker_roles=["agent"])
    task = agent.request("deploy-notes", NOTES, "to decide")
    with person(stack, "walt", ["approver"], "developers") as client:
        assert task["id"] not in client.get("/ui/approvals").text
        assert client.get(f"/ui/tasks/{task['id']}").status_code == 404
        csrf = csrf_of(client.get("/ui/approvals").text)
        refused = client.post(
            f"/ui/tasks/{task['id']}/decision",
            data={"csrf": csrf, "decision": "approve", "reason": "why not"},
        )
        assert refused.status_code == 404
    with person(stack, "ines", ["auditor"]) as client:
        page = client.get(f"/ui/tasks/{task['id']}")
        assert page.status_code == 200
        assert 'id="timeline"' in page.text
        assert 'id="decide"' not in page.text
        refused = decide(client, task["id"], "approve", "auditors decide nothing")
        assert refused.status_code == 403
        assert "you do not hold the approver role" in refused.text
    assert agent.task(task["id"])["state"] == "pending"
    with stack.broker.db.read() as conn:
        codes = [
            e["attributes"].get("broker.refusal.code")
            for e in repo.audit_events(conn, task_id=task["id"], limit=100)
            if e["outcome"] == "denied"
        ]
    assert "not_an_eligible_approver" in codes
    assert "not_an_approver" in codes


def test_approvers_see_what_changed_in_the_template_since_the_last_approval(
    stack: Stack, tmp_path: Path
) -> None:
    """A request under the same template version as the last approved one says so; after an
    admin widens the template (a longer TTL maximum, a new claim), the next request shows each
    changed setting with its old and new value, and the approvals list flags it. A request whose
    template changed after it was made is marked, and approving it is refused by the service."""
    agent = stack.agent("dev-1", groups=["developers"], broker_roles=["agent"])
    first = agent.request("deploy-notes", NOTES, "first")
    with person(stack, "sam", ["approver"], "sre") as client:
        assert decide(client, first["id"], "approve", "ok").status_code == 303
        second = agent.request("deploy-notes", NOTES, "second")
        page = client.get(f"/ui/tasks/{second['id']}")
        assert 'id="unchanged"' in page.text
        assert first["id"] in page.text

        wider = DEPLOY_NOTES.replace("  max: 1800", "  max: 3600").replace(
            '    ticket: "{{params.ticket}}"\n',
            '    ticket: "{{params.ticket}}"\n    scope: deploy-admin\n',
        )
        (stack.broker.settings.scopes_dir / "deploy-notes.yaml").write_text(wider)
        third = agent.request("deploy-notes", NOTES, "third")
        page = client.get(f"/ui/tasks/{third['id']}")
        changes = re.search(r'<table class="diff" id="changes">(.*?)</table>', page.text, re.S)
        assert changes is not None
        rows = changes.group(1)
        assert "ttl.max" in rows
        assert "1800" in rows
        assert "3600" in rows
        assert "backend.claims.scope" in rows
        assert '<tr class="added">' in rows
        listed = client.get("/ui/approvals").text
        assert "changed since the last approval" in listed

        # The second request was made under the old version: it can no longer be approved.
        stale = client.get(f"/ui/tasks/{second['id']}")
        assert "the template changed since the request" in stale.text.lower() or (
            "it can no longer be approved as requested" in stale.text
        )
        refused = decide(client, second["id"], "approve", "still fine?")
        assert refused.status_code == 412
        assert "the scope template changed after the request" in refused.text
    assert agent.task(second["id"])["state"] == "denied"


def test_the_audit_search_explains_bad_input_and_points_at_what_it_found(stack: Stack) -> None:
    """A time that is not a time is a 400 page with the reason (no 5xx); searching for a task
    or a credential links to its timeline; every search is recorded as an audit read with its
    filters."""
    agent = stack.agent("dev-1", groups=["developers"], broker_roles=["agent"])
    task = agent.request("deploy-notes", NOTES, "searched")
    with person(stack, "ines", ["auditor"]) as client:
        bad = client.get("/ui/audit", params={"since": "yesterday-ish"})
        assert bad.status_code == 400
        assert "must be a date and time" in bad.text
        found = client.get("/ui/audit", params={"task": task["id"]})
        assert found.status_code == 200
        assert f'href="/ui/tasks/{task["id"]}#timeline"' in found.text
        assert "broker.task.request" in found.text
        assert client.get("/ui/audit", params={"task": "x" * 300}).status_code == 200
    reads = [e for e in access_events(stack) if e.get("broker.audit.access") == "events"]
    assert any(e.get("broker.audit.filter.task") == task["id"] for e in reads)
