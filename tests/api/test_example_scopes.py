"""Each example template end to end over HTTP: requested with real ID tokens, decided (by the
right approvers where the rule asks), minted against the real backend (OpenBao's token and
database engines on PostgreSQL, moto's STS), and the credential does what the template says."""

from __future__ import annotations

from typing import Any

import boto3
import psycopg
import pytest

from broker.settings import AwsSettings
from tests.api.flows import cast, running, settings_for
from tests.support.issuer import TestIssuer
from tests.support.services import Moto, OpenBao

pytestmark = pytest.mark.integration


def _connect(env: dict[str, str]) -> psycopg.Connection[Any]:
    return psycopg.connect(env["DATABASE_URL"], autocommit=True, connect_timeout=5)


@pytest.mark.postgres
def test_postgres_examples(openbao_db: OpenBao, issuer: TestIssuer, make_settings: Any) -> None:
    """postgres-readonly mints at once and may only read; postgres-readwrite waits for a DBA who
    is not the requester, then may write. Completing the tasks drops both logins."""
    settings = settings_for(make_settings, issuer, vault=openbao_db.vault_settings())
    with running(settings) as (_, client):
        people = cast(client, issuer)

        ro = people.agent.request("postgres-readonly", purpose="count the items").json()
        assert ro["state"] == "approved"
        minted = people.agent.mint(ro["id"])
        assert minted.status_code == 201, minted.text
        ro_env = minted.json()["env"]
        with _connect(ro_env) as conn:
            assert conn.execute("SELECT count(*) FROM demo.items").fetchone() == (2,)
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("INSERT INTO demo.items VALUES (9, 'nine')")

        rw = people.agent.request("postgres-readwrite", purpose="fix item 2").json()
        assert rw["state"] == "pending"
        assert people.agent.mint(rw["id"]).json()["code"] == "task_not_approved"
        assert people.wrong_group.approve(rw["id"]).status_code == 403
        assert people.dba.approve(rw["id"], "INC-42").json()["state"] == "approved"
        minted = people.agent.mint(rw["id"])
        assert minted.status_code == 201, minted.text
        rw_env = minted.json()["env"]
        with _connect(rw_env) as conn:
            conn.execute("UPDATE demo.items SET name = 'fixed' WHERE id = 2")

        for task in (ro, rw):
            assert people.agent.post(f"/v1/tasks/{task['id']}/complete").status_code == 200
        for env in (ro_env, rw_env):
            with pytest.raises(psycopg.OperationalError):
                _connect(env).close()


def test_aws_examples(moto_server: Moto, issuer: TestIssuer, make_settings: Any) -> None:
    """aws-s3-read mints at once with the session policy rendered from the bucket and prefix;
    aws-deploy needs two release managers, then assumes the deploy role with its session tags."""
    settings = settings_for(
        make_settings, issuer, aws=AwsSettings(endpoint_url=moto_server.endpoint)
    )
    with running(settings) as (_, client):
        people = cast(client, issuer)
        s3 = people.agent.request(
            "aws-s3-read", {"bucket": "example-data-logs", "prefix": "2024/05"}
        ).json()
        assert s3["state"] == "approved"
        minted = people.agent.mint(s3["id"])
        assert minted.status_code == 201, minted.text
        body = minted.json()
        assert body["details"]["role_arn"] == "arn:aws:iam::123456789012:role/broker-s3-read"
        sts = boto3.client(
            "sts",
            endpoint_url=moto_server.endpoint,
            region_name="us-east-1",
            aws_access_key_id=body["env"]["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=body["env"]["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=body["env"]["AWS_SESSION_TOKEN"],
        )
        assert "assumed-role/broker-s3-read/" in sts.get_caller_identity()["Arn"]

        deploy = people.agent.request(
            "aws-deploy", {"environment": "production", "change": "CHG-7777"}
        ).json()
        assert people.manager1.approve(deploy["id"]).json()["state"] == "pending"
        assert people.agent.mint(deploy["id"]).json()["code"] == "task_not_approved"
        assert people.manager2.approve(deploy["id"]).json()["state"] == "approved"
        minted = people.agent.mint(deploy["id"])
        assert minted.status_code == 201, minted.text
        assert minted.json()["details"]["role_arn"] == (
            "arn:aws:iam::123456789012:role/broker-deploy"
        )
        second = people.agent.mint(deploy["id"])
        assert (second.status_code, second.json()["code"]) == (409, "already_issued")
