"""Races between two real broker processes sharing one PostgreSQL database.

Every test sends the competing requests to *different* replicas at the same moment (threads
released by a barrier) and then checks the store, OpenBao and the audit trail: what must happen
once happened once, whichever replica won.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from functools import partial
from typing import Any

import httpx
import pytest

from broker.store import Database, repo
from tests.replicas.cluster import (
    Agent,
    Cluster,
    complete,
    exchange,
    live_tokens,
    login,
    mint,
    race,
    request_task,
    wait_until,
)
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


def events(store: Database, **filters: Any) -> list[dict[str, Any]]:
    with store.read() as conn:
        return repo.audit_events(conn, limit=100_000, **filters)


def credentials(store: Database, task_id: str) -> list[Any]:
    with store.read() as conn:
        return repo.credentials_for(conn, task_id)


def unique_sub(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_an_id_token_presented_to_both_replicas_at_once_opens_one_session(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """jti replay: the same ID token sent twice to each replica at the same moment opens exactly
    one session, round after round; the three others are refused as replays (400
    ``token_replayed``) and each refusal is audited: in full, or (beyond the first of a window
    from the same address) counted in that window's summary."""
    sub = unique_sub("jti")
    for _ in range(5):
        token = issuer.token(sub)
        answers = race([partial(exchange, c, token) for c in clients * 2])
        assert sorted(r.status_code for r in answers) == [200, 400, 400, 400]
        assert (
            sorted(r.json()["code"] for r in answers if r.status_code == 400)
            == ["token_replayed"] * 3
        )
    starts = [e for e in events(store, name="broker.session.start") if e["actor_subject"] == sub]
    assert len(starts) == 5
    replays = [
        e
        for e in events(store, name="broker.auth.failure")
        if "token_replayed" in str(e["attributes"]) and sub in str(e["attributes"])
    ]
    assert replays
    since = min(e["time"] for e in replays)

    def accounted() -> int:
        summarised = sum(
            e["attributes"]["broker.auth.count"]
            for e in events(store, name="broker.auth.failure_summary")
            if e["attributes"]["broker.auth.reason"] == "token_replayed"
            and e["attributes"]["broker.auth.window_end"] > since
        )
        return len(replays) + summarised

    wait_until(lambda: accounted() >= 15, timeout=30, what="every replay in full or summarised")
    assert accounted() == 15


