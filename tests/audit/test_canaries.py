"""Canary secrets sent through every path (ID tokens, session tokens, minted Vault tokens and STS
keys, the collector's API key, the broker's own Vault token, secrets pasted into a request)
appear in no log line, no span on the wire, no store row and no error body."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import MetaData, select

from broker.logs import configure_logging
from broker.settings import (
    AuditSettings,
    AwsSettings,
    OpenBaoAuditSettings,
    OtlpSettings,
    VaultSettings,
)
from broker.store import Database
from tests.audit.conftest import GRANT, ID_TOKEN, wait_for
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import Moto, OpenBao, live_broker

pytestmark = pytest.mark.integration

COLLECTOR_KEY = "otlp-collector-key-CANARY-1b2c3d4e5f"
PASTED_PASSWORD = "CanaryPassw0rd-9f8e7d"
PASTED_VAULT_TOKEN = "s.CANARYpastedVaultToken0123456789"
PASTED_JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjYW5hcnktcGFzdGVkIn0.Q0FOQVJZLXNpZ25hdHVyZQ"
FORGED_SESSION = "brk_sess_CANARYforgedSessionToken0123456789abcdef"


class Everything(logging.Handler):
    """Keeps every formatted log line of the process, whatever the logger."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def dump_store(url: str) -> str:
    """Every row of every table, as text."""
    db = Database(url)
    meta = MetaData()
    meta.reflect(db.engine)
    out = []
    with db.read() as conn:
        for table in meta.sorted_tables:
            for row in conn.execute(select(table)):
                out.append(json.dumps([str(v) for v in row], default=str))
    db.dispose()
    return "\n".join(out)


