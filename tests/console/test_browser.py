"""The console in a real headless Chromium, against the real broker and the real dev issuer.

People sign in through the dev issuer's sign-in page (authorization code with PKCE), agents use
the HTTP API, and every outcome is checked where it lands: the agent's view of its task over the
API, the audit record, the rendered pages. Screenshots of every page go to test-artifacts/console/.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from broker.store import repo
from tests.api.flows import WebhookReceiver
from tests.audit.conftest import wait_for
from tests.console.conftest import Browsing
from tests.console.stack import DevIssuer, Stack, console_stack
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

ROLES = ("agent", "approver", "auditor", "admin")


def sign_in_page(
    b: Browsing,
    stack: Stack,
    *,
    sub: str,
    roles: tuple[str, ...],
    groups: str = "",
    name: str = "",
    start: str = "/ui/approvals",
    shot: str | None = None,
) -> None:
    """Open ``start`` signed out, sign in at the dev issuer's page, land back on ``start``."""
    page = b.page
    page.goto(stack.url + start)
    page.wait_for_url(re.compile(re.escape(stack.issuer.url) + r"/authorize\?"))
    page.fill("#sub", sub)
    page.fill("#name", name)
    page.fill("#groups", groups)
    for role in ROLES:
        page.set_checked(f'input[name="role"][value="{role}"]', role in roles)
    if shot:
        b.shot(shot, doc=True)
    page.click("#sign-in")
    page.wait_for_url(stack.url + start + "*")


def refusal_codes(stack: Stack, task_id: str) -> list[str]:
    with stack.broker.db.read() as conn:
        rows = repo.audit_events(conn, task_id=task_id, limit=1000)
    return [r["attributes"].get("broker.refusal.code") for r in rows if r["outcome"] == "denied"]


def test_approver_signs_in_sees_the_agents_task_and_approves_it(
    tmp_path: Path, issuer_app: DevIssuer, browsing: Any
) -> None:
    """An agent requests a high-risk task over the API; the webhook's link opens the console,
    which sends the approver through the dev issuer's sign-in page and back to that very task;
    the approvals page lists it with requester, purpose, parameters, risk, TTL and template
    version; the task page fits a phone's screen; the approver approves with a reason (a plain
    form post) and the agent's task, read over the API, is approved, decided by that approver.
    No page breaks the CSP."""
    hook = WebhookReceiver().start()
    try:
        with console_stack(
            tmp_path,
            issuer_app,
            webhooks=[{"name": "chat", "url": hook.url, "secret": "w" * 32}],
        ) as stack:
            agent = stack.agent(
                "agent-7", name="Build agent 7", groups=["developers"], broker_roles=["agent"]
            )
            task = agent.request(
                "deploy-notes",
                {"environment": "production", "ticket": "CHG-2041"},
                "publish the release notes for 4.2",
            )
            assert task["state"] == "pending"
            hook.wait_for(1)
            link = hook.bodies()[0]["task"]["url"]
            assert link == f"{stack.url}/ui/tasks/{task['id']}"

            b = browsing("approver")
            b.page.goto(stack.url + "/ui")
            b.shot("signed-out")
            # The chat message's link, opened signed out: sign-in, then straight to the task.
            sign_in_page(
                b,
                stack,
                sub="sam",
                name="Sam SRE",
                groups="sre",
                roles=("approver",),
                start=f"/ui/tasks/{task['id']}",
                shot="sign-in",
            )
            page = b.page
            assert page.locator("h1").first.inner_text().startswith("deploy-notes")
            assert page.locator("#approve").is_visible()

            page.click('a[href="/ui/approvals"]')
            page.wait_for_url(stack.url + "/ui/approvals")
            card = page.locator(f"#task-{task['id']}")
            text = card.inner_text()
            for expected in (
                "Build agent 7",
                "agent-7",
                stack.issuer.url,
                "publish the release notes for 4.2",
                "environment",
                '"production"',
                "CHG-2041",
                "HIGH RISK",
                "10 min",
                "0 of 1 approvals",
                "first request for this scope",
            ):
                assert expected in text, f"{expected!r} not on the approvals page"
            b.shot("approvals", doc=True)

            card.locator("a.button").click()
            page.wait_for_url(f"{stack.url}/ui/tasks/{task['id']}")
            assert task["template_hash"] in page.locator("#template").inner_text()
            b.shot("task-pending", doc=True)
            # On a phone: the same page, nothing wider than the screen, the buttons reachable.
            page.set_viewport_size({"width": 390, "height": 844})
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            assert page.locator("#approve").is_visible()
            b.shot("task-phone", doc=True)
            page.set_viewport_size({"width": 1280, "height": 900})
            page.fill("#reason", "release 4.2 is scheduled for today")
            page.click("#approve")
            page.wait_for_url(f"{stack.url}/ui/tasks/{task['id']}?decided=approve")
            assert "The task is approved" in page.locator("#notice").inner_text()
            decisions = page.locator("#decisions").inner_text()
            assert "Sam SRE" in decisions
            assert "release 4.2 is scheduled for today" in decisions
            b.shot("task-approved", doc=True)

            seen = agent.task(task["id"])
            assert seen["state"] == "approved"
            assert "sam" in (seen["decided_by_rule"] or "")
            page.goto(stack.url + "/ui/approvals")
            assert "Nothing waits for you" in page.inner_text("#pending")
            assert not [e for e in b.console_errors if "Content Security Policy" in e]
    finally:
        hook.stop()


