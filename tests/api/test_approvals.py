"""Approval gates over real HTTP with real ID tokens: every transition and every refusal."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from broker.settings import VaultSettings
from broker.store import repo
from tests.api.flows import (
    REVIEWED_KV,
    Clock,
    WebhookReceiver,
    cast,
    events,
    login,
    running,
    scope_folder,
    settings_for,
)
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = pytest.mark.integration

DEPLOY = {"environment": "staging", "change": "CHG-1234"}


def vault(openbao: OpenBao) -> VaultSettings:
    return VaultSettings(addr=openbao.addr, token=openbao.broker_token, token_role="broker-child")


def refusal_codes(broker: Any, task_id: str) -> list[str]:
    return [
        e["attributes"].get("broker.refusal.code")
        for e in events(broker, task_id)
        if e["outcome"] == "denied"
    ]


def test_one_reviewer_approves_and_the_agent_mints_once(
    tmp_path: Path, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """A manual task waits (201 pending, webhook signed), a long-poll returns when a reviewer
    approves, the agent mints a real OpenBao token that works, and a second mint is refused:
    the approval is single-use."""
    hook = WebhookReceiver().start()
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(
        make_settings,
        issuer,
        folder,
        vault=vault(openbao),
        webhooks=[{"name": "ops", "url": hook.url, "secret": "s" * 32}],
    )
    try:
        with running(settings) as (broker, client):
            people = cast(client, issuer)
            resp = people.agent.request("vault-kv-reviewed", purpose="read the demo secret")
            assert resp.status_code == 201, resp.text
            task = resp.json()
            assert task["state"] == "pending"
            assert task["approvals_required"] == 1
            assert task["decided_by_rule"] is None

            polled: dict[str, Any] = {}

            def long_poll() -> None:
                polled.update(people.agent.task(task["id"], wait=20))

            waiter = threading.Thread(target=long_poll)
            waiter.start()
            listed = people.reviewer.get("/v1/approvals").json()
            assert [t["task"]["id"] for t in listed] == [task["id"]]
            assert listed[0]["may_decide"] is True
            assert listed[0]["approvers_rule"] == {"all": ["groups equals 'reviewers'"]}

            resp = people.reviewer.approve(task["id"], "the demo secret is fine")
            assert resp.status_code == 200, resp.text
            assert resp.json()["state"] == "approved"
            waiter.join(timeout=20)
            assert polled["state"] == "approved"
            assert "rita" in polled["decided_by_rule"]
            assert [(a["subject"], a["decision"], a["counts"]) for a in polled["approvals"]] == [
                ("rita", "approve", True)
            ]

            minted = people.agent.mint(task["id"])
            assert minted.status_code == 201, minted.text
            token = minted.json()["secret"]["token"]
            with openbao.client(token) as agent:
                assert agent.get("/v1/secret/data/demo/hello").status_code == 200

            again = people.agent.mint(task["id"])
            assert again.status_code == 409
            assert again.json()["code"] == "already_issued"
            assert "already_issued" in refusal_codes(broker, task["id"])

            names = [e["name"] for e in events(broker, task["id"])]
            assert names.count("broker.task.approval") == 1
            decision = [
                e for e in events(broker, task["id"]) if e["name"] == "broker.task.decision"
            ]
            assert decision[-1]["attributes"]["broker.approver.sub"] == "rita"
            assert decision[-1]["actor_subject"] == "rita"

            hook.wait_for(2)
            assert [b["event"] for b in hook.bodies()] == ["task.pending", "task.approved"]
    finally:
        hook.stop()


def test_the_requester_never_approves_their_own_task(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """A DBA who requests read-write access cannot approve it (403 self_approval, audited), does
    not even see it in their approvals list, and the task stays pending until another DBA
    approves."""
    with running(settings_for(make_settings, issuer)) as (broker, client):
        people = cast(client, issuer)
        both = people.dba  # a DBA may request read-write access, and approves for others
        task = both.request("postgres-readwrite").json()
        assert task["state"] == "pending"
        resp = both.approve(task["id"])
        assert resp.status_code == 403
        assert resp.json()["code"] == "self_approval"
        assert both.get("/v1/approvals").json() == []
        assert both.task(task["id"])["state"] == "pending"
        # A refused attempt is recorded as a refusal, never as a decision.
        assert not [e for e in events(broker, task["id"]) if e["name"] == "broker.task.approval"]
        refused = [e for e in events(broker, task["id"]) if e["name"] == "broker.approval.refused"]
        assert [
            (
                e["outcome"],
                e["attributes"]["broker.refusal.code"],
                e["attributes"]["broker.approval.attempted"],
                e["actor_subject"],
            )
            for e in refused
        ] == [("denied", "self_approval", "approve", "dana")]
        other = login(client, issuer, "omar", groups=["dba"], broker_roles=["approver"])
        assert other.approve(task["id"]).json()["state"] == "approved"


def test_only_eligible_approvers_decide(issuer: TestIssuer, make_settings: Any) -> None:
    """Without the approver role, or outside the template's approver conditions, a decision is
    refused (403) and audited; listing approvals needs the role."""
    with running(settings_for(make_settings, issuer)) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("postgres-readwrite").json()
        no_role = people.not_approver.approve(task["id"])
        assert (no_role.status_code, no_role.json()["code"]) == (403, "not_an_approver")
        assert people.not_approver.get("/v1/approvals").status_code == 403
        wrong = people.wrong_group.approve(task["id"])
        assert (wrong.status_code, wrong.json()["code"]) == (403, "not_an_eligible_approver")
        assert "groups equals 'dba'" in wrong.json()["detail"]
        assert people.wrong_group.get("/v1/approvals").json() == []
        hidden = people.wrong_group.get(f"/v1/approvals/{task['id']}")
        assert (hidden.status_code, hidden.json()["code"]) == (404, "unknown_task")
        assert people.dba.get(f"/v1/approvals/{task['id']}").json()["may_decide"] is True
        missing = people.dba.approve("tsk_nope")
        assert (missing.status_code, missing.json()["code"]) == (404, "unknown_task")
        assert refusal_codes(broker, task["id"]) == ["not_an_approver", "not_an_eligible_approver"]
        assert people.agent.task(task["id"])["state"] == "pending"
        empty = people.dba.post(f"/v1/approvals/{task['id']}/approve", json={"reason": ""})
        assert empty.status_code == 422


def test_two_distinct_approvers_are_needed(issuer: TestIssuer, make_settings: Any) -> None:
    """The deploy role needs two different release managers: one approval leaves it pending, the
    same person approving twice is refused, a second person approves it."""
    with running(settings_for(make_settings, issuer)) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("aws-deploy", DEPLOY).json()
        assert (task["state"], task["approvals_required"]) == ("pending", 2)

        first = people.manager1.approve(task["id"])
        assert first.json()["state"] == "pending"
        detail = people.manager2.get(f"/v1/approvals/{task['id']}").json()
        assert (detail["approvals_counted"], detail["may_decide"]) == (1, True)
        assert detail["risk"] == "critical"
        mine = people.manager1.get(f"/v1/approvals/{task['id']}").json()
        assert (mine["may_decide"], mine["why_not"]) == (False, "you already approved this task")

        twice = people.manager1.approve(task["id"])
        assert (twice.status_code, twice.json()["code"]) == (409, "already_decided")

        second = people.manager2.approve(task["id"])
        assert second.json()["state"] == "approved"
        assert second.json()["decided_by_rule"] == "approval.count=2: approved by mia, max"
        late = people.dba.approve(task["id"])
        assert late.status_code == 403  # not a release manager
        with broker.db.read() as conn:
            stored = repo.get_task(conn, task["id"])
        assert stored is not None and stored.decision_hash is not None


def test_approvers_see_the_grant_rendered_for_the_exact_parameters(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """``GET /v1/approvals/{task}`` carries the grant (the deploy role, its session tags with the
    requested environment and change ticket, the TTL) beside the template's backend as written
    (placeholders); the listing carries it too; nothing secret is in either."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("aws-deploy", DEPLOY).json()
        detail = people.manager1.get(f"/v1/approvals/{task['id']}").json()
        grant = detail["grant"]
        assert grant["type"] == "aws_sts"
        assert grant["role_arn"] == "arn:aws:iam::123456789012:role/broker-deploy"
        assert grant["session_tags"]["environment"] == DEPLOY["environment"]
        assert grant["session_tags"]["change"] == DEPLOY["change"]
        assert grant["session_tags"]["broker:task"] == task["id"]
        assert grant["ttl_seconds"] == task["ttl"]
        assert detail["template_backend"]["tags"] == {
            "environment": "{{params.environment}}",
            "change": "{{params.change}}",
        }
        [listed] = people.manager1.get("/v1/approvals").json()
        assert listed["grant"] == grant
        text = json.dumps(detail)
        assert people.agent.token not in text and people.manager1.token not in text


