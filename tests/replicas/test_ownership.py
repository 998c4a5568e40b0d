"""A task belongs to the run that asked for it, across two real replicas on PostgreSQL.

The issuer names the run identity (``run_id`` + ``run_attempt``, as the GitHub preset does).
A sibling session of the same principal (another CI run) sends every request to the *other*
replica than the owner: it can neither list, read, mint, use nor complete the task, and each
refusal is audited in the task's trace; a new session of the same run can do all of it; a scope
with ``share: principal`` is reachable from any of the principal's sessions; limits stay per
principal.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.store import Database, repo
from tests.replicas.cluster import (
    Agent,
    Cluster,
    base_config,
    complete,
    login,
    mint,
    race,
    request_task,
    scope_folder,
    vault_config,
)
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

SHARED = """\
name: replica-kv-shared
description: Read the demo secrets from any session of the requester.
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
max_active_tasks: 100
risk: low
share: principal
approval:
  mode: auto
"""


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory,
    pg_store: str,
    issuer: TestIssuer,
    openbao: OpenBao,
    otlp_module: OtlpReceiver,
) -> Iterator[Cluster]:
    """Two replicas whose issuer names the run identity claims."""
    base: Path = tmp_path_factory.mktemp("ownership")
    config = base_config(
        database_url=pg_store,
        issuer=issuer,
        scopes_dir=scope_folder(base, {"replica-kv-shared": SHARED}),
        issuers=[
            issuer.issuer_config(
                claims={"roles": "broker_roles", "run_identity": ["run_id", "run_attempt"]},
                require_jti=True,
            )
        ],
        vault=vault_config(openbao.addr, openbao.broker_token),
        otlp={"endpoint": otlp_module.endpoint},
        reaper_interval=3600.0,
    )
    nodes = Cluster(base, config, count=2)
    try:
        nodes.start()
    except Exception:
        print(nodes.logs())
        nodes.stop()
        raise
    yield nodes
    nodes.stop()


def sub(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def run(run_id: str, attempt: str = "1") -> dict[str, Any]:
    return {"run_id": run_id, "run_attempt": attempt}


def refusals(store: Database, task_id: str) -> list[tuple[str, str]]:
    with store.read() as conn:
        rows = repo.audit_events(conn, task_id=task_id, name="broker.request.denied", limit=1000)
    return [
        (e["attributes"]["broker.request.kind"], e["attributes"]["broker.refusal.reason"])
        for e in rows
        if e["attributes"].get("broker.refusal.code") == "unknown_task"
    ]


def report(client: httpx.Client, agent: Agent, task_id: str) -> httpx.Response:
    body = {"command": ["true"], "exit_code": 0, "started_at": 1.0, "ended_at": 2.0}
    return client.post(f"/v1/tasks/{task_id}/exec", json=body, headers=agent.auth)


def test_a_sibling_session_on_the_other_replica_reaches_nothing(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """The owner (run 1, replica 0) holds an approved task; its sibling (the same principal in
    run 2, on replica 1) does not see it listed and gets 404 ``unknown_task`` reading, minting,
    reporting a run, completing and cancelling it; nothing is minted and the task is still
    approved; every refusal is audited in the task's trace as ``another_session``. Then the
    owner mints, runs and completes it from replica 1."""
    name = sub("sibling")
    owner = login(clients[0], issuer, name, **run("1"))
    sibling = login(clients[1], issuer, name, **run("2"))
    made = request_task(clients[0], owner, "replica-kv")
    assert made.status_code == 201, made.text
    task_id = made.json()["id"]

    other = clients[1]
    listed = other.get("/v1/tasks", headers=sibling.auth)
    assert listed.status_code == 200 and task_id not in {t["id"] for t in listed.json()}
    answers = [
        other.get(f"/v1/tasks/{task_id}", headers=sibling.auth),
        mint(other, sibling, task_id),
        report(other, sibling, task_id),
        complete(other, sibling, task_id),
        other.post(f"/v1/tasks/{task_id}/cancel", headers=sibling.auth),
    ]
    assert [(r.status_code, r.json()["code"]) for r in answers] == [(404, "unknown_task")] * 5
    unknown = other.get("/v1/tasks/tsk_doesnotexist", headers=sibling.auth)
    assert answers[0].json()["detail"] == unknown.json()["detail"]  # nothing tells them apart
    with store.read() as conn:
        assert repo.credentials_for(conn, task_id) == []
        task = repo.get_task(conn, task_id)
    assert task is not None and task.state.value == "approved"
    assert sorted(refusals(store, task_id)) == sorted(
        (kind, "another_session") for kind in ("read", "mint", "exec_report", "complete", "cancel")
    )

    minted = mint(other, owner, task_id)
    assert minted.status_code == 201, minted.text
    assert report(other, owner, task_id).status_code == 201
    assert report(other, sibling, task_id).status_code == 404
    assert complete(other, owner, task_id).json()["state"] == "completed"


def test_a_new_session_of_the_same_run_picks_the_task_up(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """An agent that exchanged a fresh ID token of the same run (same run_id and run_attempt)
    on the other replica lists, reads, mints, reports and completes the task its first session
    asked for; a re-run (another attempt) and another principal of the same run reach nothing."""
    name = sub("rerun")
    first = login(clients[0], issuer, name, **run("77"))
    me = clients[0].get("/v1/sessions/current", headers=first.auth).json()
    assert (me["via"], me["run_bound"]) == ("api", True)
    task_id = request_task(clients[0], first, "replica-kv").json()["id"]
    again = login(clients[1], issuer, name, **run("77"))
    retried = login(clients[1], issuer, name, **run("77", "2"))
    stranger = login(clients[1], issuer, sub("stranger"), **run("77"))
    other = clients[1]
    assert task_id in {t["id"] for t in other.get("/v1/tasks", headers=again.auth).json()}
    assert other.get(f"/v1/tasks/{task_id}", headers=again.auth).status_code == 200
    for outsider in (retried, stranger):
        assert other.get(f"/v1/tasks/{task_id}", headers=outsider.auth).status_code == 404
        assert mint(other, outsider, task_id).status_code == 404
    assert mint(other, again, task_id).status_code == 201
    assert report(other, again, task_id).status_code == 201
    assert complete(clients[0], first, task_id).json()["state"] == "completed"
    assert sorted(reason for _, reason in refusals(store, task_id)) == [
        "another_principal",
        "another_principal",
        "another_session",
        "another_session",
    ]


def test_an_approval_belongs_to_the_session_that_asked(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Two reviewers approve a task; the requester's sibling session and the requester's own
    session race to mint it on different replicas: only the requester mints (one credential),
    the sibling gets 404."""
    name = sub("approved")
    owner = login(clients[0], issuer, name, **run("5"))
    sibling = login(clients[1], issuer, name, **run("6"))
    task_id = request_task(clients[0], owner, "replica-kv-two").json()["id"]
    for i, client in enumerate(clients):
        reviewer = login(
            client, issuer, sub(f"reviewer{i}"), groups=["reviewers"], broker_roles=["approver"]
        )
        decided = client.post(
            f"/v1/approvals/{task_id}/approve", json={"reason": "fine"}, headers=reviewer.auth
        )
        assert decided.status_code == 200, decided.text
    assert decided.json()["state"] == "approved"
    answers = race(
        [partial(mint, clients[0], owner, task_id), partial(mint, clients[1], sibling, task_id)]
    )
    assert [r.status_code for r in answers] == [201, 404]
    with store.read() as conn:
        assert [c.state.value for c in repo.credentials_for(conn, task_id)] == ["active"]
    complete(clients[0], owner, task_id)


