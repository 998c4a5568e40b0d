"""Task requests over real HTTP: discovery, refusals before anything is stored, limits,
long-poll, cancel, and concurrent decisions on PostgreSQL."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from broker.store import repo
from tests.api.flows import cast, events, login, running, scope_folder, settings_for
from tests.support.issuer import TestIssuer

pytestmark = pytest.mark.integration

S3 = {"bucket": "example-data-logs", "prefix": "2024/05"}


def test_discovery_lists_what_the_caller_may_request(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """GET /v1/scopes shows only requestable templates, each with a JSON Schema for its params,
    its limits and its approval rule; a scope the caller may not request is a 404."""
    with running(settings_for(make_settings, issuer)) as (_, client):
        people = cast(client, issuer)
        names = {s["name"] for s in people.agent.get("/v1/scopes").json()}
        assert names == {
            "vault-kv-read",
            "postgres-readonly",
            "postgres-readwrite",
            "aws-s3-read",
            "aws-deploy",
            "github-read-repo",
            "github-pull-request",
            "github-admin",
        }
        outsider = login(client, issuer, "ext", groups=["contractors"])
        assert {s["name"] for s in outsider.get("/v1/scopes").json()} == {
            "vault-kv-read",
            "aws-s3-read",
        }
        assert outsider.get("/v1/scopes/postgres-readwrite").status_code == 404

        s3 = people.agent.get("/v1/scopes/aws-s3-read").json()
        validator = jsonschema.Draft202012Validator(s3["parameters"])
        assert validator.is_valid(S3)
        assert not validator.is_valid({**S3, "bucket": "other"})
        assert not validator.is_valid({**S3, "extra": 1})
        deploy = people.agent.get("/v1/scopes/aws-deploy").json()
        assert deploy["approval"] == {
            "mode": "manual",
            "count": 2,
            "approvers": {"all": ["groups equals 'release-managers'"]},
            "request_ttl": 7200,
            "approval_ttl": 600,
        }
        assert deploy["limits"]["principal"] == [{"requests": 10, "per": 86400}]


HOSTILE = [
    {**S3, "prefix": "*"},
    {**S3, "prefix": "../../secrets"},
    {**S3, "prefix": "a,b"},
    {**S3, "prefix": 'x"]}'},
    {**S3, "prefix": "${aws:username}"},
    {**S3, "bucket": "example-data-logs/*"},
    {**S3, "bucket": "corp-secrets"},
    {**S3, "prefix": "{{params.bucket}}"},
    {**S3, "prefix": "%2e%2e"},
    {**S3, "Statement": "x"},
    {**S3, "prefix": ["a"]},
]


def test_injection_attempts_are_refused_and_store_nothing(
    issuer: TestIssuer, make_settings: Any
) -> None:
    """Every hostile parameter is a 422 problem with a stable code; no task is stored, and each
    refusal is audited as broker.request.denied."""
    with running(settings_for(make_settings, issuer)) as (broker, client):
        agent = cast(client, issuer).agent
        for params in HOSTILE:
            resp = agent.request("aws-s3-read", params)
            assert resp.status_code == 422, (params, resp.text)
            body = resp.json()
            assert resp.headers["content-type"] == "application/problem+json"
            assert body["code"] in {
                "invalid_parameter",
                "unknown_parameter",
                "scope_maximum_exceeded",
            }
        with broker.db.read() as conn:
            assert repo.list_tasks(conn) == []
        refused = [e for e in events(broker) if e["name"] == "broker.request.denied"]
        assert len(refused) == len(HOSTILE)
        assert {e["attributes"]["broker.scope"] for e in refused} == {"aws-s3-read"}


def test_other_refusals_are_problems_and_audited(issuer: TestIssuer, make_settings: Any) -> None:
    """An unknown scope, a bad purpose and a TTL above the cap: 404 and 422, each audited."""
    with running(settings_for(make_settings, issuer)) as (broker, client):
        agent = cast(client, issuer).agent
        assert agent.request("no-such-scope").json()["code"] == "unknown_scope"
        assert agent.request("vault-kv-read", purpose="   ").json()["code"] == "invalid_purpose"
        # A right-to-left override would show approvers another text than the record holds.
        rtl = "rotate keys \u202egnp.tpircs\u202c now"
        assert agent.request("vault-kv-read", purpose=rtl).json()["code"] == "invalid_purpose"
        assert agent.request("vault-kv-read", ttl=7200).json()["code"] == "ttl_too_long"
        codes = [
            e["attributes"]["broker.refusal.code"]
            for e in events(broker)
            if e["name"] == "broker.request.denied"
        ]
        assert codes == ["unknown_scope", "invalid_purpose", "invalid_purpose", "ttl_too_long"]


LIMITED = """\
name: limited
description: Rate limited for the test.
owner: tests
backend: {type: vault_token, policies: [kv-read]}
requester: {all: [{claim: sub, regex: ".+"}]}
max_active_tasks: 2
limits:
  principal: [{requests: 3, per: 3600}]