@pytest.fixture
def all_logs() -> Any:
    configure_logging("debug")
    handler = Everything()
    root = logging.getLogger()
    root.addHandler(handler)
    old = root.level
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def test_canaries_appear_nowhere(
    openbao: OpenBao,
    moto_server: Moto,
    issuer: TestIssuer,
    otlp: OtlpReceiver,
    make_settings: Any,
    all_logs: Everything,
    tmp_path: Path,
) -> None:
    """Drive every path with real secrets and pasted canaries, then search logs, the OTLP wire
    (raw protobuf), every store row and every error body."""
    settings = make_settings(
        vault=VaultSettings(
            addr=openbao.addr, token=openbao.broker_token, token_role="broker-child"
        ),
        aws=AwsSettings(endpoint_url=moto_server.endpoint),
        otlp=OtlpSettings(
            endpoint=otlp.endpoint,
            interval=0.05,
            headers={"authorization": f"Bearer {COLLECTOR_KEY}"},
        ),
        audit=AuditSettings(
            openbao=OpenBaoAuditSettings(file=openbao.audit_log, poll_interval=0.05)
        ),
        log_level="debug",
    )
    secrets: list[str] = [
        COLLECTOR_KEY,
        PASTED_PASSWORD,
        PASTED_VAULT_TOKEN,
        PASTED_JWT,
        FORGED_SESSION,
        openbao.broker_token,
    ]
    errors: list[str] = []

    def note(resp: httpx.Response) -> httpx.Response:
        if resp.status_code >= 400:
            errors.append(resp.text + json.dumps(dict(resp.headers)))
        return resp

    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        # 1. Sessions: a real ID token, a forged one, a forged session token, a garbled header.
        id_token = issuer.token("agent-canary", ttl=3600)
        secrets.append(id_token)
        secrets.append(id_token.rsplit(".", 1)[1])  # the signature alone
        resp = client.post(
            "/oauth2/token",
            data={"grant_type": GRANT, "subject_token_type": ID_TOKEN, "subject_token": id_token},
        )
        session = resp.json()["access_token"]
        secrets.append(session)
        auth = {"Authorization": f"Bearer {session}"}
        note(
            client.post(
                "/oauth2/token",
                data={
                    "grant_type": GRANT,
                    "subject_token_type": ID_TOKEN,
                    "subject_token": PASTED_JWT,
                },
            )
        )
        note(client.get("/v1/tasks", headers={"Authorization": f"Bearer {FORGED_SESSION}"}))
        note(client.get("/v1/tasks", headers={"Authorization": f"Token {PASTED_VAULT_TOKEN}"}))

        # 2. Requests with secrets pasted where they do not belong.
        note(
            client.post(
                "/v1/tasks",
                headers={**auth, "traceparent": f"00-{PASTED_PASSWORD}-x-01"},
                json={
                    "scope": "aws-s3-read",
                    "purpose": "x",
                    "params": {
                        "bucket": PASTED_VAULT_TOKEN,
                        "prefix": f"password={PASTED_PASSWORD}",
                    },
                },
            )
        )
        note(
            client.post(
                "/v1/tasks",
                headers=auth,
                json={"scope": "vault-kv-read", "purpose": "x", "params": {"token": PASTED_JWT}},
            )
        )

        # 3. A real Vault token, used against OpenBao (its audit stream is ingested).
        resp = client.post(
            "/v1/tasks",
            headers=auth,
            json={
                "scope": "vault-kv-read",
                "purpose": f"debug with password={PASTED_PASSWORD} and {PASTED_VAULT_TOKEN}",
            },
        )
        assert resp.status_code == 201, resp.text
        vault_task = resp.json()
        minted = client.post(f"/v1/tasks/{vault_task['id']}/credentials", headers=auth).json()
        vault_token = minted["secret"]["token"]
        secrets.append(vault_token)
        with openbao.client(vault_token) as agent:
            assert agent.get("/v1/secret/data/demo/hello").status_code == 200
        note(client.post(f"/v1/tasks/{vault_task['id']}/credentials", headers=auth))

        # 4. Real STS keys from moto.
        resp = client.post(
            "/v1/tasks",
            headers=auth,
            json={
                "scope": "aws-s3-read",
                "purpose": "read reports",
                "params": {"bucket": "example-data-team", "prefix": "reports"},
            },
        )
        assert resp.status_code == 201, resp.text
        sts = client.post(f"/v1/tasks/{resp.json()['id']}/credentials", headers=auth)
        assert sts.status_code == 201, sts.text
        secrets.append(
            sts.json()["secret"]["secret_access_key"]
            if "secret_access_key" in sts.json()["secret"]
            else sts.json()["env"]["AWS_SECRET_ACCESS_KEY"]
        )
        secrets.append(sts.json()["env"]["AWS_SESSION_TOKEN"])

        # 5. Everything ends; every event is exported.
        for task_id in (vault_task["id"], resp.json()["id"]):
            assert client.post(f"/v1/tasks/{task_id}/complete", headers=auth).status_code == 200
        note(client.delete("/v1/sessions/current", headers=auth))
        note(client.get("/v1/tasks", headers=auth))  # the ended session, presented again

        def use_seen() -> bool:
            return broker.uses.counters.recorded >= 1

        wait_for(use_seen, what="the Vault token's use from OpenBao's audit")
    store = dump_store(settings.effective_database_url)
    wire = b"".join(otlp.raw_bodies)
    logs = "\n".join(all_logs.lines)
    assert otlp.spans, "nothing was exported"
    assert len(errors) >= 6
    assert any(s.name == "broker.credential.use" for s in otlp.spans)
    for secret in secrets:
        assert len(secret) >= 16
        assert secret not in logs, f"a secret reached the logs: {secret[:6]}..."
        assert secret.encode() not in wire, f"a secret reached the OTLP wire: {secret[:6]}..."
        assert secret not in store, f"a secret reached the store: {secret[:6]}..."
        for body in errors:
            assert secret not in body, f"a secret reached an error body: {secret[:6]}..."
    # The scrubbed purpose still tells the auditor what was asked.
    assert "debug with password=[REDACTED]" in store