def test_the_approver_sees_the_grant_rendered_for_the_exact_parameters(
    tmp_path: Path, issuer_app: DevIssuer, browsing: Any
) -> None:
    """In Chromium: the approvals list sums up what the credential will grant; the task page
    shows the grant rendered for the task's parameters (the JWT's audience and its claims with
    the requested environment and ticket) beside the template's settings as written (with the
    placeholders), side by side on a wide screen."""
    with console_stack(tmp_path, issuer_app) as stack:
        agent = stack.agent("agent-9", groups=["developers"], broker_roles=["agent"])
        task = agent.request(
            "deploy-notes",
            {"environment": "production", "ticket": "CHG-3141"},
            "publish the notes for 4.3",
        )
        b = browsing("approver")
        sign_in_page(b, stack, sub="sam", name="Sam SRE", groups="sre", roles=("approver",))
        page = b.page
        summary = page.locator(f"#task-{task['id']} .grant-summary").inner_text()
        assert "broker_jwt: audience notes-service" in summary

        page.goto(f"{stack.url}/ui/tasks/{task['id']}")
        grant = page.locator("#grant").inner_text()
        for expected in ("notes-service", '"production"', '"CHG-3141"', task["id"], "600"):
            assert expected in grant, f"{expected!r} not in the rendered grant"
        assert "{{params" not in grant
        written = page.locator("#as-written").inner_text()
        assert "{{params.ticket}}" in written and "CHG-3141" not in written
        left = page.locator("#grant").bounding_box()
        right = page.locator("#as-written").bounding_box()
        assert left is not None and right is not None
        assert left["x"] < right["x"] and abs(left["y"] - right["y"]) < 5, "side by side"
        b.shot("task-grant", doc=True)
        assert not [e for e in b.console_errors if "Content Security Policy" in e]


def test_a_requester_cannot_approve_their_own_task(
    tmp_path: Path, issuer_app: DevIssuer, browsing: Any
) -> None:
    """Someone who is both agent and approver requests a task over the API, then opens it in
    the console: it is not on their approvals page, the task page says why they cannot decide
    it and offers no form, and a decision posted anyway (with a valid CSRF token) is refused by
    the approval service - the task stays pending and the refusal is audited."""
    with console_stack(tmp_path, issuer_app) as stack:
        agent = stack.agent(
            "riley", name="Riley", groups=["sre"], broker_roles=["agent", "approver"]
        )
        task = agent.request(
            "deploy-notes", {"environment": "staging", "ticket": "CHG-7"}, "try the new notes"
        )
        b = browsing("requester")
        sign_in_page(b, stack, sub="riley", name="Riley", groups="sre", roles=("approver",))
        page = b.page
        assert "Nothing waits for you" in page.inner_text("#pending")

        page.goto(f"{stack.url}/ui/tasks/{task['id']}")
        why = page.inner_text("#why-not")
        assert "the requester of a task can never decide it" in why
        assert page.locator("#decide").count() == 0
        b.shot("self-approval-refused", doc=True)

        csrf = page.get_attribute('input[name="csrf"]', "value")
        answer = page.request.post(
            f"{stack.url}/ui/tasks/{task['id']}/decision",
            form={"csrf": csrf or "", "decision": "approve", "reason": "my own"},
            headers={"Origin": stack.url},
            max_redirects=0,
        )
        assert answer.status == 403
        assert "the requester of a task can never decide it" in answer.text()
        assert agent.task(task["id"])["state"] == "pending"
        assert "self_approval" in refusal_codes(stack, task["id"])