def test_a_denial_ends_the_request(issuer: TestIssuer, make_settings: Any) -> None:
    """One denial denies the task with the approver's reason; later decisions are refused."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("aws-deploy", DEPLOY).json()
        people.manager1.approve(task["id"])
        denied = people.manager2.deny(task["id"], "no deploys on Friday")
        assert denied.json()["state"] == "denied"
        seen = people.agent.task(task["id"])
        assert seen["reason"] == "no deploys on Friday"
        assert seen["decided_by_rule"] == "denied by approver mia"
        late = people.manager2.approve(task["id"])
        assert late.status_code == 409
        assert people.agent.mint(task["id"]).json()["code"] == "task_not_approved"


def test_an_expired_request_cannot_be_approved(issuer: TestIssuer, make_settings: Any) -> None:
    """Past request_ttl a pending task expires: the approval is refused (409 request_expired) and
    the agent sees the task expired."""
    clock = Clock()
    with running(settings_for(make_settings, issuer), clock=clock) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("postgres-readwrite").json()
        clock.advance(3601)  # the template's request_ttl is 3600 s
        resp = people.dba.approve(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (409, "request_expired")
        seen = people.agent.task(task["id"])
        assert (seen["state"], seen["reason"]) == ("expired", "the request expired")
        assert "broker.task.expire" in [e["name"] for e in events(broker, task["id"])]


def test_expiry_runs_without_anyone_looking(issuer: TestIssuer, make_settings: Any) -> None:
    """expire_due expires lapsed requests in bulk (the background loop calls it)."""
    clock = Clock()
    with running(settings_for(make_settings, issuer), clock=clock) as (broker, client):
        people = cast(client, issuer)
        ids = [people.agent.request("aws-deploy", DEPLOY).json()["id"]]
        clock.advance(7201)
        assert broker.tasks.expire_due() == 1
        assert broker.tasks.expire_due() == 0
        assert people.agent.task(ids[0])["state"] == "expired"


def test_a_stale_approval_does_not_count(issuer: TestIssuer, make_settings: Any) -> None:
    """An approval older than approval_ttl no longer counts towards the two needed; its author
    may renew it, and then the task is approved."""
    clock = Clock()
    with running(settings_for(make_settings, issuer), clock=clock) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("aws-deploy", DEPLOY).json()
        people.manager1.approve(task["id"])
        clock.advance(601)  # aws-deploy's approval_ttl is 600 s
        after = people.manager2.approve(task["id"])
        assert after.json()["state"] == "pending"
        counts = {a["subject"]: a["counts"] for a in people.agent.task(task["id"])["approvals"]}
        assert counts == {"max": False, "mia": True}
        renewed = people.manager1.approve(task["id"], "still fine")
        assert renewed.json()["state"] == "approved"


def test_an_unused_approval_expires(
    tmp_path: Path, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """An approval not used within approval_ttl cannot mint: 409 approval_expired, the task is
    expired, and nothing was created in OpenBao."""
    clock = Clock()
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(make_settings, issuer, folder, vault=vault(openbao))
    with running(settings, clock=clock) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("vault-kv-reviewed").json()
        people.reviewer.approve(task["id"])
        clock.advance(301)
        resp = people.agent.mint(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (409, "approval_expired")
        assert people.agent.task(task["id"])["state"] == "expired"
        with broker.db.read() as conn:
            assert repo.credentials_for(conn, task["id"]) == []


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_template_changed_after_approval_voids_it(
    tmp_path: Path, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """The approval binds the template version: after an admin edits the template (reloaded
    without restart), minting is refused (412 template_changed), the task is revoked, and
    nothing is minted. A fresh request under the new version works."""
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(make_settings, issuer, folder, vault=vault(openbao))
    with running(settings) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("vault-kv-reviewed").json()
        people.reviewer.approve(task["id"])
        _edit(folder / "vault-kv-reviewed.yaml", "max_uses: 10", "max_uses: 20")
        resp = people.agent.mint(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (412, "template_changed")
        seen = people.agent.task(task["id"])
        assert (seen["state"], seen["reason"]) == (
            "revoked",
            "the scope template changed after the decision",
        )
        with broker.db.read() as conn:
            assert repo.credentials_for(conn, task["id"]) == []
            old = repo.get_template_version(conn, task["template_hash"])
        assert old is not None and old["body"]["max_uses"] == 10

        fresh = people.agent.request("vault-kv-reviewed").json()
        assert fresh["template_hash"] != task["template_hash"]
        people.reviewer.approve(fresh["id"])
        assert people.agent.mint(fresh["id"]).status_code == 201


def test_a_template_changed_before_approval_denies_it(
    tmp_path: Path, issuer: TestIssuer, make_settings: Any
) -> None:
    """Approving a request whose template changed since is refused (412) and the task denied, so
    nobody waits on a request that can never be approved as asked."""
    folder = scope_folder(tmp_path)
    with running(settings_for(make_settings, issuer, folder)) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("postgres-readwrite").json()
        _edit(folder / "postgres-readwrite.yaml", "max: 1800", "max: 1700")
        resp = people.dba.approve(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (412, "template_changed")
        assert people.agent.task(task["id"])["state"] == "denied"


def test_a_comment_is_not_a_change(tmp_path: Path, issuer: TestIssuer, make_settings: Any) -> None:
    """The content hash covers meaning, not bytes: a comment edit keeps approvals valid."""
    folder = scope_folder(tmp_path)
    with running(settings_for(make_settings, issuer, folder)) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("postgres-readwrite").json()
        path = folder / "postgres-readwrite.yaml"
        path.write_text("# reviewed again by the data team\n" + path.read_text())
        assert people.dba.approve(task["id"]).json()["state"] == "approved"


def test_parameters_changed_after_approval_void_it(
    tmp_path: Path, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """Parameters are frozen: the API offers no way to change them (a reused Idempotency-Key with
    other parameters is a 409), and a task altered behind the API's back (its row edited) no
    longer matches the approval's binding hash: 412 approval_void, nothing minted."""
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(make_settings, issuer, folder, vault=vault(openbao))
    with running(settings) as (broker, client):
        people = cast(client, issuer)
        first = people.agent.request("aws-deploy", DEPLOY, key="deploy-1")
        assert first.status_code == 201
        other = people.agent.request(
            "aws-deploy", {**DEPLOY, "environment": "production"}, key="deploy-1"
        )
        assert (other.status_code, other.json()["code"]) == (409, "idempotency_key_reused")
        # No route changes a task's parameters:
        assert (
            client.patch(f"/v1/tasks/{first.json()['id']}", headers=people.agent.auth).status_code
            == 405
        )

        task = people.agent.request("vault-kv-reviewed").json()
        people.reviewer.approve(task["id"])
        with broker.db.write() as conn:
            repo.update_task(conn, task["id"], ttl=1200)  # widened behind the API's back
        resp = people.agent.mint(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (412, "approval_void")
        assert people.agent.task(task["id"])["state"] == "revoked"
        with broker.db.read() as conn:
            assert repo.credentials_for(conn, task["id"]) == []


def test_idempotent_requests(issuer: TestIssuer, make_settings: Any) -> None:
    """Same Idempotency-Key and body: the same task (200, Idempotent-Replayed); a denial replays
    as a denial; the key is per principal."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        a = people.agent.request("vault-kv-read", key="k-1")
        b = people.agent.request("vault-kv-read", key="k-1")
        assert (a.status_code, b.status_code) == (201, 200)
        assert b.headers["idempotent-replayed"] == "true"
        assert a.json()["id"] == b.json()["id"]
        done = people.agent.post(f"/v1/tasks/{a.json()['id']}/complete").json()
        assert done["state"] == "completed"  # approved, never minted, then completed
        c = people.manager1.request("vault-kv-read", key="k-1")
        assert c.status_code == 201 and c.json()["id"] != a.json()["id"]
        d1 = people.manager1.request("postgres-readwrite", key="k-2")
        d2 = people.manager1.request("postgres-readwrite", key="k-2")
        assert d1.status_code == d2.status_code == 403
        assert d1.json()["task_id"] == d2.json()["task_id"]
        assert "groups one_of" in d1.json()["reason"]


@pytest.mark.postgres
def test_concurrent_mints_use_an_approval_once(
    tmp_path: Path, pg_url: str, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """Six mints of one approved task at the same instant, on PostgreSQL: exactly one gets a
    credential, the others 409 already_issued; OpenBao holds exactly one token for the task."""
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(
        make_settings, issuer, folder, vault=vault(openbao), database_url=pg_url
    )
    with running(settings) as (broker, client):
        people = cast(client, issuer)
        task = people.agent.request("vault-kv-reviewed").json()
        people.reviewer.approve(task["id"])
        gate = threading.Barrier(6)
        answers: list[Any] = []

        def mint() -> None:
            gate.wait()
            answers.append(people.agent.mint(task["id"]))

        threads = [threading.Thread(target=mint) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in answers) == [201] + [409] * 5
        assert {r.json()["code"] for r in answers if r.status_code == 409} == {"already_issued"}
        with broker.db.read() as conn:
            creds = repo.credentials_for(conn, task["id"])
        assert [c.state.value for c in creds] == ["active"]
        with openbao.client() as root:
            accessors = root.request("LIST", "/v1/auth/token/accessors").json()["data"]["keys"]
            metas = [
                root.post("/v1/auth/token/lookup-accessor", json={"accessor": a}).json()["data"]
                for a in accessors
            ]
        assert [m["meta"].get("broker_task") for m in metas if m.get("meta")].count(task["id"]) == 1


def test_expiry_is_announced(tmp_path: Path, issuer: TestIssuer, make_settings: Any) -> None:
    """A request that expires unseen is announced to the webhooks as task.expired."""
    hook = WebhookReceiver().start()
    clock = Clock()
    settings = settings_for(
        make_settings, issuer, webhooks=[{"name": "ops", "url": hook.url, "secret": "s" * 32}]
    )
    try:
        with running(settings, clock=clock) as (broker, client):
            people = cast(client, issuer)
            task = people.agent.request("postgres-readwrite").json()
            clock.advance(3601)
            assert broker.tasks.expire_due() == 1
            broker.notifier.deliver_due()
            hook.wait_for(2)
            bodies = hook.bodies()
            assert [b["event"] for b in bodies] == ["task.pending", "task.expired"]
            assert bodies[1]["task"]["id"] == task["id"]
            assert bodies[1]["task"]["reason"] == "the request expired"
    finally:
        hook.stop()


def test_a_deleted_template_voids_its_approvals(
    tmp_path: Path, openbao: OpenBao, issuer: TestIssuer, make_settings: Any
) -> None:
    """Removing a template withdraws it at once: an approved task of it can no longer mint."""
    folder = scope_folder(tmp_path, ("vault-kv-reviewed", REVIEWED_KV))
    settings = settings_for(make_settings, issuer, folder, vault=vault(openbao))
    with running(settings) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("vault-kv-reviewed").json()
        people.reviewer.approve(task["id"])
        (folder / "vault-kv-reviewed.yaml").unlink()
        resp = people.agent.mint(task["id"])
        assert (resp.status_code, resp.json()["code"]) == (412, "template_changed")
        assert people.agent.request("vault-kv-reviewed").json()["code"] == "unknown_scope"


def test_decisions_are_spans_in_the_task_trace(
    issuer: TestIssuer, make_settings: Any, otlp: Any
) -> None:
    """Request, each approval and the decision reach the OTLP receiver as spans of the task's
    trace, naming the approvers; no session token appears in any attribute."""
    from broker.settings import OtlpSettings

    settings = settings_for(
        make_settings, issuer, otlp=OtlpSettings(endpoint=otlp.endpoint, interval=0.05)
    )
    with running(settings) as (_, client):
        people = cast(client, issuer)
        task = people.agent.request("aws-deploy", DEPLOY).json()
        people.manager1.approve(task["id"], "first")
        people.manager2.approve(task["id"], "second")
        wanted = {"broker.task.request", "broker.task.approval", "broker.task.decision"}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            spans = [s for s in otlp.spans if s.attributes.get("broker.task.id") == task["id"]]
            if len([s for s in spans if s.name == "broker.task.approval"]) == 2 and (
                wanted <= {s.name for s in spans}
            ):
                break
            time.sleep(0.05)
        assert {s.trace_id for s in spans} == {task["trace_id"]}
        approvers = sorted(
            s.attributes["broker.approver.sub"] for s in spans if s.name == "broker.task.approval"
        )
        assert approvers == ["max", "mia"]
        decision = next(s for s in spans if s.name == "broker.task.decision")
        assert decision.attributes["broker.decision"] == "approved"
        for span in spans:
            for value in span.attributes.values():
                assert people.agent.token not in str(value)
                assert people.manager1.token not in str(value)
