"""AWS STS/IAM (moto) stopped and started again under a broker replica."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import boto3
import pytest

from broker.store import Database, repo
from broker.store.migrate import upgrade
from tests.faults.checks import all_exported, chain_verifies, problem
from tests.faults.parts import restart_moto
from tests.replicas.cluster import (
    Cluster,
    base_config,
    complete,
    login,
    mint,
    request_task,
    scope_folder,
    wait_until,
)
from tests.support.iam_policy import credential_context, denied_by
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import start_test_moto

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

ROLE = "broker-s3-read"


def kill_switch_document(endpoint: str) -> dict[str, Any] | None:
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # moto's dummy keys
    )
    try:
        doc = iam.get_role_policy(RoleName=ROLE, PolicyName="broker-kill-switch")["PolicyDocument"]
    except iam.exceptions.NoSuchEntityException:
        return None
    return dict(json.loads(unquote(doc)) if isinstance(doc, str) else doc)


def test_sts_down_then_back(
    tmp_path: Path, pg_url: str, issuer: TestIssuer, otlp: OtlpReceiver
) -> None:
    """While AWS is unreachable, an STS mint fails with a clear 503 ``backend_unavailable`` and
    nothing issued (the approval kept), and completing a task with live STS credentials still
    ends it: its kill switch is recorded at once and written to IAM by the reaper when AWS is
    back. Then the failed mint succeeds on retry, the held session is denied
    in the role's policy, every audit event was exported once and the chain verifies."""
    moto = start_test_moto(tmp_path / "moto")
    port = int(moto.endpoint.rsplit(":", 1)[1])
    upgrade(pg_url)
    config = base_config(
        database_url=pg_url,
        issuer=issuer,
        scopes_dir=scope_folder(tmp_path),
        aws={"endpoint_url": moto.endpoint, "timeout": 2.0},
        otlp={"endpoint": otlp.endpoint},
        reaper_interval=0.5,
    )
    nodes = Cluster(tmp_path / "cluster", config, count=1)
    process = moto.process
    try:
        nodes.start()
        (client,) = nodes.clients()
        agent = login(client, issuer, "sts-agent")
        auditor = login(client, issuer, "sts-auditor", broker_roles=["auditor"])
        held = request_task(client, agent, "replica-sts").json()["id"]
        minted = mint(client, agent, held)
        assert minted.status_code == 201, minted.text
        held_session = minted.json()

        process.stop()
        later = request_task(client, agent, "replica-sts").json()["id"]
        problem(mint(client, agent, later, key="sts-retry"), 503, "backend_unavailable")
        assert client.get(f"/v1/tasks/{later}", headers=agent.auth).json()["state"] == "approved"
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["backend:aws_sts"] != "ok"
        ended = complete(client, agent, held)
        assert ended.status_code == 200 and ended.json()["state"] == "completed", ended.text

        process = restart_moto(tmp_path / "moto", port)
        store = Database(pg_url, pool_size=1)
        try:

            def denied() -> bool:
                with store.read() as conn:
                    (cred,) = repo.credentials_for(conn, held)
                context = credential_context(
                    held_session["details"], held_session["expires_at"], config["cluster_name"]
                )
                return cred.state.value == "revoked" and bool(
                    denied_by(kill_switch_document(moto.endpoint), context)
                )

            wait_until(denied, timeout=60, interval=0.5, what="the kill switch written to IAM")
            again = mint(client, agent, later, key="sts-retry")
            assert again.status_code == 201, again.text
            with store.read() as conn:
                revokes = repo.audit_events(conn, task_id=held, name="broker.credential.revoke")
            assert [e["outcome"] for e in revokes][-1] == "success"
            assert "failure" in [e["outcome"] for e in revokes], "the failed attempt is on record"
            chain_verifies(client, auditor)
            all_exported(store, otlp)
        finally:
            store.dispose()
            client.close()
    except Exception:
        print(nodes.logs())
        raise
    finally:
        nodes.stop()
        process.stop()
