"""A database login whose mint answer was lost is recorded as revoked only once it is known to
be gone, against the real OpenBao and PostgreSQL (the ``openbao_db`` fixture).

The broker never saw the lease id. The reaper revokes the lease's owner token (found by its
metadata); OpenBao then revokes the lease in the background, which can fail (here: the login
owns a table, so ``DROP ROLE`` fails, as when an agent created an object). Until the role's
lease listing shows no lease that no record accounts for, the credential stays
``revoke_pending`` and is alerted."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest

from broker.backends.base import Minted, MintOutcomeUnknown, MintRequest
from broker.backends.vault import VaultBackend
from broker.domain.records import Credential, Session
from broker.domain.task import CredentialState
from broker.services.tasks import TaskRequest
from broker.store import repo
from broker.wiring import Broker, build_broker
from tests.api.flows import Clock
from tests.support.issuer import TestIssuer
from tests.support.services import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]


@dataclass
class Lost:
    """A mint whose answer the broker lost, and what OpenBao really made."""

    broker: Broker
    clock: Clock
    session: Session
    bao: OpenBao
    credential_id: str
    made: Minted

    @property
    def login(self) -> str:
        return self.made.secret["username"]

    def cred(self) -> Credential:
        with self.broker.db.read() as conn:
            found = repo.get_credential(conn, self.credential_id)
        assert found is not None
        return found

    def login_exists(self) -> bool:
        assert self.bao.database is not None
        with psycopg.connect(self.bao.database.admin_url) as conn:
            row = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.login,))
            return row.fetchone() is not None

    def lease_exists(self) -> bool:
        with self.bao.client() as root:
            resp = root.put("/v1/sys/leases/lookup", json={"lease_id": self.made.handle})
        return resp.status_code == 200

    def reaper_pass(self) -> Credential:
        """One reaper pass once the credential's retry is due."""
        self.clock.advance(301)
        self.broker.reaper.run_once(orphan_scan=False)  # type: ignore[union-attr]
        return self.cred()


@pytest.fixture
def lost(make_settings: Any, issuer: TestIssuer, openbao_db: OpenBao) -> Iterator[Lost]:
    clock = Clock()
    settings = make_settings(
        vault=openbao_db.vault_settings(),
        cluster_name="lost-" + secrets.token_hex(3),
        session_max_ttl=86_400,
    )
    broker = build_broker(settings, clock=clock)
    session = broker.sessions.exchange(
        issuer.token("db-agent", ttl=20_000, groups=["developers"])
    ).session
    vault = broker.backends["vault"]
    assert isinstance(vault, VaultBackend)
    real_mint = vault.mint
    made: list[Minted] = []

    def lost_answer(request: MintRequest) -> Minted:
        made.append(real_mint(request))
        raise MintOutcomeUnknown("the answer was lost")

    vault.mint = lost_answer  # type: ignore[method-assign]
    task = broker.tasks.request(
        session, TaskRequest(scope="postgres-readonly", params={}, purpose="a lost login")
    )
    with pytest.raises(MintOutcomeUnknown):
        broker.credentials.mint(session, task.id)
    vault.mint = real_mint  # type: ignore[method-assign]
    with broker.db.read() as conn:
        [cred] = repo.credentials_for(conn, task.id)
    assert cred.state is CredentialState.REVOKE_PENDING and cred.handle is None
    try:
        yield Lost(broker, clock, session, openbao_db, cred.id, made[0])
    finally:
        with openbao_db.client() as root:  # leave nothing behind, whatever the test did
            root.put("/v1/sys/leases/revoke-force/database/creds/readonly")
        broker.stop()


def test_a_lost_login_is_revoked_only_once_it_is_gone(lost: Lost) -> None:
    """The reaper revokes the owner token; OpenBao drops the login in the background. Each pass
    either leaves the credential ``revoke_pending`` or marks it revoked, and whenever it says
    revoked the login and its lease no longer exist."""
    assert lost.login_exists() and lost.lease_exists()
    for _ in range(20):
        cred = lost.reaper_pass()
        if cred.state is CredentialState.REVOKED:
            break
        assert cred.state is CredentialState.REVOKE_PENDING
    assert cred.state is CredentialState.REVOKED, cred.last_error
    assert not lost.lease_exists()
    assert not lost.login_exists()


def test_a_lost_login_that_cannot_be_dropped_stays_pending_and_is_alerted(
    lost: Lost, caplog: pytest.LogCaptureFixture
) -> None:
    """The login owns a table, so OpenBao cannot drop it: while its lease exists the credential
    stays ``revoke_pending`` with ``revocation_unconfirmed``, logged at error level, audited as
    a failed revocation and counted for ``/readyz``. Once an operator has removed what blocked
    it and revoked the lease, the next pass records it revoked."""
    assert lost.bao.database is not None
    table = "blocker_" + secrets.token_hex(4)
    with psycopg.connect(lost.bao.database.url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE public.{table} (x int)")
        conn.execute(f'ALTER TABLE public.{table} OWNER TO "{lost.login}"')
    try:
        with caplog.at_level(logging.ERROR, logger="broker.services.revocation"):
            for _ in range(3):
                cred = lost.reaper_pass()
                assert lost.lease_exists() and lost.login_exists()
                assert cred.state is CredentialState.REVOKE_PENDING
                assert (cred.last_error or "").startswith("revocation_unconfirmed:")
                assert lost.made.handle in (cred.last_error or "")
        assert any(
            r.levelno == logging.ERROR and lost.credential_id in r.getMessage()
            for r in caplog.records
        )
        assert lost.broker.revocations() == {"pending": 1, "unconfirmed": 1}
        status = lost.broker.reaper.status()  # type: ignore[union-attr]
        assert status["revoke_unconfirmed"] == 1
        with lost.broker.db.read() as conn:
            events = repo.audit_events(
                conn, credential_id=lost.credential_id, name="broker.credential.revoke"
            )
        failures = [e for e in events if e["outcome"] == "failure"]
        assert len(failures) >= 3
        assert {e["attributes"]["broker.revoke.error"] for e in failures} == {
            "revocation_unconfirmed"
        }
    finally:
        with psycopg.connect(lost.bao.database.url, autocommit=True) as conn:
            conn.execute(f"DROP TABLE public.{table}")
    with lost.bao.client() as root:
        resp = root.put("/v1/sys/leases/revoke", json={"lease_id": lost.made.handle})
        assert resp.status_code == 204, resp.text
    cred = lost.reaper_pass()
    assert cred.state is CredentialState.REVOKED
    assert not lost.login_exists()
    assert lost.broker.revocations() == {"pending": 0, "unconfirmed": 0}