def test_the_approve_path_works_without_javascript(
    tmp_path: Path, issuer_app: DevIssuer, browsing: Any
) -> None:
    """With JavaScript disabled, sign-in, the approvals list, a denial with a reason and
    sign-out all work: the console's forms are plain HTML."""
    with console_stack(tmp_path, issuer_app) as stack:
        agent = stack.agent("agent-3", groups=["developers"], broker_roles=["agent"])
        task = agent.request(
            "deploy-notes", {"environment": "staging", "ticket": "CHG-9"}, "notes for a test"
        )
        b = browsing("nojs", javascript=False)
        sign_in_page(b, stack, sub="nora", groups="sre", roles=("approver",))
        page = b.page
        page.click(f"#task-{task['id']} a.button")
        page.fill("#reason", "not during the freeze")
        page.click("#deny")
        page.wait_for_url(f"{stack.url}/ui/tasks/{task['id']}?decided=deny")
        assert "The task is denied" in page.inner_text("#notice")
        assert agent.task(task["id"])["state"] == "denied"
        page.click("#sign-out")
        page.wait_for_url(stack.url + "/ui/signed-out")
        page.goto(stack.url + "/ui/approvals")
        page.wait_for_url(re.compile(re.escape(stack.issuer.url) + r"/authorize\?"))


def test_look_alike_and_invisible_characters_are_made_visible(
    tmp_path: Path, issuer_app: DevIssuer, browsing: Any
) -> None:
    """A parameter with a Cyrillic letter posing as a Latin one, and a requester whose display name
    (from the ID token) carries a right-to-left override and a zero-width space, are shown with each
    odd character marked and named, a warning in words, and the invisible ones never reaching the
    page as themselves. (The API refuses such characters in a purpose outright.)"""
    with console_stack(tmp_path, issuer_app) as stack:
        name = "Ana \u202egnp.exe\u202c Notes\u200b"
        agent = stack.agent("agent-9", name=name, groups=["developers"], broker_roles=["agent"])
        ticket = "CHG-12\u0430"  # a Cyrillic small a at the end
        refused = stack.client.post(
            "/v1/tasks",
            json={
                "scope": "deploy-notes",
                "params": {"environment": "staging", "ticket": "CHG-1"},
                "purpose": "approve \u202egnp.exe\u202c the notes",
            },
            headers=agent.auth,
        )
        assert refused.status_code == 422
        assert refused.json()["code"] == "invalid_purpose"
        task = agent.request(
            "deploy-notes", {"environment": "staging", "ticket": ticket}, "ship the release notes"
        )
        b = browsing("confusables")
        sign_in_page(b, stack, sub="sam", groups="sre", roles=("approver",))
        b.page.goto(f"{stack.url}/ui/tasks/{task['id']}")
        request = b.page.inner_text("#request")
        assert "U+0430" in request
        assert "CYRILLIC SMALL LETTER A" in b.page.inner_html("#request")
        assert "looks like 'a'" in b.page.inner_html("#request")
        assert "mixes scripts: Latin, Cyrillic" in request
        page_text = b.page.inner_text("body")
        assert "[U+202E RIGHT-TO-LEFT OVERRIDE]" in page_text
        assert "[U+200B ZERO WIDTH SPACE]" in page_text
        html = b.keep()
        assert "\u202e" not in html
        assert "\u200b" not in html
        b.shot("confusables", doc=True)


