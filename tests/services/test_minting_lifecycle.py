"""Minting and repair through the real services and store, with a test double as the backend
(``tests/backends/test_contract.py`` proves it behaves like the real ones; the real backends are
exercised end to end in ``tests/api/test_minting_api.py`` and ``tests/services/test_crash.py``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker.backends.base import MintOutcomeUnknown, MintRequest
from broker.domain.records import Credential, Session, Task
from broker.domain.task import CredentialState, TaskState
from broker.errors import AuditUnavailable, Conflict, ServiceUnavailable
from broker.services.credentials import Issued
from broker.services.tasks import TaskRequest
from broker.store import Database, repo
from broker.wiring import Broker, build_broker
from tests.api.flows import Clock
from tests.backends.fakes import FakeBackend
from tests.support.issuer import TestIssuer


@dataclass
class Harness:
    broker: Broker
    fake: FakeBackend
    clock: Clock
    session: Session

    def task(self, scope: str = "vault-kv-read") -> Task:
        return self.broker.tasks.request(
            self.session, TaskRequest(scope=scope, params={}, purpose="a lifecycle test")
        )

    def mint(self, task: Task, key: str | None = None) -> Issued:
        return self.broker.credentials.mint(self.session, task.id, key)

    def cred(self, credential_id: str) -> Credential:
        with self.broker.db.read() as conn:
            cred = repo.get_credential(conn, credential_id)
        assert cred is not None
        return cred

    def creds(self, task: Task) -> list[Credential]:
        with self.broker.db.read() as conn:
            return repo.credentials_for(conn, task.id)

    def get_task(self, task: Task) -> Task:
        with self.broker.db.read() as conn:
            found = repo.get_task(conn, task.id)
        assert found is not None
        return found

    def events(self, name: str, credential_id: str | None = None) -> list[dict[str, Any]]:
        with self.broker.db.read() as conn:
            return repo.audit_events(conn, name=name, credential_id=credential_id, limit=1000)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, sqlite_url: str) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url
    else:
        yield request.getfixturevalue("pg_url")


def harness_for(
    make_settings: Any, issuer: TestIssuer, url: str, **overrides: Any
) -> Iterator[Harness]:
    clock = Clock()
    fake = FakeBackend()
    settings = make_settings(
        database_url=url,
        cluster_name="lifecycle",
        reaper_mint_grace=30,
        session_max_ttl=86_400,
        **overrides,
    )
    broker = build_broker(settings, clock=clock, backends={"vault": fake})
    session = broker.sessions.exchange(issuer.token("agent-1", ttl=20_000)).session
    try:
        yield Harness(broker, fake, clock, session)
    finally:
        broker.stop()


@pytest.fixture
def h(make_settings: Any, issuer: TestIssuer, store_url: str) -> Iterator[Harness]:
    yield from harness_for(make_settings, issuer, store_url)


@pytest.fixture
def hs(make_settings: Any, issuer: TestIssuer, sqlite_url: str) -> Iterator[Harness]:
    """SQLite only, for tests whose point is not the store."""
    yield from harness_for(make_settings, issuer, sqlite_url)


def test_the_intent_is_recorded_before_the_backend_is_called(h: Harness) -> None:
    """While the backend mints, the credential already exists as ``minting`` with the plan's
    identifiers, and the task's grant is taken; afterwards it is ``active`` with its handle."""
    seen: list[Credential] = []

    def observe(request: MintRequest) -> None:
        seen.append(h.cred(request.credential_id))

    h.fake.during_mint = observe
    task = h.task()
    issued = h.mint(task)
    assert seen[0].state is CredentialState.MINTING
    assert seen[0].details == {"meta": {"broker_credential": issued.credential.id}}
    assert seen[0].handle is None
    after = h.cred(issued.credential.id)
    assert after.state is CredentialState.ACTIVE
    assert after.handle == issued.minted.handle
    assert h.get_task(task).state is TaskState.ACTIVE
    issue = h.events("broker.credential.issue", issued.credential.id)
    assert [e["outcome"] for e in issue] == ["success"]
    assert issued.minted.secret["token"] not in str(issue)


def test_an_outage_leaves_no_partial_record_and_the_same_key_retries_safely(h: Harness) -> None:
    """The backend is down: 503, the credential attempt is ``failed`` (nothing exists), the task
    can still mint; the retry with the same Idempotency-Key mints once; a third call is refused."""
    task = h.task()
    h.fake.down = True
    with pytest.raises(ServiceUnavailable) as down:
        h.mint(task, key="retry-me")
    assert down.value.status == 503
    [failed] = h.creds(task)
    assert failed.state is CredentialState.FAILED and failed.handle is None
    assert failed.idempotency_key is None  # the key is free for the retry
    assert h.get_task(task).state is TaskState.APPROVED and h.get_task(task).mints == 0
    assert h.fake.objects == {}
    h.fake.down = False
    issued = h.mint(task, key="retry-me")
    assert issued.credential.state is CredentialState.ACTIVE
    with pytest.raises(Conflict) as again:
        h.mint(task, key="retry-me")
    assert again.value.code == "already_issued"
    assert again.value.extra["credential_id"] == issued.credential.id
    assert len(h.fake.objects) == 1