def test_a_shared_scope_is_reachable_from_every_session_of_the_principal(
    clients: list[httpx.Client], issuer: TestIssuer
) -> None:
    """``share: principal``: a task of the shared scope is listed, read, minted and completed by
    another session of the requester (no run identity at all) on the other replica; another
    principal still reaches nothing."""
    name = sub("shared")
    first = login(clients[0], issuer, name)
    second = login(clients[1], issuer, name)
    stranger = login(clients[1], issuer, sub("stranger"))
    task_id = request_task(clients[0], first, "replica-kv-shared").json()["id"]
    other = clients[1]
    assert task_id in {t["id"] for t in other.get("/v1/tasks", headers=second.auth).json()}
    assert other.get(f"/v1/tasks/{task_id}", headers=stranger.auth).status_code == 404
    assert mint(other, second, task_id).status_code == 201
    assert complete(other, second, task_id).json()["state"] == "completed"


def test_limits_and_idempotency_keys_stay_per_principal(
    clients: list[httpx.Client], issuer: TestIssuer
) -> None:
    """``max_active_tasks`` counts the principal's open tasks whichever session holds them: a
    sibling session cannot open a second task of a one-at-a-time scope. An Idempotency-Key the
    owner used is not replayed to the sibling (409, and the owner's task is not named)."""
    name = sub("limits")
    owner = login(clients[0], issuer, name, **run("9"))
    sibling = login(clients[1], issuer, name, **run("10"))
    held = request_task(clients[0], owner, "replica-kv-single")
    assert held.status_code == 201
    over = request_task(clients[1], sibling, "replica-kv-single")
    assert (over.status_code, over.json()["code"]) == (429, "too_many_active_tasks")
    first = request_task(clients[0], owner, "replica-kv", key="same-key")
    assert first.status_code == 201
    reused = request_task(clients[1], sibling, "replica-kv", key="same-key")
    assert (reused.status_code, reused.json()["code"]) == (409, "idempotency_key_reused")
    assert first.json()["id"] not in reused.text
    assert "task_id" not in reused.json()
    for task_id in (held.json()["id"], first.json()["id"]):
        complete(clients[0], owner, task_id)