def completed_kv_task(stack: Stack, openbao: OpenBao) -> dict[str, Any]:
    """A kv-reviewed task taken through its whole life over the real API and OpenBao: requested,
    approved by an SRE, minted, used against OpenBao (read from its audit device), reported run
    by the agent (exec), completed (revoked). Returns what the test needs, secrets included."""
    agent = stack.agent("dev-ana", name="Ana", groups=["developers"], broker_roles=["agent"])
    approver = stack.agent("sam", name="Sam SRE", groups=["sre"], broker_roles=["approver"])
    task = agent.request("kv-reviewed", {}, "read the demo greeting for the smoke test")
    resp = stack.client.post(
        f"/v1/approvals/{task['id']}/approve",
        json={"reason": "smoke test of the demo app"},
        headers=approver.auth,
    )
    assert resp.status_code == 200, resp.text
    minted = stack.client.post(f"/v1/tasks/{task['id']}/credentials", headers=agent.auth)
    assert minted.status_code == 201, minted.text
    credential = minted.json()
    secret = credential["secret"]["token"]
    with openbao.client(secret) as bao:
        read = bao.get("/v1/secret/data/demo/hello")
        assert read.status_code == 200, read.text
    ran = stack.client.post(
        f"/v1/tasks/{task['id']}/exec",
        json={
            "command": ["vault", "kv", "get", "secret/demo/hello"],
            "exit_code": 0,
            "started_at": credential["issued_at"],
            "ended_at": time.time(),
            "via": "cli",
        },
        headers=agent.auth,
    )
    assert ran.status_code == 201, ran.text
    done = stack.client.post(f"/v1/tasks/{task['id']}/complete", headers=agent.auth)
    assert done.status_code == 200, done.text

    def sources() -> set[str]:
        with stack.broker.db.read() as conn:
            rows = repo.audit_events(conn, task_id=task["id"], name="broker.credential.use")
        return {r["attributes"].get("broker.use.source") for r in rows}

    wait_for(lambda: {"openbao", "exec"} <= sources(), what="the OpenBao use to be ingested")
    return {
        "task": agent.task(task["id"]),
        "credential": credential["credential_id"],
        "secrets": [secret, agent.token, approver.token, agent.id_token, approver.id_token],
    }


def kv_stack(tmp_path: Path, issuer_app: DevIssuer, openbao: OpenBao, **overrides: Any) -> Any:
    return console_stack(
        tmp_path,
        issuer_app,
        vault=openbao.vault_settings(),
        audit={"openbao": {"file": str(openbao.audit_log), "poll_interval": 0.05}},
        **overrides,
    )


@pytest.mark.postgres
def test_the_timeline_of_a_completed_task_shows_issuance_uses_and_revocation(
    tmp_path: Path, issuer_app: DevIssuer, openbao: OpenBao, pg_url: str, browsing: Any
) -> None:
    """On PostgreSQL and a real OpenBao: an auditor signs in and opens a completed task. Its
    timeline puts the request, the approver's decision, the decision, the issuance, the use seen
    in OpenBao's audit stream, the run the agent reported (exec), the revocation and the end on
    one axis, with the credential's lifetime as a bar, and links to the same trace in the
    configured tracing UI. The search finds the credential's events, by principal, scope and
    time range, and shows the audit chain verified."""
    with kv_stack(
        tmp_path,
        issuer_app,
        openbao,
        database_url=pg_url,
        console={"issuer": "dev", "trace_url": "https://jaeger.example.test/trace/{trace_id}"},
    ) as stack:
        done = completed_kv_task(stack, openbao)
        task = done["task"]
        assert task["state"] == "completed"
        b = browsing("auditor")
        sign_in_page(
            b,
            stack,
            sub="aud-ines",
            name="Ines Auditor",
            roles=("auditor",),
            start=f"/ui/tasks/{task['id']}",
        )
        page = b.page
        kinds = page.eval_on_selector_all("#events tr.ev", "rows => rows.map(r => r.dataset.kind)")
        for kind in ("request", "approval", "decision", "issue", "use", "revoke", "end"):
            assert kind in kinds, f"no {kind} on the timeline: {kinds}"
        assert kinds.index("request") < kinds.index("issue") < kinds.index("revoke")
        events = page.inner_text("#events")
        assert "OpenBao audit stream" in events
        assert "exec (reported by the agent)" in events
        assert page.locator(f'.lane-label strong:text-is("{done["credential"]}")').count() == 1
        assert page.locator("svg rect.life").count() == 1
        assert page.locator("svg circle.mark.use").count() >= 2
        link = page.get_attribute("#trace-link", "href")
        assert link == f"https://jaeger.example.test/trace/{task['trace_id']}"
        b.shot("timeline", doc=True)

        page.goto(f"{stack.url}/ui/audit")
        assert page.inner_text("#chain-status") == "verified"
        page.fill('input[name="credential"]', done["credential"])
        page.click('#search button[type="submit"]')
        page.wait_for_url(re.compile(r".*/ui/audit\?.*credential="))
        results = page.inner_text("#results")
        assert "broker.credential.issue" in results
        assert "broker.credential.revoke" in results
        assert task["id"] in page.inner_text("main")
        b.shot("search", doc=True)

        def found(**query: str) -> str:
            page.goto(f"{stack.url}/ui/audit?{urlencode(query)}")
            return page.inner_text("#found")

        by_agent = found(principal="dev-ana", scope="kv-reviewed")
        assert "broker.task.request" in by_agent
        assert "broker.task.approval" not in by_agent  # that one's actor is the approver
        created = datetime.fromtimestamp(task["created_at"] - 3600, UTC)
        before = created.strftime("%Y-%m-%dT%H:%M:%S")
        assert "No events match" in found(until=before, scope="kv-reviewed")
        assert "broker.task.request" in found(since=before, scope="kv-reviewed")


