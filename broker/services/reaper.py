"""The reaper: background repair that needs no leader.

Each pass, on every replica:

1. keeps backend logins alive (Vault token renewal or a fresh login);
2. expires tasks: pending requests and unused approvals past their time (``TaskService``), active
   tasks past their end, and open tasks of ended or expired sessions; their credentials are
   revoked;
3. claims due credential work (``SKIP LOCKED`` on PostgreSQL, so replicas split it) and acts:
   ``revoke_pending`` credentials are retried with exponential backoff, stale ``minting`` intents
   (a broker that died between the backend call and the record, or a lost answer) are repaired by
   revoking whatever they made, and ``active`` credentials of ended tasks are revoked;
4. marks credentials the backend has expired by itself as ``expired``;
5. every ``reaper_orphan_interval`` seconds (claimed by one replica), and on a process's first
   pass, scans backends for objects that carry this cluster's metadata but no live record
   (orphans) and revokes them;
6. re-writes AWS kill-switch policies that differ from the store (lost concurrent updates).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.backends.base import Backend, Inventory, Maintained, RevokeRef
from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.domain.records import Credential, Task
from broker.domain.task import CredentialState, TaskState
from broker.errors import BrokerError
from broker.services.common import Clock, record
from broker.services.kill_switch import KillSwitches
from broker.services.revocation import DATABASE_KINDS, EXPIRY_SKEW, Revoker
from broker.services.tasks import end_task
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)

#: A claimed credential is hidden from other replicas this long (the work takes far less).
CLAIM_LEASE = 60.0
ORPHAN_JOB = "orphan_scan"
KILL_SWITCH_JOB = "kill_switch_reconcile"


@dataclass
class PassReport:
    """What one pass did (numbers only; for operators and tests)."""

    started_at: float = 0.0
    finished_at: float = 0.0
    tasks_expired: int = 0
    revoked: int = 0
    revoke_failed: int = 0
    repaired: int = 0
    lapsed: int = 0
    orphan_scan: bool = False
    orphans_found: int = 0
    orphans_revoked: int = 0
    kill_switches_fixed: int = 0
    errors: list[str] = field(default_factory=list)


class Reaper:
    """Runs passes in a background thread (``start``/``stop``) or on demand (``run_once``)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        backends: Mapping[str, Backend],
        revoker: Revoker,
        kill_switches: KillSwitches,
        clock: Clock,
        *,
        expire_tasks: Callable[[], int] | None = None,
        owner: str | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.backends = backends
        self.revoker = revoker
        self.kill_switches = kill_switches
        self.clock = clock
        self.expire_tasks = expire_tasks
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.passes = 0
        self.last: PassReport | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- running ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="broker-reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("reaper pass failed")
            self._stop.wait(self.settings.reaper_interval)

    def status(self) -> dict[str, Any]:
        """For operators: passes so far, the last pass's report, credentials per state."""
        with self.db.read() as conn:
            states = repo.count_credentials_by_state(conn)
            unconfirmed = repo.count_unconfirmed_revocations(conn)
            orphan_job = repo.reaper_job(conn, ORPHAN_JOB)
        return {
            "owner": self.owner,
            "running": self._thread is not None,
            "passes": self.passes,
            "last_pass": asdict(self.last) if self.last else None,
            "credentials": states,
            "revoke_pending": states.get(CredentialState.REVOKE_PENDING.value, 0),
            "revoke_unconfirmed": unconfirmed,
            "orphan_scan": orphan_job,
        }

    def run_once(self, *, orphan_scan: bool | None = None) -> PassReport:
        """One full pass. ``orphan_scan``: force (True) or skip (False) the scan; by default it
        runs on the first pass and then when this replica claims the periodic job."""
        with self._lock:
            report = PassReport(started_at=self.clock())
            steps: list[tuple[str, Callable[[PassReport], None]]] = [
                ("maintain", self._maintain),
                ("expire", self._expire),
                ("credentials", self._credentials),
                ("lapsed", self._lapsed),
                ("orphans", lambda r: self._orphans(r, orphan_scan)),
                ("kill_switches", self._kill_switches),
            ]
            for name, step in steps:
                try:
                    step(report)
                except BrokerError as exc:
                    report.errors.append(f"{name}: {exc.code}")
                    log.warning("reaper step %s: %s", name, exc.code)
                except Exception as exc:
                    report.errors.append(f"{name}: {type(exc).__name__}")
                    log.exception("reaper step %s failed", name)
            report.finished_at = self.clock()
            self.passes += 1
            self.last = report
            return report

    # --- steps ------------------------------------------------------------------------------

    def _maintain(self, report: PassReport) -> None:
        for backend in self.backends.values():
            if isinstance(backend, Maintained):
                try:
                    backend.maintain()
                except BrokerError as exc:
                    report.errors.append(f"maintain {backend.name}: {exc.code}")

    def _expire(self, report: PassReport) -> None:
        if self.expire_tasks is not None:
            report.tasks_expired += self.expire_tasks()
        now = self.clock()
        skip_locked = not self.db.is_sqlite
        ended: list[Task] = []
        with self.db.write() as conn:
            due = repo.active_tasks_past_end(
                conn, now, self.settings.reaper_batch, skip_locked=skip_locked
            )
            for task in due:
                ended.append(
                    end_task(
                        conn,
                        task,
                        TaskState.EXPIRED,
                        now,
                        reason="the task's credential expired",
                        rule="credential_ttl",
                        event=EventName.TASK_EXPIRE,
                    )
                )
        with self.db.write() as conn:
            orphaned = repo.tasks_of_ended_sessions(
                conn, now, self.settings.reaper_batch, skip_locked=skip_locked
            )
            for task in orphaned:
                ended.append(
                    end_task(
                        conn,
                        task,
                        TaskState.EXPIRED,
                        now,
                        reason="the task's session ended",
                        rule="session_end",
                        event=EventName.TASK_EXPIRE,
                    )
                )
        report.tasks_expired += len(ended)
        for task in ended:
            for cred in self.revoker.revoke_task(task, reason=f"task expired ({task.reason})"):
                self._count(report, cred)

    def _count(self, report: PassReport, cred: Credential) -> None:
        if cred.state is CredentialState.REVOKED:
            report.revoked += 1
        elif cred.state is CredentialState.REVOKE_PENDING:
            report.revoke_failed += 1

    def _credentials(self, report: PassReport) -> None:
        now = self.clock()
        with self.db.write() as conn:
            claimed = repo.claim_credentials(
                conn,
                now=now,
                stale_before=now - self.settings.reaper_mint_grace,
                lease=CLAIM_LEASE,
                limit=self.settings.reaper_batch,
                skip_locked=not self.db.is_sqlite,
            )
            tasks = {c.task_id: repo.get_task(conn, c.task_id) for c in claimed}
        for cred in claimed:
            task = tasks.get(cred.task_id)
            if cred.state is CredentialState.MINTING:
                result = self.revoker.repair(cred)
                if result.state is CredentialState.REVOKED:
                    report.repaired += 1
                else:
                    report.revoke_failed += 1
                continue
            reason = (
                "retry"
                if cred.state is CredentialState.REVOKE_PENDING
                else f"task {task.state.value if task else 'gone'}"
            )
            self._count(report, self.revoker.revoke(task, cred, reason=reason))

    def _lapsed(self, report: PassReport) -> None:
        now = self.clock()
        with self.db.write() as conn:
            lapsed = repo.expire_lapsed_credentials(
                conn,
                now - EXPIRY_SKEW,
                self.settings.reaper_batch,
                skip_locked=not self.db.is_sqlite,
            )
            for cred in lapsed:
                task = repo.get_task(conn, cred.task_id)
                record(
                    conn,
                    AuditEvent(
                        name=EventName.CREDENTIAL_EXPIRE,
                        outcome=Outcome.SUCCESS,
                        time=now,
                        trace_id=task.trace_id if task else new_trace_id(),
                        parent_span_id=task.span_id if task else None,
                        task_id=cred.task_id,
                        credential_id=cred.id,
                        attributes={
                            "broker.task.id": cred.task_id,
                            "broker.credential.id": cred.id,
                            "broker.backend": cred.backend,
                            "broker.credential.kind": cred.kind,
                            "broker.credential.expires_at": cred.expires_at,
                        },
                    ),
                )
        report.lapsed += len(lapsed)

    def _orphans(self, report: PassReport, force: bool | None) -> None:
        if force is False:
            return
        now = self.clock()
        with self.db.write() as conn:
            # Claiming also records the run, so other replicas wait their turn.
            claimed = repo.claim_job(
                conn, ORPHAN_JOB, now, self.settings.reaper_orphan_interval, self.owner
            )
        if not (claimed or force or self.passes == 0):
            return
        report.orphan_scan = True
        for backend in self.backends.values():
            if isinstance(backend, Inventory):
                self._scan(backend, report)

    def _scan(self, backend: Backend, report: PassReport) -> None:
        assert isinstance(backend, Inventory)
        listed_at = self.clock()
        objects = list(backend.inventory(self.settings.cluster_name))
        if not objects:
            return
        now = self.clock()
        with self.db.read() as conn:
            records = repo.credentials_by_ids(conn, sorted({o.credential_id for o in objects}))
        stale_before = now - self.settings.reaper_mint_grace
        for obj in objects:
            rec = records.get(obj.credential_id)
            if rec is not None and (
                rec.state is CredentialState.ACTIVE
                or (rec.state is CredentialState.MINTING and rec.created_at > stale_before)
                or _revoked_since(rec, listed_at)
            ):
                continue  # live, a mint still under way, or revoked while the listing ran
            report.orphans_found += 1
            error: BrokerError | None = None
            try:
                backend.revoke(
                    RevokeRef(
                        credential_id=obj.credential_id,
                        task_id=obj.task_id or "",
                        kind=obj.kind,
                        handle=obj.handle,
                    )
                )
                report.orphans_revoked += 1
            except BrokerError as exc:
                error = exc
                report.errors.append(f"orphan {obj.credential_id}: {exc.code}")
            self._record_orphan(
                backend, obj.credential_id, obj.task_id, obj.handle, obj.role, rec, error, listed_at
            )

    def _record_orphan(
        self,
        backend: Backend,
        credential_id: str,
        task_id: str | None,
        handle: str,
        role: str,
        rec: Credential | None,
        error: BrokerError | None,
        listed_at: float,
    ) -> None:
        now = self.clock()
        with self.db.write() as conn:
            current = repo.get_credential(conn, credential_id, for_update=True)
            if error is None and current is not None and _revoked_since(current, listed_at):
                # Another replica's scan (or a revocation) took it back while this scan ran,
                # and recorded that: one event per revocation, however many replicas scan.
                return
            task = repo.get_task(conn, task_id) if task_id else None
            if (
                error is None
                and rec is not None
                and rec.state
                in (
                    CredentialState.MINTING,
                    CredentialState.FAILED,
                    CredentialState.REVOKE_PENDING,
                    # The record says it is over, yet the backend still had it: now it is.
                    CredentialState.EXPIRED,
                    CredentialState.REVOKED,
                )
            ):
                values: dict[str, Any] = {
                    "state": CredentialState.REVOKED,
                    "revoked_at": now,
                    "next_attempt_at": None,
                    "last_error": None,
                }
                if rec.kind in DATABASE_KINDS:
                    # Revoking a lease's owner token only starts the lease's revocation (Vault
                    # finishes it in the background): the revoker confirms it is gone first.
                    values = {
                        "state": CredentialState.REVOKE_PENDING,
                        "next_attempt_at": now,
                        "last_error": "revocation_unconfirmed: the orphan lease owner was "
                        "revoked; the lease is confirmed gone by the next attempt",
                    }
                if rec.handle is None and role == "credential":
                    values["handle"] = handle
                repo.update_credential(conn, rec.id, **values)
            record(
                conn,
                AuditEvent(
                    name=EventName.CREDENTIAL_REVOKE,
                    outcome=Outcome.SUCCESS if error is None else Outcome.FAILURE,
                    time=now,
                    trace_id=task.trace_id if task else new_trace_id(),
                    parent_span_id=task.span_id if task else None,
                    task_id=task.id if task else None,
                    credential_id=credential_id,
                    attributes={
                        "broker.credential.id": credential_id,
                        "broker.backend": backend.name,
                        "broker.revoke.reason": "orphan: no live record",
                        "broker.orphan.record_state": rec.state.value if rec else "none",
                        "broker.orphan.object": role,
                        **({"broker.revoke.error": error.code} if error else {}),
                    },
                ),
            )

    def _kill_switches(self, report: PassReport) -> None:
        if self.kill_switches.backend is None:
            return
        now = self.clock()
        interval = max(30.0, self.settings.reaper_interval * 6)
        with self.db.write() as conn:
            if not repo.claim_job(conn, KILL_SWITCH_JOB, now, interval, self.owner):
                return
        report.kill_switches_fixed += self.kill_switches.reconcile()


def _revoked_since(cred: Credential, since: float) -> bool:
    return (
        cred.state is CredentialState.REVOKED
        and cred.revoked_at is not None
        and cred.revoked_at >= since
    )


def wait_for_pass(reaper: Reaper, after: int, timeout: float = 30.0) -> PassReport:
    """Block until ``reaper`` has finished more than ``after`` passes (tests and tools)."""
    deadline = time.monotonic() + timeout
    while reaper.passes <= after:
        if time.monotonic() > deadline:
            raise TimeoutError("the reaper did not finish a pass in time")
        time.sleep(0.02)
    assert reaper.last is not None
    return reaper.last