def test_an_unknown_outcome_is_left_for_the_reaper_which_revokes_what_was_made(h: Harness) -> None:
    """The backend made the credential but its answer was lost: ``revoke_pending`` without a
    handle; the reaper's next pass finds it by its metadata and revokes it."""
    task = h.task()
    h.fake.fail_mint = "unknown"
    with pytest.raises(MintOutcomeUnknown):
        h.mint(task)
    [pending] = h.creds(task)
    assert pending.state is CredentialState.REVOKE_PENDING and pending.handle is None
    assert len(h.fake.objects) == 1
    report = h.broker.reaper.run_once(orphan_scan=False)  # type: ignore[union-attr]
    assert report.revoked == 1
    assert h.fake.objects == {}
    assert h.cred(pending.id).state is CredentialState.REVOKED


def test_a_failed_issuance_record_revokes_what_was_minted(
    hs: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: when the issuance event cannot be written, the minted credential is revoked
    before the error (503) reaches the caller."""
    task = hs.task()
    import broker.services.credentials as credentials

    def broken(conn: Any, event: Any) -> None:
        raise AuditUnavailable(internal="disk full")

    monkeypatch.setattr(credentials, "record", broken)
    with pytest.raises(AuditUnavailable):
        hs.mint(task)
    assert hs.fake.objects == {}
    [cred] = hs.creds(task)
    assert cred.state is CredentialState.REVOKED


def test_a_task_completed_while_minting_gets_nothing(hs: Harness) -> None:
    """The agent completes the task while its credential is being minted: the mint answers 409
    and what it made is revoked."""
    task = hs.task()
    hs.fake.during_mint = lambda request: hs.broker.tasks.complete(hs.session, task.id)
    with pytest.raises(Conflict) as ended:
        hs.mint(task)
    assert ended.value.code == "task_ended"
    assert hs.fake.objects == {}
    assert hs.get_task(task).state is TaskState.COMPLETED


def test_a_crashed_mint_is_repaired_once_its_intent_is_stale(hs: Harness) -> None:
    """The process dies between the backend call and the record (simulated by an exception no
    handler catches): the credential exists, the record says ``minting``; the reaper leaves it
    alone while a mint could still be running, then revokes it."""

    class Crash(BaseException):
        pass

    real_mint = hs.fake.mint

    def mint_then_crash(request: MintRequest) -> Any:
        real_mint(request)
        raise Crash

    hs.fake.mint = mint_then_crash  # type: ignore[method-assign]
    task = hs.task()
    with pytest.raises(Crash):
        hs.mint(task)
    [cred] = hs.creds(task)
    assert cred.state is CredentialState.MINTING and len(hs.fake.objects) == 1
    reaper = hs.broker.reaper
    assert reaper is not None
    reaper.run_once(orphan_scan=True)
    assert len(hs.fake.objects) == 1  # still within the grace: a mint may be under way
    hs.clock.advance(31)
    report = reaper.run_once(orphan_scan=False)
    assert report.repaired == 1
    assert hs.fake.objects == {}
    assert hs.cred(cred.id).state is CredentialState.REVOKED


def test_failed_revocations_are_retried_with_backoff_and_visible_meanwhile(h: Harness) -> None:
    """Completion while the backend refuses: ``revoke_pending`` with the next attempt scheduled
    (2 s, then 4 s); the reaper does not retry early, then succeeds; each attempt is audited."""
    task = h.task()
    issued = h.mint(task)
    h.fake.fail_revoke = 2
    h.broker.tasks.complete(h.session, task.id)
    pending = h.cred(issued.credential.id)
    assert pending.state is CredentialState.REVOKE_PENDING
    assert pending.revoke_attempts == 1 and pending.last_error
    assert pending.next_attempt_at == pytest.approx(h.clock() + 2, abs=1)
    listed = h.broker.revoker.credentials(states=[CredentialState.REVOKE_PENDING])
    assert [c.id for c in listed] == [pending.id]
    reaper = h.broker.reaper
    assert reaper is not None
    assert reaper.run_once(orphan_scan=False).revoke_failed == 0  # not due yet
    h.clock.advance(2.5)
    assert reaper.run_once(orphan_scan=False).revoke_failed == 1
    second = h.cred(pending.id)
    assert second.revoke_attempts == 2
    assert second.next_attempt_at == pytest.approx(h.clock() + 4, abs=1)
    h.clock.advance(4.5)
    assert reaper.run_once(orphan_scan=False).revoked == 1
    assert h.cred(pending.id).state is CredentialState.REVOKED
    assert h.fake.objects == {}
    outcomes = [e["outcome"] for e in h.events("broker.credential.revoke", pending.id)]
    assert outcomes == ["failure", "failure", "success"]


def test_expiry_and_session_end_revoke(hs: Harness) -> None:
    """An active task past its credential's end expires (and its credential is revoked); a task of
    a session that ended without completing it expires too."""
    first = hs.task()
    hs.mint(first)
    hs.broker.sessions.end(hs.session)
    reaper = hs.broker.reaper
    assert reaper is not None
    report = reaper.run_once(orphan_scan=False)
    assert report.tasks_expired == 1 and report.revoked == 1
    assert hs.get_task(first).state is TaskState.EXPIRED
    assert hs.fake.objects == {}


def test_an_active_task_past_its_end_expires(hs: Harness) -> None:
    """The credential's TTL passed: the task becomes ``expired``; its credential is revoked (or
    marked expired) and a ``broker.task.expire`` event is written."""
    task = hs.task()
    issued = hs.mint(task)
    hs.clock.advance(issued.minted.expires_at - hs.clock() + 1)
    reaper = hs.broker.reaper
    assert reaper is not None
    reaper.run_once(orphan_scan=False)
    assert hs.get_task(task).state is TaskState.EXPIRED
    assert hs.cred(issued.credential.id).state in (CredentialState.REVOKED, CredentialState.EXPIRED)
    assert hs.events("broker.task.expire")


def test_orphans_are_found_by_metadata_and_revoked(hs: Harness) -> None:
    """Backend objects that carry this cluster's metadata but no live record are revoked (and the
    revocation is audited); live ones and other clusters' are left alone."""
    live = hs.mint(hs.task())
    stray = MintRequest(
        task_id="tsk_gone",
        credential_id="crd_no_record",
        scope="vault-kv-read",
        issuer="x",
        subject="y",
        ttl=600,
        spec=None,
        cluster="lifecycle",
    )
    hs.fake.mint(stray)
    foreign = hs.fake.mint(
        MintRequest("tsk_f", "crd_foreign", "s", "i", "u", 600, None, cluster="other-cluster")
    )
    reaper = hs.broker.reaper
    assert reaper is not None
    report = reaper.run_once(orphan_scan=True)
    assert report.orphans_found == 1 and report.orphans_revoked == 1
    left = {o.credential_id for o in hs.fake.objects.values()}
    assert left == {live.credential.id, "crd_foreign"}
    assert foreign.handle in hs.fake.objects
    revoked = hs.events("broker.credential.revoke", "crd_no_record")
    assert revoked and revoked[0]["attributes"]["broker.revoke.reason"] == "orphan: no live record"