def test_no_page_ever_shows_a_secret_a_session_token_or_an_id_token(
    tmp_path: Path, issuer_app: DevIssuer, openbao: OpenBao, browsing: Any
) -> None:
    """A person who is approver, auditor and admin visits every console page (approvals, a
    pending and a completed task with its timeline, the audit search in every filter, the
    verification, sign-in failures, sign-out): no rendered page contains the minted OpenBao
    token, a session token (the agents', the approver's, the console's own cookie), or any ID
    token the dev issuer issued, including the one the console redeemed at sign-in. Every page
    is kept as a screenshot."""
    with kv_stack(tmp_path, issuer_app, openbao) as stack:
        done = completed_kv_task(stack, openbao)
        agent = stack.agent("agent-5", groups=["developers"], broker_roles=["agent"])
        pending = agent.request(
            "deploy-notes", {"environment": "staging", "ticket": "CHG-55"}, "pending one"
        )
        b = browsing("everything")
        sign_in_page(
            b,
            stack,
            sub="omni",
            groups="sre",
            roles=("approver", "auditor", "admin"),
            start="/ui/approvals",
        )
        page = b.page
        b.shot("every-00-approvals")
        for n, path in enumerate(
            (
                "/ui",
                f"/ui/tasks/{pending['id']}",
                f"/ui/tasks/{done['task']['id']}",
                "/ui/audit",
                f"/ui/audit?credential={done['credential']}",
                f"/ui/audit?task={done['task']['id']}",
                "/ui/audit?principal=dev-ana&name=broker.session.start",
                "/ui/audit?name=broker.auth.failure",
                "/ui/audit?since=not-a-time",
                "/ui/tasks/tsk_doesnotexist",
            ),
            start=1,
        ):
            page.goto(stack.url + path)
            b.shot(f"every-{n:02d}")
        page.goto(stack.url + "/ui/audit")
        page.click("#verify-now")
        page.wait_for_url(stack.url + "/ui/audit*")
        b.shot("every-12-verified")
        cookie = next(c["value"] for c in b.context.cookies() if c["name"] == "broker_console")
        page.goto(stack.url + "/ui/callback?code=forged&state=forged")
        b.shot("every-13-sign-in-failed")
        page.goto(stack.url + "/ui/approvals")
        page.click("#sign-out")
        page.wait_for_url(stack.url + "/ui/signed-out")
        b.shot("every-14-signed-out")

        secrets = [*done["secrets"], agent.token, agent.id_token, cookie, *stack.issuer.issued]
        assert len(stack.issuer.issued) >= 4  # agents' and the console's sign-in tokens
        assert len(b.html) >= 14
        for url, html in b.html:
            for secret in secrets:
                assert secret not in html, f"a secret is on {url}"
            assert "brk_sess_" not in html, f"a session token is on {url}"
            assert not re.search(r"eyJ[A-Za-z0-9_-]{10,}\.eyJ", html), f"a JWT is on {url}"