def test_one_idempotency_key_on_both_replicas_creates_one_task(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Idempotency-Key on task requests: the same key and body sent to both replicas at once
    yields one task; every answer names it (one 201, the others 200 ``Idempotent-Replayed``)."""
    agent = login(clients[0], issuer, unique_sub("idem"))
    for round_ in range(4):
        key = f"deploy-{round_}"
        answers = race(
            [partial(request_task, c, agent, "replica-kv", key=key) for c in clients * 2]
        )
        assert sorted(r.status_code for r in answers) == [200, 200, 200, 201], [
            r.text for r in answers
        ]
        assert len({r.json()["id"] for r in answers}) == 1
        assert all(
            r.headers.get("Idempotent-Replayed") == "true" for r in answers if r.status_code == 200
        )
    requests = [
        e for e in events(store, name="broker.task.request") if e["actor_subject"] == agent.subject
    ]
    assert len(requests) == 4


def _approved_task(client: httpx.Client, agent: Agent) -> str:
    resp = request_task(client, agent, "replica-kv")
    assert resp.status_code == 201, resp.text
    assert resp.json()["state"] == "approved"
    task_id: str = resp.json()["id"]
    return task_id


def test_a_mint_idempotency_key_on_both_replicas_mints_once(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    """Idempotency-Key on mints: the same key sent to both replicas at once mints one OpenBao
    token; the other answer is a 409 naming the same credential (``mint_in_progress`` while
    the first is under way, ``already_issued`` after), never a second secret."""
    agent = login(clients[1], issuer, unique_sub("mint-key"))
    for _ in range(3):
        task_id = _approved_task(clients[0], agent)
        answers = race([partial(mint, c, agent, task_id, key="k1") for c in clients])
        codes = sorted(r.status_code for r in answers)
        assert codes == [201, 409], [r.text for r in answers]
        won = next(r for r in answers if r.status_code == 201)
        lost = next(r for r in answers if r.status_code == 409)
        assert lost.json()["code"] in ("mint_in_progress", "already_issued")
        assert lost.json()["credential_id"] == won.json()["credential_id"]
        assert '"secret"' not in lost.text  # no secret member in the refusal
        for value in won.json()["secret"].values():
            assert value not in lost.text
        creds = credentials(store, task_id)
        assert [c.state.value for c in creds] == ["active"]
    tokens = live_tokens(openbao.addr, openbao.root_token, cluster.config["cluster_name"])
    ours = {c.id for t in _tasks_of(store, agent) for c in credentials(store, t)}
    assert len(ours & set(tokens)) == 3


def _tasks_of(store: Database, agent: Agent) -> list[str]:
    with store.read() as conn:
        return [t.id for t in repo.list_tasks(conn, subject=agent.subject, limit=1000)]


def test_an_approval_is_used_once_across_replicas(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    """Single-use grants: an approved task minted from both replicas at once (no key, twice
    each) yields exactly one credential and one OpenBao token; the others are 409
    ``already_issued``, each refusal audited."""
    agent = login(clients[0], issuer, unique_sub("single-use"))
    for _ in range(3):
        task_id = _approved_task(clients[1], agent)
        answers = race([partial(mint, c, agent, task_id) for c in clients * 2])
        assert sorted(r.status_code for r in answers) == [201, 409, 409, 409]
        assert {r.json()["code"] for r in answers if r.status_code == 409} == {"already_issued"}
        assert [c.state.value for c in credentials(store, task_id)] == ["active"]
        issued = [
            e for e in events(store, task_id=task_id) if e["name"] == "broker.credential.issue"
        ]
        assert [e["outcome"] for e in issued] == ["success"]
        refused = [
            e
            for e in events(store, task_id=task_id)
            if e["attributes"].get("broker.refusal.code") == "already_issued"
        ]
        assert len(refused) == 3
        tokens = live_tokens(openbao.addr, openbao.root_token, cluster.config["cluster_name"])
        assert sum(1 for c in credentials(store, task_id) if c.id in tokens) == 1


def test_two_approvers_on_two_replicas_decide_a_task_once(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Approval consumption: two reviewers approving at the same moment on different replicas
    approve the task exactly once (one decision event, two approvals); the same reviewer
    approving on both replicas at once is counted once (the other gets 409 ``already_decided``);
    approve and deny racing leave one consistent outcome."""
    agent = login(clients[0], issuer, unique_sub("two-approvals"))
    rita = login(
        clients[0], issuer, unique_sub("rita"), groups=["reviewers"], broker_roles=["approver"]
    )
    ravi = login(
        clients[1], issuer, unique_sub("ravi"), groups=["reviewers"], broker_roles=["approver"]
    )

    def ask() -> str:
        resp = request_task(clients[0], agent, "replica-kv-two")
        assert resp.status_code == 201 and resp.json()["state"] == "pending", resp.text
        task_id: str = resp.json()["id"]
        return task_id

    def decide(client: httpx.Client, who: Agent, task_id: str, verb: str) -> httpx.Response:
        return client.post(
            f"/v1/approvals/{task_id}/{verb}", json={"reason": "race"}, headers=who.auth
        )

    # Two approvers at once: the rule (two of them) is met exactly once.
    for _ in range(3):
        task_id = ask()
        answers = race(
            [
                partial(decide, clients[0], rita, task_id, "approve"),
                partial(decide, clients[1], ravi, task_id, "approve"),
            ]
        )
        assert [r.status_code for r in answers] == [200, 200], [r.text for r in answers]
        with store.read() as conn:
            assert repo.get_task(conn, task_id).state.value == "approved"  # type: ignore[union-attr]
            assert len(repo.approvals_for(conn, task_id)) == 2
        decisions = [
            e
            for e in events(store, task_id=task_id)
            if e["name"] == "broker.task.decision" and e["outcome"] == "success"
        ]
        assert len(decisions) == 1

    # The same approver on both replicas at once: one approval.
    task_id = ask()
    answers = race(
        [
            lambda: decide(clients[0], rita, task_id, "approve"),
            lambda: decide(clients[1], rita, task_id, "approve"),
        ]
    )
    assert sorted(r.status_code for r in answers) == [200, 409]
    assert next(r for r in answers if r.status_code == 409).json()["code"] == "already_decided"
    with store.read() as conn:
        assert len(repo.approvals_for(conn, task_id)) == 1
        assert repo.get_task(conn, task_id).state.value == "pending"  # type: ignore[union-attr]

    # Approve and deny at once by the two reviewers: whichever order, a denial wins and stays.
    task_id = ask()
    race(
        [
            lambda: decide(clients[0], rita, task_id, "approve"),
            lambda: decide(clients[1], ravi, task_id, "deny"),
        ]
    )
    with store.read() as conn:
        assert repo.get_task(conn, task_id).state.value == "denied"  # type: ignore[union-attr]
    assert mint(clients[0], agent, task_id).status_code == 409


def test_completion_and_admin_kill_racing_revoke_once(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    """Revocation: completing a task on one replica while an admin kills it on the other (and
    completes it again there) revokes its OpenBao token once: one successful revoke event, the
    token gone, the task in one terminal state, and the losers told why (409) or shown the
    already-revoked credential."""
    agent = login(clients[0], issuer, unique_sub("revoke-race"))
    admin = login(clients[1], issuer, unique_sub("admin"), broker_roles=["admin"])
    for _ in range(3):
        task_id = _approved_task(clients[0], agent)
        assert mint(clients[1], agent, task_id).status_code == 201
        (cred,) = credentials(store, task_id)
        answers = race(
            [
                partial(complete, clients[0], agent, task_id),
                partial(complete, clients[1], agent, task_id),
                partial(
                    clients[1].post,
                    f"/v1/admin/tasks/{task_id}/revoke",
                    json={"reason": "race"},
                    headers=admin.auth,
                ),
            ]
        )
        assert all(r.status_code in (200, 409) for r in answers), [r.text for r in answers]
        assert any(r.status_code == 200 for r in answers)
        (after,) = credentials(store, task_id)
        assert after.state.value == "revoked"
        revokes = [
            e
            for e in events(store, credential_id=cred.id)
            if e["name"] == "broker.credential.revoke"
        ]
        assert [e["outcome"] for e in revokes] == ["success"]
        tokens = live_tokens(openbao.addr, openbao.root_token, cluster.config["cluster_name"])
        assert cred.id not in tokens


def _later(delay: float, call: Any) -> Any:
    time.sleep(delay)
    return call()


def test_a_mint_racing_completion_or_logout_on_the_other_replica_leaves_nothing_alive(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    """Revocation against minting: a mint on one replica while the task is completed (or the
    whole session ended) on the other. Whichever wins, the task ends completed and no OpenBao
    token of it is left alive: either the mint is refused (409), or it is taken back by the
    mint itself (``task_ended``) or by the completion; a secret is only ever returned for a
    credential that is then revoked."""
    outcomes: Counter[str] = Counter()
    for round_ in range(8):
        agent = login(clients[0], issuer, unique_sub("mint-vs-end"))
        task_id = _approved_task(clients[round_ % 2], agent)
        minting, ending = clients[round_ % 2], clients[(round_ + 1) % 2]
        if round_ % 3 == 2:
            end = partial(ending.delete, "/v1/sessions/current", headers=agent.auth)
        else:
            end = partial(complete, ending, agent, task_id)
        # Staggered by a few milliseconds a round, so the end lands before, during and after
        # the mint's backend call.
        minted, ended = race(
            [partial(mint, minting, agent, task_id), partial(_later, round_ * 0.004, end)]
        )
        assert ended.status_code in (200, 204), ended.text
        assert minted.status_code in (201, 409, 401), minted.text
        outcomes[f"{minted.status_code} {minted.json().get('code', '')}".strip()] += 1
        with store.read() as conn:
            task = repo.get_task(conn, task_id)
        assert task is not None and task.state.value in ("completed", "cancelled")

        def settled(task_id: str = task_id) -> bool:
            creds = credentials(store, task_id)
            return all(c.state.value in ("revoked", "failed") for c in creds)

        wait_until(settled, timeout=30, what="the task's credentials to be taken back")
        tokens = live_tokens(openbao.addr, openbao.root_token, cluster.config["cluster_name"])
        assert not {c.id for c in credentials(store, task_id)} & set(tokens)
    print("mint outcomes:", dict(outcomes))


def test_reapers_on_both_replicas_share_the_work_without_a_leader(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    cluster: Cluster,
    openbao: OpenBao,
) -> None:
    """The reaper: twelve active tasks whose sessions have expired are ended by passes run on
    both replicas at once, round after round (batches of four, ``SKIP LOCKED`` claims): each
    task expires once, each token is revoked once, both replicas did part of the work, and
    credentials that lapsed meanwhile are reported expired once."""
    admin = login(clients[0], issuer, unique_sub("reaper-admin"), broker_roles=["admin"])
    agents = [login(clients[i % 2], issuer, unique_sub("reaped")) for i in range(3)]
    tasks: list[str] = []
    for i in range(12):
        agent = agents[i % 3]
        task_id = _approved_task(clients[i % 2], agent)
        assert mint(clients[(i + 1) % 2], agent, task_id).status_code == 201
        tasks.append(task_id)
    creds = {t: credentials(store, t)[0] for t in tasks}
    # The sessions expire (as the clock would make them): their tasks must end.
    from sqlalchemy import text

    with store.write() as conn:
        conn.execute(
            text("UPDATE sessions SET expires_at = expires_at - 100000 WHERE subject = ANY(:s)"),
            {"s": [a.subject for a in agents]},
        )

    def run(client: httpx.Client) -> dict[str, Any]:
        resp = client.post("/v1/admin/reaper/run", headers=admin.auth)
        assert resp.status_code == 200, resp.text
        report: dict[str, Any] = resp.json()
        return report

    done: Counter[int] = Counter()
    for _ in range(6):
        reports = race([lambda c=c: run(c) for c in clients])
        for index, report in enumerate(reports):
            done[index] += report["tasks_expired"]
        with store.read() as conn:
            if all(repo.get_task(conn, t).state.value == "expired" for t in tasks):  # type: ignore[union-attr]
                break
    assert sum(done.values()) == 12
    assert done[0] > 0 and done[1] > 0, done
    for task_id in tasks:
        task_events = events(store, task_id=task_id)
        assert [e["name"] for e in task_events].count("broker.task.expire") == 1
        revokes = [e for e in task_events if e["name"] == "broker.credential.revoke"]
        assert [e["outcome"] for e in revokes] == ["success"], revokes
    tokens = live_tokens(openbao.addr, openbao.root_token, cluster.config["cluster_name"])
    assert not {c.id for c in creds.values()} & set(tokens)


def test_lapsed_credentials_are_reported_once_by_racing_reapers(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Credentials past their expiry (the backend expired them itself) are marked expired by
    whichever replica's reaper gets there first: one ``broker.credential.expire`` event each,
    however many replicas run the step at once."""
    admin = login(clients[0], issuer, unique_sub("lapse-admin"), broker_roles=["admin"])
    agent = login(clients[1], issuer, unique_sub("lapsed"))
    cred_ids = []
    for i in range(6):
        task_id = _approved_task(clients[i % 2], agent)
        assert mint(clients[i % 2], agent, task_id).status_code == 201
        cred_ids.append(credentials(store, task_id)[0].id)
    from sqlalchemy import text

    with store.write() as conn:
        conn.execute(
            text("UPDATE credentials SET expires_at = expires_at - 100000 WHERE id = ANY(:ids)"),
            {"ids": cred_ids},
        )
    for _ in range(3):
        race([lambda c=c: c.post("/v1/admin/reaper/run", headers=admin.auth) for c in clients * 2])
    for cred_id in cred_ids:
        names = [e["name"] for e in events(store, credential_id=cred_id)]
        assert names.count("broker.credential.expire") == 1, names


def test_a_shared_quota_holds_across_replicas(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """Shared rate limits: a scope allowing five requests a day (for everyone together) gets
    twelve requests from three agents spread over both replicas at once: exactly five tasks
    are created, the seven others are 429 with ``Retry-After``, and each refusal is audited."""
    agents = [login(clients[i % 2], issuer, unique_sub("quota")) for i in range(3)]
    calls = [
        (lambda i=i: request_task(clients[i % 2], agents[i % 3], "replica-kv-limited"))
        for i in range(12)
    ]
    answers = race(calls)
    codes = Counter(r.status_code for r in answers)
    assert codes == {201: 5, 429: 7}, [r.text for r in answers]
    assert all(int(r.headers["Retry-After"]) > 0 for r in answers if r.status_code == 429)
    denied = [
        e
        for e in events(store, name="broker.request.denied")
        if e["attributes"].get("broker.refusal.code") == "rate_limited"
        and e["actor_subject"] in {a.subject for a in agents}
    ]
    assert len(denied) == 7


def test_the_open_task_cap_holds_across_replicas(
    clients: list[httpx.Client], issuer: TestIssuer, store: Database
) -> None:
    """``max_active_tasks: 1``: one agent asking on both replicas at once (four requests) holds
    one open task; the others are 429 ``too_many_active_tasks``."""
    agent = login(clients[0], issuer, unique_sub("single-open"))
    for _ in range(3):
        answers = race(
            [lambda c=c: request_task(c, agent, "replica-kv-single") for c in clients * 2]
        )
        codes = Counter(r.status_code for r in answers)
        assert codes == {201: 1, 429: 3}, [r.text for r in answers]
        assert {r.json()["code"] for r in answers if r.status_code == 429} == {
            "too_many_active_tasks"
        }
        task_id = next(r.json()["id"] for r in answers if r.status_code == 201)
        assert complete(clients[1], agent, task_id).status_code == 200


def test_the_audit_trail_of_the_races_is_whole_and_exported_once(
    clients: list[httpx.Client],
    issuer: TestIssuer,
    store: Database,
    otlp_module: OtlpReceiver,
) -> None:
    """After all the races: the hash chain and every checkpoint (signed by either replica's
    own key) verify from both replicas, and every audit event crossed the wire to the
    collector exactly once (span ids counted at both ends)."""
    auditor = login(clients[0], issuer, unique_sub("auditor"), broker_roles=["auditor"])
    for client in clients:
        resp = client.get("/v1/audit/verify", headers=auditor.auth)
        assert resp.status_code == 200, resp.text
        assert resp.json()["ok"] is True, resp.json()

    def drained() -> bool:
        with store.read() as conn:
            return repo.count_unexported(conn) == 0

    wait_until(drained, timeout=30, what="the outbox to drain")
    with store.read() as conn:
        stored = {e["span_id"] for e in repo.audit_events(conn, limit=1_000_000)}
    wire = Counter(s.span_id for s in otlp_module.spans)
    assert set(wire) == stored
    assert max(wire.values()) == 1