"""


def test_rate_limits_and_quotas_answer_429(
    tmp_path: Path, issuer: TestIssuer, make_settings: Any
) -> None:
    """max_active_tasks and the per-principal window answer 429 with Retry-After; the limits are
    per principal, and refusals are audited."""
    folder = scope_folder(tmp_path, ("limited", LIMITED))
    with running(settings_for(make_settings, issuer, folder)) as (broker, client):
        people = cast(client, issuer)
        first = people.agent.request("limited").json()
        people.agent.request("limited")
        busy = people.agent.request("limited")
        assert (busy.status_code, busy.json()["code"]) == (429, "too_many_active_tasks")
        assert busy.headers["retry-after"] == "60"
        people.agent.post(f"/v1/tasks/{first['id']}/complete")
        third = people.agent.request("limited")  # the refused one did not count
        assert third.status_code == 201
        people.agent.post(f"/v1/tasks/{third.json()['id']}/complete")
        over = people.agent.request("limited")
        assert (over.status_code, over.json()["code"]) == (429, "rate_limited")
        assert 0 < int(over.headers["retry-after"]) <= 3600
        assert over.json()["retry_after"] == int(over.headers["retry-after"])
        assert people.dba.request("limited").status_code == 201  # someone else's window
        codes = [
            e["attributes"].get("broker.refusal.code")
            for e in events(broker)
            if e["name"] == "broker.request.denied"
        ]
        assert codes == ["too_many_active_tasks", "rate_limited"]


def test_global_limit_per_principal(issuer: TestIssuer, make_settings: Any) -> None:
    settings = settings_for(
        make_settings, issuer, rate_limits={"per_principal": [{"requests": 1, "per": 600}]}
    )
    with running(settings) as (_, client):
        agent = cast(client, issuer).agent
        assert agent.request("vault-kv-read").status_code == 201
        assert agent.request("aws-s3-read", S3).status_code == 429


def test_long_poll_list_and_cancel(issuer: TestIssuer, make_settings: Any) -> None:
    """?wait returns at once for a decided task and at the deadline for a pending one; the list
    filters by state; a cancelled request can no longer be approved."""
    with running(settings_for(make_settings, issuer, task_wait_max=1)) as (_, client):
        people = cast(client, issuer)
        auto = people.agent.request("vault-kv-read").json()
        assert people.agent.task(auto["id"], wait=30)["state"] == "approved"
        pending = people.agent.request("postgres-readwrite").json()
        started = time.monotonic()
        assert people.agent.task(pending["id"], wait=30)["state"] == "pending"  # capped at 1 s
        assert time.monotonic() - started < 20
        listed = people.agent.get("/v1/tasks", params={"state": "pending"}).json()
        assert [t["id"] for t in listed] == [pending["id"]]
        assert people.agent.post(f"/v1/tasks/{pending['id']}/cancel").json()["state"] == "cancelled"
        late = people.dba.approve(pending["id"])
        assert (late.status_code, late.json()["code"]) == (409, "already_decided")
        assert people.dba.get(f"/v1/tasks/{pending['id']}").status_code == 404  # not theirs


@pytest.mark.postgres
def test_concurrent_approvals_on_postgres(
    pg_url: str, issuer: TestIssuer, make_settings: Any
) -> None:
    """Two release managers approving at the same instant on PostgreSQL both count and the task
    is approved exactly once; a denial racing an approval leaves one consistent outcome."""
    with running(settings_for(make_settings, issuer, database_url=pg_url)) as (broker, client):
        people = cast(client, issuer)
        for _ in range(3):
            task = people.agent.request(
                "aws-deploy", {"environment": "staging", "change": "CHG-1111"}
            ).json()
            gate = threading.Barrier(2)
            answers: list[Any] = []

            def decide(
                person: Any,
                task_id: str = task["id"],
                gate: threading.Barrier = gate,
                answers: list[Any] = answers,
            ) -> None:
                gate.wait()
                answers.append(person.approve(task_id))

            threads = [
                threading.Thread(target=decide, args=(p,))
                for p in (people.manager1, people.manager2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(r.status_code for r in answers) == [200, 200]
            assert people.agent.task(task["id"])["state"] == "approved"
            decisions = [
                e for e in events(broker, task["id"]) if e["name"] == "broker.task.decision"
            ]
            assert [d["attributes"]["broker.decision"] for d in decisions] == ["approved"]
            people.agent.post(f"/v1/tasks/{task['id']}/cancel")

        manager3 = login(
            client, issuer, "moe", groups=["release-managers"], broker_roles=["approver"]
        )
        task = people.agent.request(
            "aws-deploy", {"environment": "staging", "change": "CHG-2222"}
        ).json()
        people.manager1.approve(task["id"])
        gate = threading.Barrier(2)
        results: dict[str, Any] = {}

        def race(name: str, call: Any) -> None:
            gate.wait()
            results[name] = call()

        a = threading.Thread(
            target=race, args=("approved", lambda: people.manager2.approve(task["id"]))
        )
        d = threading.Thread(target=race, args=("denied", lambda: manager3.deny(task["id"])))
        for t in (a, d):
            t.start()
        for t in (a, d):
            t.join()
        codes = {name: r.status_code for name, r in results.items()}
        assert sorted(codes.values()) == [200, 409]
        winner = next(name for name, code in codes.items() if code == 200)
        assert people.agent.task(task["id"])["state"] == winner
        decisions = [e for e in events(broker, task["id"]) if e["name"] == "broker.task.decision"]
        assert [d["attributes"]["broker.decision"] for d in decisions] == [winner]


@pytest.mark.postgres
def test_concurrent_requests_with_one_idempotency_key(
    pg_url: str, issuer: TestIssuer, make_settings: Any
) -> None:
    """Five identical requests with the same Idempotency-Key at once, on PostgreSQL: one task,
    created once (201) and replayed to the others (200)."""
    with running(settings_for(make_settings, issuer, database_url=pg_url)) as (broker, client):
        agent = cast(client, issuer).agent
        gate = threading.Barrier(5)
        answers: list[Any] = []

        def ask() -> None:
            gate.wait()
            answers.append(agent.request("vault-kv-read", key="same-key"))

        threads = [threading.Thread(target=ask) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(r.status_code for r in answers) == [200, 200, 200, 200, 201]
        assert len({r.json()["id"] for r in answers}) == 1
        with broker.db.read() as conn:
            assert len(repo.list_tasks(conn)) == 1