#: An automatic OpenBao scope, for the records that must not be misread: one naming a policy
#: OpenBao does not have (its mint fails), one that mints a real kv-read token.
KV_AUTO = """\
name: {name}
description: {description}
owner: platform-team
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
max_uses: 20
max_active_tasks: 10
risk: low
approval:
  mode: auto
"""


@pytest.mark.postgres
def test_refusals_failed_mints_and_revoke_pending_read_as_what_they_are(
    tmp_path: Path, issuer_app: DevIssuer, openbao: OpenBao, pg_url: str, browsing: Any
) -> None:
    """Three records that must not be misread, each checked in the CLI trace, the console (a
    real Chromium) and an export: an approver outside the scope's approvers tries to approve
    (a REFUSED line with its code, drawn as a refused attempt, exported as
    broker.approval.refused, never a decision) beside a real denial; a mint that fails because
    the scope names a policy OpenBao lacks (the task ends failed, not completed; nothing was
    issued); a credential whose revocation fails while OpenBao is unreachable (still
    revoke_pending: the trace warns, the console says so above the task, the export has the
    failed revocation)."""
    from typer.testing import CliRunner

    from broker.cli.main import app
    from tests.support.tcp_proxy import TcpProxy

    scopes = tmp_path / "scopes"
    scopes.mkdir()
    missing = f"kv-missing-{secrets.token_hex(4)}"
    (scopes / "kv-missing.yaml").write_text(
        KV_AUTO.format(
            name="kv-missing", description="Names a policy nobody created.", policy=missing
        )
    )
    (scopes / "kv-auto.yaml").write_text(
        KV_AUTO.format(name="kv-auto", description="Read the demo secrets.", policy="kv-read")
    )
    proxy = TcpProxy(int(openbao.addr.rsplit(":", 1)[1])).up()
    try:
        with console_stack(
            tmp_path, issuer_app, vault=openbao.vault_settings(addr=proxy.url), database_url=pg_url
        ) as stack:
            agent = stack.agent("dev-rio", groups=["developers"], broker_roles=["agent"])
            # 1. A refused attempt beside a real decision.
            pending = agent.request(
                "deploy-notes", {"environment": "staging", "ticket": "CHG-77"}, "notes for 4.3"
            )
            dana = stack.agent("dana", groups=["dba"], broker_roles=["approver"])
            sam = stack.agent("sam", groups=["sre"], broker_roles=["approver"])
            refused = stack.client.post(
                f"/v1/approvals/{pending['id']}/approve", json={"reason": "lgtm"}, headers=dana.auth
            )
            assert refused.status_code == 403, refused.text
            assert refused.json()["code"] == "not_an_eligible_approver"
            denied = stack.client.post(
                f"/v1/approvals/{pending['id']}/deny",
                json={"reason": "not today"},
                headers=sam.auth,
            )
            assert denied.json()["state"] == "denied"
            # 2. A failed mint: the task ends failed.
            failing = agent.request("kv-missing", {}, "read a secret behind a missing policy")
            mint = stack.client.post(f"/v1/tasks/{failing['id']}/credentials", headers=agent.auth)
            assert mint.status_code == 500 and mint.json()["code"] == "scope_misconfigured"
            assert missing not in mint.text  # the cause is for admins only
            ended = stack.client.post(f"/v1/tasks/{failing['id']}/complete", headers=agent.auth)
            assert ended.json()["state"] == "failed"
            # 3. A revocation that fails: the credential stays revoke_pending.
            held = agent.request("kv-auto", {}, "read the demo greeting")
            minted = stack.client.post(f"/v1/tasks/{held['id']}/credentials", headers=agent.auth)
            assert minted.status_code == 201, minted.text
            proxy.down()
            done = stack.client.post(f"/v1/tasks/{held['id']}/complete", headers=agent.auth)
            assert done.status_code == 200, done.text
            creds = done.json()["credentials"]
            assert [c["state"] for c in creds] == ["revoke_pending"]

            auditor = stack.agent("aud-ines", broker_roles=["auditor"])
            runner = CliRunner()
            env = {"BROKER_SESSION_CACHE": str(tmp_path / "sessions.json"), "BROKER_CONFIG": ""}

            def cli(*args: str) -> str:
                result = runner.invoke(
                    app, [*args, "--url", stack.url, "--token", auditor.token], env=env
                )
                assert result.exit_code == 0, result.output
                return result.output

            def exported(task_id: str) -> list[dict[str, Any]]:
                out = tmp_path / f"{task_id}.jsonl"
                cli("audit", "export", "--task", task_id, "--out", str(out))
                assert cli("audit", "verify", "--file", str(out)).startswith("OK:")
                return [json.loads(line) for line in out.read_text().splitlines()[1:-1]]

            trace = cli("audit", "trace", pending["id"])
            assert (
                "REFUSED  dana tried to approve, not a decision: refused with not_an_eligible_approver"
                in trace
            )
            assert "APPROVAL sam: deny" in trace
            assert "dana: " not in trace.replace("dana tried", "")
            events = exported(pending["id"])
            refusals = [e for e in events if e["name"] == "broker.approval.refused"]
            assert [
                (e["actor_subject"], e["attributes"]["broker.refusal.code"]) for e in refusals
            ] == [("dana", "not_an_eligible_approver")]
            assert [e["actor_subject"] for e in events if e["name"] == "broker.task.approval"] == [
                "sam"
            ]

            trace = cli("audit", "trace", failing["id"])
            assert "state failed" in trace.splitlines()[0]
            assert "FAILED (scope_misconfigured), nothing was issued" in trace
            assert "END      FAILED, state failed, no credential was issued" in trace
            assert "END      success" not in trace
            events = exported(failing["id"])
            ends = [e for e in events if e["name"] == "broker.task.complete"]
            assert [(e["outcome"], e["attributes"]["broker.task.state"]) for e in ends] == [
                ("failure", "failed")
            ]
            issues = [e for e in events if e["name"] == "broker.credential.issue"]
            assert [(e["outcome"], e["attributes"]["broker.error.code"]) for e in issues] == [
                ("failure", "scope_misconfigured")
            ]

            trace = cli("audit", "trace", held["id"])
            assert "NOT REVOKED" in trace and "still revoke_pending" in trace
            assert trace.splitlines()[-1].startswith(
                f"WARNING: credential {creds[0]['id']} is still revoke_pending"
            )
            events = exported(held["id"])
            revokes = [e for e in events if e["name"] == "broker.credential.revoke"]
            assert revokes and revokes[0]["outcome"] == "failure"
            assert revokes[0]["attributes"]["broker.revoke.error"]

            b = browsing("misread")
            sign_in_page(
                b, stack, sub="aud-ines", roles=("auditor",), start=f"/ui/tasks/{pending['id']}"
            )
            page = b.page
            rows = page.eval_on_selector_all(
                "#events tr.ev",
                "rows => rows.map(r => [r.dataset.kind, r.innerText])",
            )
            refusal_rows = [text for kind, text in rows if kind == "refusal"]
            assert any("not_an_eligible_approver" in t and "dana" in t for t in refusal_rows)
            assert not any("dana" in text for kind, text in rows if kind == "approval")
            assert "Refused attempt" in page.inner_text("#timeline")
            b.shot("timeline-refused", doc=True)

            page.goto(f"{stack.url}/ui/tasks/{failing['id']}")
            assert "failed" in page.inner_text(".page-head")
            assert "no credential was issued" in page.inner_text("#task-failed")
            b.shot("task-failed", doc=True)

            page.goto(f"{stack.url}/ui/tasks/{held['id']}")
            warning = page.inner_text("#revoke-pending")
            assert creds[0]["id"] in warning and "revoke_pending" in warning
            assert "revoke_pending" in page.inner_text("#timeline")
            b.shot("task-revoke-pending", doc=True)
    finally:
        proxy.down()
