"""Uses of broker-minted STS credentials, from CloudTrail records (files and an S3 prefix), joined
to the task's trace by access key id, SourceIdentity or RoleSessionName."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from broker.audit.cloudtrail import parse_record
from broker.domain.audit import EventName
from broker.settings import AuditSettings, AwsSettings, CloudTrailSettings
from broker.store import Database, repo
from tests.audit.conftest import exchange
from tests.support.issuer import TestIssuer
from tests.support.services import Moto, live_broker

pytestmark = pytest.mark.integration

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/broker-s3-read"


def record(
    *,
    key_id: str,
    session: str,
    source_identity: str | None,
    event: str = "GetObject",
    error: str | None = None,
    resource: str = "arn:aws:s3:::example-data-team/reports/q1.csv",
) -> dict[str, Any]:
    """A CloudTrail record as AWS writes it for a call made with an assumed-role session."""
    rec: dict[str, Any] = {
        "eventVersion": "1.09",
        "userIdentity": {
            "type": "AssumedRole",
            "principalId": f"AROAEXAMPLEROLEID:{session}",
            "arn": f"arn:aws:sts::{ACCOUNT}:assumed-role/broker-s3-read/{session}",
            "accountId": ACCOUNT,
            "accessKeyId": key_id,
            "sessionContext": {
                "sessionIssuer": {
                    "type": "Role",
                    "principalId": "AROAEXAMPLEROLEID",
                    "arn": ROLE,
                    "accountId": ACCOUNT,
                    "userName": "broker-s3-read",
                },
                "attributes": {"creationDate": "2026-11-26T12:00:00Z", "mfaAuthenticated": "false"},
            },
        },
        "eventTime": "2026-11-26T12:01:02Z",
        "eventSource": "s3.amazonaws.com",
        "eventName": event,
        "awsRegion": "us-east-1",
        "sourceIPAddress": "203.0.113.7",
        "userAgent": "aws-cli/2.15 Python/3.11",
        "requestParameters": {"bucketName": "example-data-team", "key": "reports/q1.csv"},
        "responseElements": None,
        "requestID": uuid.uuid4().hex[:16].upper(),
        "eventID": str(uuid.uuid4()),
        "readOnly": True,
        "resources": [{"type": "AWS::S3::Object", "ARN": resource}],
        "eventType": "AwsApiCall",
        "recipientAccountId": ACCOUNT,
    }
    if source_identity:
        rec["userIdentity"]["sessionContext"]["sourceIdentity"] = source_identity
    if error:
        rec["errorCode"] = error
        rec["errorMessage"] = "Access Denied"
    return rec


def mint_sts(client: httpx.Client, issuer: TestIssuer) -> dict[str, Any]:
    """A real AssumeRole on moto through the broker's API; returns the task and the credential."""
    session = exchange(client, issuer.token("agent-aws", ttl=3600))
    auth = {"Authorization": f"Bearer {session}"}
    resp = client.post(
        "/v1/tasks",
        headers=auth,
        json={
            "scope": "aws-s3-read",
            "purpose": "read the quarterly report",
            "params": {"bucket": "example-data-team", "prefix": "reports"},
        },
    )
    assert resp.status_code == 201, resp.text
    task = resp.json()
    resp = client.post(f"/v1/tasks/{task['id']}/credentials", headers=auth)
    assert resp.status_code == 201, resp.text
    return {"task": task, "credential": resp.json()}


def cloudtrail_file(folder: Path, records: list[dict[str, Any]], name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ACCOUNT}_CloudTrail_us-east-1_{name}.json.gz"
    path.write_bytes(gzip.compress(json.dumps({"Records": records}).encode()))
    return path


def events_of(db: Database, name: str) -> list[dict[str, Any]]:
    with db.read() as conn:
        return repo.audit_events(conn, name=name, limit=10_000)


