"""Fixtures for the audit tests: a store with a chain, an auditors' issuer, API helpers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.audit.checkpoints import FileKeySigner
from broker.domain.audit import AuditEvent, EventName, Outcome, new_trace_id
from broker.settings import Settings
from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.support.issuer import TestIssuer

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def exchange(client: httpx.Client, id_token: str, **headers: str) -> str:
    """Trade an ID token for a session token over the real API."""
    resp = client.post(
        "/oauth2/token",
        data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
        headers=headers,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


def wait_for(check: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Poll ``check`` until it holds (no fixed sleeps, no timed assertions)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="session")
def auditors() -> Iterator[TestIssuer]:
    """A second identity provider whose principals are auditors (as a human IdP would be)."""
    iss = TestIssuer(audience="broker").start()
    yield iss
    iss.stop()


@pytest.fixture
def audit_settings(make_settings: Any, issuer: TestIssuer, auditors: TestIssuer) -> Any:
    """Settings trusting the agents' issuer and the auditors' issuer (role ``auditor``)."""

    def build(**overrides: Any) -> Settings:
        issuers = [
            issuer.issuer_config(),
            auditors.issuer_config(name="auditors", roles=["auditor"]),
        ]
        return make_settings(issuers=issuers, **overrides)  # type: ignore[no-any-return]

    return build


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Database]:
    """A migrated SQLite store."""
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    upgrade(url)
    db = Database(url)
    yield db
    db.dispose()


@pytest.fixture
def signer() -> FileKeySigner:
    from cryptography.hazmat.primitives.asymmetric import ec

    return FileKeySigner(ec.generate_private_key(ec.SECP256R1()))


def append_events(db: Database, n: int, *, start: float = 1_700_000_000.0) -> list[str]:
    """Append ``n`` plausible events (task requests and decisions); returns their ids."""
    ids = []
    trace = new_trace_id()
    for i in range(n):
        event = AuditEvent(
            name=EventName.TASK_REQUEST if i % 2 == 0 else EventName.TASK_DECISION,
            outcome=Outcome.SUCCESS,
            time=start + i,
            trace_id=trace,
            task_id=f"tsk_{i // 2:016d}",
            actor_issuer="https://issuer.example",
            actor_subject=f"agent-{i % 3}",
            attributes={"broker.scope": "vault-kv-read", "broker.purpose": f"step {i}"},
        )
        with db.write() as conn:
            repo.append_audit(conn, event)
        ids.append(event.id)
    return ids