def test_an_admin_kill_revokes_and_names_the_admin(hs: Harness) -> None:
    """Admin kill: the task becomes ``revoked`` and its credential is revoked, with the admin as
    the actor of the audit events."""
    task = hs.task()
    hs.mint(task)
    actor = hs.session.principal  # any principal: the route is what checks the admin role
    killed, creds = hs.broker.revoker.kill_task(actor, task.id, reason="incident 42")
    assert killed.state is TaskState.REVOKED
    assert [c.state for c in creds] == [CredentialState.REVOKED]
    assert hs.fake.objects == {}
    events = hs.events("broker.credential.revoke", creds[0].id)
    assert events[0]["actor_subject"] == actor.subject
    assert "incident 42" in events[0]["attributes"]["broker.revoke.reason"]


@pytest.mark.postgres
def test_replicas_share_reaper_work_without_a_leader(
    make_settings: Any, issuer: TestIssuer, pg_url: str
) -> None:
    """Two replicas on one PostgreSQL claim due work with SKIP LOCKED: a row locked by one is
    skipped by the other, and running both reapers at once revokes each credential once."""
    harnesses = [next(harness_for(make_settings, issuer, pg_url)) for _ in range(2)]
    a, b = harnesses
    b.fake = a.fake  # one backend, two replicas
    b.broker.backends["vault"] = a.fake  # type: ignore[index]
    creds = []
    for _ in range(6):  # (at most five open tasks per scope: complete each as it goes)
        task = a.task()
        creds.append(a.mint(task).credential)
        a.fake.fail_revoke = 1
        a.broker.tasks.complete(a.session, task.id)
    assert all(a.cred(c.id).state is CredentialState.REVOKE_PENDING for c in creds)
    a.clock.advance(3)
    b.clock.advance(3)
    # A row lock held by one replica hides that row from the other's claim.
    db_b: Database = b.broker.db
    with a.broker.db.engine.connect() as held, held.begin():
        held.execute(
            repo.t.credentials.select()
            .where(repo.t.credentials.c.id == creds[0].id)
            .with_for_update()
        )
        with db_b.write() as conn:
            claimed = repo.claim_credentials(
                conn, now=b.clock(), stale_before=0, lease=60, limit=100, skip_locked=True
            )
        assert creds[0].id not in {c.id for c in claimed}
        assert len(claimed) == len(creds) - 1
    # Both reapers at once: every credential revoked exactly once.
    a.clock.advance(61)
    b.clock.advance(61)
    a.fake.calls.clear()
    threads = [
        threading.Thread(target=x.broker.reaper.run_once, kwargs={"orphan_scan": False})  # type: ignore[union-attr]
        for x in (a, b)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert a.fake.calls.count("revoke") == len(creds)
    assert all(a.cred(c.id).state is CredentialState.REVOKED for c in creds)
    for x in harnesses:
        x.broker.stop()