def test_cloudtrail_records_become_use_spans_in_the_task_trace(
    moto_server: Moto, issuer: TestIssuer, make_settings: Any, tmp_path: Path
) -> None:
    """Records made with minted STS credentials are matched by access key id, or by the
    SourceIdentity/RoleSessionName the broker set (a chained session has another key id), and
    become use spans under the issuance; an AccessDenied is a denied use; a record with the
    broker's session naming but no credential is reported; other identities are ignored. The
    same files read again, and the same records from an S3 prefix, are not recorded twice."""
    trail = tmp_path / "trail"
    s3 = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="org-cloudtrail")
    settings = make_settings(
        aws=AwsSettings(endpoint_url=moto_server.endpoint),
        audit=AuditSettings(
            cloudtrail=CloudTrailSettings(
                sources=[str(trail), "s3://org-cloudtrail/AWSLogs/"], poll_interval=3600
            )
        ),
    )
    with (
        live_broker(settings) as (server, broker),
        httpx.Client(base_url=server.url, timeout=10) as client,
    ):
        minted = mint_sts(client, issuer)
        task, cred = minted["task"], minted["credential"]
        key_id = cred["env"]["AWS_ACCESS_KEY_ID"]
        details = cred["details"]
        session_name, source_identity = details["role_session_name"], details["source_identity"]
        assert source_identity.startswith(cred["credential_id"])
        records = [
            record(key_id=key_id, session=session_name, source_identity=source_identity),
            record(
                key_id=key_id,
                session=session_name,
                source_identity=source_identity,
                event="ListObjectsV2",
                error="AccessDenied",
                resource="arn:aws:s3:::example-data-team",
            ),
            # A role chained from the minted session: a new key id, the same SourceIdentity.
            record(
                key_id="ASIACHAINEDSESSION01", session="chained", source_identity=source_identity
            ),
            # The broker's naming, but no such task: reported.
            record(
                key_id="ASIAUNKNOWNSESSION01",
                session="crd_ghost.someone",
                source_identity="tsk_ghostghostghost.someone",
            ),
            # Someone else entirely: ignored.
            record(key_id="AKIAOTHERUSER0000001", session="ops-laptop", source_identity=None),
        ]
        cloudtrail_file(trail, records, "20261126T1200Z_a")
        s3.put_object(
            Bucket="org-cloudtrail",
            Key=f"AWSLogs/{ACCOUNT}/CloudTrail/us-east-1/2026/11/26/x.json.gz",
            Body=gzip.compress(json.dumps({"Records": records}).encode()),
        )
        ingest = broker.audit.cloudtrail
        assert ingest.poll_once() == 2  # the local file and the S3 object
        assert ingest.poll_once() == 0  # nothing new
        with broker.db.read() as conn:
            issue = next(
                e
                for e in repo.audit_events(conn, credential_id=cred["credential_id"])
                if e["name"] == EventName.CREDENTIAL_ISSUE
            )
        uses = events_of(broker.db, EventName.CREDENTIAL_USE)
        unmatched = events_of(broker.db, EventName.USE_UNMATCHED)

    assert len(uses) == 3
    by_event = {
        (u["attributes"]["aws.cloudtrail.event_name"], u["attributes"]["broker.use.matched_by"]): u
        for u in uses
    }
    assert set(by_event) == {
        ("GetObject", "access_key_id"),
        ("ListObjectsV2", "access_key_id"),
        ("GetObject", "source_identity"),
    }
    for use in uses:
        assert use["trace_id"] == task["trace_id"]
        assert use["parent_span_id"] == issue["span_id"]
        assert use["credential_id"] == cred["credential_id"]
        assert use["attributes"]["broker.use.source"] == "cloudtrail"
        assert use["attributes"]["client.address"] == "203.0.113.7"
    denied = by_event[("ListObjectsV2", "access_key_id")]
    assert denied["outcome"] == "denied"
    assert denied["attributes"]["broker.use.error"].startswith("AccessDenied")
    assert len(unmatched) == 1
    assert (
        "source_identity=tsk_ghostghostghost.someone"
        in unmatched[0]["attributes"]["broker.use.lookup"]
    )
    assert ingest.outcomes["ignored"] == 2  # the stranger, once per source
    assert ingest.outcomes["duplicate"] == 4  # every known record came twice


def test_record_parsing_keeps_no_request_data() -> None:
    """Only identity, event and outcome fields are kept: request parameters and response
    elements (which may hold secrets, such as credentials in an AssumeRole response) are not."""
    rec = record(key_id="ASIAKEY", session="crd_x.agent", source_identity="tsk_x.agent")
    rec["requestParameters"] = {"secret": "canary-request"}
    rec["responseElements"] = {"credentials": {"sessionToken": "canary-response"}}
    use = parse_record(rec)
    assert use is not None
    text = json.dumps([use.attributes, use.target, use.operation, use.error])
    assert "canary" not in text
    assert [m.kind for m in use.matches] == [
        "access_key_id",
        "source_identity",
        "role_session_name",
    ]
    assert use.ours
    assert parse_record({"eventID": "x", "userIdentity": {"type": "IAMUser"}}) is None
