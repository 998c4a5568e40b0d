"""The crash test: a real broker process is SIGKILLed between the backend calls and their records;
after a restart and one reaper pass, nothing it minted is alive.

The broker runs as ``python -m broker serve`` with ``BROKER_DEV_FAULT=pause_after_mint`` (a hook
refused outside dev mode): each mint stops right after the backend answered and writes a marker
file. The test waits for the markers of a Vault token, a database login and an STS session, then
kills the process group with SIGKILL.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from broker.devstack.processes import ManagedProcess, free_port, wait_http
from tests.support.iam_policy import always_denied
from tests.support.issuer import TestIssuer
from tests.support.services import Moto, OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

REPO = Path(__file__).resolve().parents[2]
GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
KILL_POLICY = "broker-kill-crash-test"
ROLE_NAME = "broker-s3-read"
SCOPES = {
    "vault-kv-read": {},
    "postgres-readonly": {},
    "aws-s3-read": {"bucket": "example-data-logs", "prefix": "2024/05"},
}


def broker_env(
    data_dir: Path,
    port: int,
    db_url: str,
    bao: OpenBao,
    moto: Moto,
    issuer: TestIssuer,
    cluster: str,
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env.update(
        {
            "BROKER_DEV_MODE": "true",
            "BROKER_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "BROKER_DATA_DIR": str(data_dir),
            "BROKER_DATABASE_URL": db_url,
            "BROKER_SCOPES_DIR": str(REPO / "scopes"),
            "BROKER_CLUSTER_NAME": cluster,
            "BROKER_SESSION_MAX_TTL": "7200",
            "BROKER_REAPER_INTERVAL": "3600",  # one pass at start, then none during the test
            "BROKER_REAPER_MINT_GRACE": "0.5",
            "BROKER_ISSUERS": json.dumps([issuer.issuer_config(claims={"roles": "broker_roles"})]),
            "BROKER_VAULT__ADDR": bao.addr,
            "BROKER_VAULT__TOKEN": bao.broker_token,
            "BROKER_VAULT__TOKEN_ROLE": "broker-child",
            "BROKER_VAULT__LEASE_TOKEN_ROLE": "broker-lease",
            "BROKER_AWS__ENDPOINT_URL": moto.endpoint,
            "BROKER_AWS__KILL_SWITCH_POLICY": KILL_POLICY,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def start(name: str, env: dict[str, str], port: int, log: Path) -> ManagedProcess:
    proc = ManagedProcess(
        name,
        [sys.executable, "-m", "broker", "serve", "--port", str(port), "--migrate"],
        log,
        env=env,
    ).start()
    wait_http(f"http://127.0.0.1:{port}/healthz", process=proc, timeout=60)
    return proc


def cluster_tokens(bao: OpenBao, cluster: str) -> list[dict[str, Any]]:
    """Every live token carrying the cluster's metadata, as OpenBao's root sees them."""
    found = []
    with bao.client() as root:
        keys = root.request("LIST", "/v1/auth/token/accessors").json()["data"]["keys"]
        for accessor in keys:
            resp = root.post("/v1/auth/token/lookup-accessor", json={"accessor": accessor})
            if resp.status_code == 200:
                data = resp.json()["data"]
                if (data.get("meta") or {}).get("broker_cluster") == cluster:
                    found.append(data)
    return found


def db_logins(bao: OpenBao) -> set[str]:
    assert bao.database is not None
    with psycopg.connect(bao.database.admin_url) as conn:
        rows = conn.execute("SELECT rolname FROM pg_roles WHERE rolname LIKE 'v-%'").fetchall()
    return {r[0] for r in rows}


def test_sigkill_between_mint_and_record_leaves_nothing_alive(
    tmp_path: Path,
    openbao_db: OpenBao,
    moto_server: Moto,
    issuer: TestIssuer,
    pg_url: str,
) -> None:
    """Three mints (Vault token, database login, STS session) reach their backends and the broker
    dies by SIGKILL before recording them; restarted without the hook, its first reaper pass
    revokes the token and the database login (found by their metadata) and denies the STS
    session by its SourceIdentity; every intent ends ``revoked``."""
    cluster = "crash-" + secrets.token_hex(3)
    port = free_port()
    data_dir = tmp_path / "data"
    env = broker_env(data_dir, port, pg_url, openbao_db, moto_server, issuer, cluster)
    logins_before = db_logins(openbao_db)
    first = start(
        "broker-1", {**env, "BROKER_DEV_FAULT": "pause_after_mint"}, port, tmp_path / "b1.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.post(
                "/oauth2/token",
                data={
                    "grant_type": GRANT,
                    "subject_token_type": ID_TOKEN,
                    "subject_token": issuer.token(
                        "crash-agent",
                        ttl=7200,  # STS issues 900 s at least: the session must outlive that
                        groups=["developers"],
                        broker_roles=["agent", "admin"],
                    ),
                },
            )
            assert resp.status_code == 200, resp.text
            auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
            tasks = {}
            for scope, params in SCOPES.items():
                made = client.post(
                    "/v1/tasks",
                    headers=auth,
                    json={"scope": scope, "params": params, "purpose": "crash test"},
                )
                assert made.status_code == 201, made.text
                tasks[scope] = made.json()["id"]

        def mint(task_id: str) -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as c:
                    c.post(f"/v1/tasks/{task_id}/credentials", headers=auth)
            except httpx.HTTPError:
                pass  # the broker dies under this request

        threads = [threading.Thread(target=mint, args=(t,)) for t in tasks.values()]
        for thread in threads:
            thread.start()
        faults = data_dir / "faults"
        deadline = time.monotonic() + 60
        while len(list(faults.glob("*.paused"))) < len(tasks):
            assert time.monotonic() < deadline, first.tail()
            assert first.alive(), first.tail()
            time.sleep(0.05)
        # Every mint reached its backend: the token and the lease owner exist, and so does a login.
        assert len(cluster_tokens(openbao_db, cluster)) == 2
        new_logins = db_logins(openbao_db) - logins_before
        assert len(new_logins) == 1
        first.signal(signal.SIGKILL)
        assert first.proc is not None
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    for thread in threads:
        thread.join(timeout=30)
    paused = {p.stem for p in (data_dir / "faults").glob("*.paused")}
    time.sleep(0.6)  # the intents are now older than the grace

    second = start("broker-2", env, port, tmp_path / "b2.log")
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 60
            while True:
                status = client.get("/v1/admin/reaper", headers=auth)
                assert status.status_code == 200, status.text
                if status.json()["passes"] >= 1:
                    break
                assert time.monotonic() < deadline, second.tail()
                time.sleep(0.1)
            last = status.json()["last_pass"]
            assert last["repaired"] + last["orphans_revoked"] >= 2, last
            creds = client.get("/v1/admin/credentials", headers=auth, params={"limit": 1000}).json()
    finally:
        second.stop()

    ours = {c["credential_id"]: c for c in creds if c["task_id"] in set(tasks.values())}
    assert set(ours) == paused
    assert {c["state"] for c in ours.values()} == {"revoked"}
    assert cluster_tokens(openbao_db, cluster) == []
    assert not (new_logins & db_logins(openbao_db))
    [sts] = [c for c in ours.values() if c["backend"] == "aws_sts"]
    import boto3

    iam = boto3.client("iam", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    document = iam.get_role_policy(RoleName=ROLE_NAME, PolicyName=KILL_POLICY)["PolicyDocument"]
    # Nothing bounds when the lost session was issued: it is denied whenever it was.
    assert always_denied(document, sts["details"]["source_identity"], cluster)


def test_a_lost_database_login_that_cannot_be_dropped_stays_revoke_pending_and_alerts(
    tmp_path: Path,
    openbao_db: OpenBao,
    moto_server: Moto,
    issuer: TestIssuer,
    pg_url: str,
) -> None:
    """A real ``broker serve`` dies (SIGKILL) after OpenBao issued a database login it never
    recorded, and the login owns a table, so OpenBao cannot drop it. Restarted, the broker's
    reaper revokes the lease's owner token but does not record the credential revoked while
    the lease lives: it stays ``revoke_pending`` (``revocation_unconfirmed``), is logged at
    error level, audited as a failed revocation and counted in ``/readyz``. After an operator
    removed the table and revoked the lease, the next pass records it revoked."""
    from broker.store import Database, repo

    cluster = "lost-db-" + secrets.token_hex(3)
    port = free_port()
    data_dir = tmp_path / "data"
    env = broker_env(data_dir, port, pg_url, openbao_db, moto_server, issuer, cluster)
    logins_before = db_logins(openbao_db)
    url = f"http://127.0.0.1:{port}"
    assert openbao_db.database is not None
    table = "blocker_" + secrets.token_hex(4)
    first = start(
        "broker-1", {**env, "BROKER_DEV_FAULT": "pause_after_mint"}, port, tmp_path / "b1.log"
    )
    token = issuer.token(
        "lost-db-agent", ttl=7200, groups=["developers"], broker_roles=["agent", "admin"]
    )
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.post(
                "/oauth2/token",
                data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
            )
            assert resp.status_code == 200, resp.text
            auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
            made = client.post(
                "/v1/tasks",
                headers=auth,
                json={"scope": "postgres-readonly", "params": {}, "purpose": "a lost login"},
            )
            assert made.status_code == 201, made.text
            task_id = made.json()["id"]

        def mint() -> None:
            try:
                with httpx.Client(base_url=url, timeout=60) as c:
                    c.post(f"/v1/tasks/{task_id}/credentials", headers=auth)
            except httpx.HTTPError:
                pass  # the broker dies under this request

        thread = threading.Thread(target=mint)
        thread.start()
        faults = data_dir / "faults"
        deadline = time.monotonic() + 60
        while not list(faults.glob("*.paused")):
            assert time.monotonic() < deadline, first.tail()
            assert first.alive(), first.tail()
            time.sleep(0.05)
        [login] = db_logins(openbao_db) - logins_before
        with psycopg.connect(openbao_db.database.url, autocommit=True) as conn:
            conn.execute(f"CREATE TABLE public.{table} (x int)")
            conn.execute(f'ALTER TABLE public.{table} OWNER TO "{login}"')
        first.signal(signal.SIGKILL)
        assert first.proc is not None
        first.proc.wait(timeout=10)
    finally:
        first.stop()
    thread.join(timeout=30)
    [credential_id] = [p.stem for p in faults.glob("*.paused")]
    time.sleep(0.6)  # the intent is now older than the grace

    log_file = tmp_path / "b2.log"
    second = start("broker-2", env, port, log_file)
    store = Database(pg_url, pool_size=1)
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.post(
                "/oauth2/token",
                data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": token},
            )
            auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}

            def cred() -> dict[str, Any]:
                listed = client.get(
                    "/v1/admin/credentials", headers=auth, params={"limit": 1000}
                ).json()
                [found] = [c for c in listed if c["credential_id"] == credential_id]
                return dict(found)

            deadline = time.monotonic() + 60
            while client.get("/v1/admin/reaper", headers=auth).json()["passes"] < 1:
                assert time.monotonic() < deadline, second.tail()
                time.sleep(0.1)
            pending = cred()
            assert pending["state"] == "revoke_pending", pending
            assert pending["last_error"].startswith("revocation_unconfirmed:"), pending
            assert login in db_logins(openbao_db)
            ready = client.get("/readyz").json()
            assert ready["revocations"] == {"pending": 1, "unconfirmed": 1}, ready
            assert "ERROR" in log_file.read_text() and credential_id in log_file.read_text()
            with store.read() as conn:
                events = repo.audit_events(
                    conn, credential_id=credential_id, name="broker.credential.revoke"
                )
            assert [e["attributes"].get("broker.revoke.error") for e in events] == [
                "revocation_unconfirmed"
            ]
            assert events[0]["outcome"] == "failure"

            # The operator removes what blocked the drop and revokes the lease by its id (the
            # broker names it in last_error).
            lease_id = pending["last_error"].rsplit(": ", 1)[1].split(",")[0].strip()
            with psycopg.connect(openbao_db.database.url, autocommit=True) as conn:
                conn.execute(f"DROP TABLE public.{table}")
            with openbao_db.client() as root:
                resp = root.put("/v1/sys/leases/revoke", json={"lease_id": lease_id})
                assert resp.status_code == 204, resp.text

            def revoked() -> bool:
                client.post("/v1/admin/reaper/run", headers=auth)
                return bool(cred()["state"] == "revoked")

            deadline = time.monotonic() + 60
            while not revoked():
                assert time.monotonic() < deadline, second.tail()
                time.sleep(0.5)
            assert login not in db_logins(openbao_db)
            assert client.get("/readyz").json()["revocations"] == {"pending": 0, "unconfirmed": 0}
    finally:
        store.dispose()
        second.stop()
