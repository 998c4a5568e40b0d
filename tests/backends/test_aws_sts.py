"""The AWS STS backend: against moto's STS/IAM, and with botocore's stubs where moto cannot fail."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import boto3
import botocore.exceptions
import pytest
from botocore.stub import ANY, Stubber

from broker.backends import sts_deny, sts_rules
from broker.backends.aws_sts import AwsStsBackend
from broker.backends.base import MintOutcomeUnknown
from broker.domain.scope import AwsStsBackend as AwsStsSpec
from broker.errors import ScopeMisconfigured, ServiceUnavailable
from broker.settings import AwsSettings
from tests.backends.helpers import mint_request, planned
from tests.support.services import Moto

ROLE = "arn:aws:iam::123456789012:role/broker-s3-read"
POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::example-data-a/x/*"}
    ],
}


def spec(**kw: Any) -> AwsStsSpec:
    values: dict[str, Any] = {"type": "aws_sts", "role_arn": ROLE, "session_policy": POLICY}
    values.update(kw)
    return AwsStsSpec(**values)


def sts_backend(moto: Moto, **kw: Any) -> AwsStsBackend:
    return AwsStsBackend(AwsSettings(endpoint_url=moto.endpoint, **kw), cluster="test")


# --- against moto ----------------------------------------------------------------------------


@pytest.mark.integration
def test_assume_role_mints_working_credentials_that_name_task_and_principal(
    moto_server: Moto,
) -> None:
    """The credentials work (GetCallerIdentity shows the assumed role and the session name that
    carries the credential id and subject); the environment form is complete."""
    backend = sts_backend(moto_server)
    request = mint_request(spec(), ttl=900, subject="repo:org/app")
    minted = backend.mint(planned(backend, request))
    assert minted.kind == "aws_sts"
    assert minted.handle == minted.secret["access_key_id"]
    assert minted.expires_at <= time.time() + 900 + 5
    details = minted.details
    assert details["source_identity"] == f"{request.credential_id}.repo-org-app"
    assert details["role_session_name"] == f"{request.credential_id}.repo-org-app"
    assert details["duration"] == 900
    assert details["session_policy_chars"] > 0
    env = minted.env
    assert env["AWS_ACCESS_KEY_ID"] == minted.secret["access_key_id"]
    assert env["AWS_SECRET_ACCESS_KEY"] == minted.secret["secret_access_key"]
    assert env["AWS_SESSION_TOKEN"] == minted.secret["session_token"]
    assert env["AWS_REGION"] == "us-east-1" and env["AWS_ENDPOINT_URL"] == moto_server.endpoint
    assert minted.secret["secret_access_key"] not in repr(minted)
    caller = boto3.client(
        "sts",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        aws_session_token=env["AWS_SESSION_TOKEN"],
    ).get_caller_identity()
    assert caller["Arn"] == (
        f"arn:aws:sts::123456789012:assumed-role/broker-s3-read/{details['role_session_name']}"
    )


@pytest.mark.integration
def test_duration_never_exceeds_the_roles_real_maximum(moto_server: Moto) -> None:
    """The template allows 12 h, the task asks 2 h, the role allows 1 h: 1 h is asked of STS
    (moto would have issued 2 h)."""
    backend = sts_backend(moto_server)
    minted = backend.mint(planned(backend, mint_request(spec(role_max_session=43_200), ttl=7200)))
    assert minted.details["duration"] == 3600
    assert minted.expires_at <= time.time() + 3600 + 5


@pytest.mark.integration
def test_a_role_that_does_not_exist_is_refused(moto_server: Moto) -> None:
    """moto would assume a missing role; the broker looks it up first and refuses it as a
    misconfigured scope, naming the role only in the internal cause (for the admin)."""
    backend = sts_backend(moto_server)
    missing = spec(role_arn="arn:aws:iam::123456789012:role/no-such-role")
    with pytest.raises(ScopeMisconfigured) as refused:
        backend.mint(planned(backend, mint_request(missing)))
    assert refused.value.code == "scope_misconfigured"
    assert "no-such-role does not exist" in (refused.value.internal or "")
    assert "no-such-role" not in refused.value.detail


@pytest.mark.integration
def test_kill_switch_policy_is_written_read_back_and_deleted(moto_server: Moto) -> None:
    """The inline policy is exactly the document rendered; with nothing to deny it is deleted.
    Its budget is IAM's 10,240 characters less the role's other inline policies (whitespace
    excluded) and a safety margin."""
    backend = sts_backend(moto_server, kill_switch_policy="broker-kill-test")
    state = sts_deny.RoleDenyState(
        cluster="test",
        ended=[sts_deny.SessionWindow("crd_a.agent")],
        issued_before=1_700_000_000.0,
    )
    written = backend.write_kill_switch(ROLE, sts_deny.document(sts_deny.plan(state), "test"))
    assert written is not None
    assert backend.read_kill_switch(ROLE) == written
    statements = {s["Sid"]: s for s in written["Statement"]}
    assert statements["BrokerKillTasks"]["Condition"] == {
        "StringEquals": {"aws:SourceIdentity": ["crd_a.agent"]}
    }
    assert statements["BrokerKillIssuedBefore"]["Condition"] == {
        "DateLessThan": {"aws:TokenIssueTime": "2023-11-14T22:13:20Z"}
    }
    iam = boto3.client("iam", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    others = 0
    for name in iam.list_role_policies(RoleName="broker-s3-read")["PolicyNames"]:
        if name != "broker-kill-test":
            text: Any = iam.get_role_policy(RoleName="broker-s3-read", PolicyName=name)
            doc = text["PolicyDocument"]
            others += sts_deny.policy_chars(unquote(doc) if isinstance(doc, str) else doc)
    assert backend.kill_switch_budget(ROLE) == 10_240 - sts_deny.INLINE_SAFETY_MARGIN - others
    assert backend.write_kill_switch(ROLE, None) is None
    assert backend.read_kill_switch(ROLE) is None


@pytest.mark.integration
def test_health_answers_with_moto(moto_server: Moto) -> None:
    """The backend is ready when STS answers GetCallerIdentity."""
    sts_backend(moto_server).health()


# --- where moto cannot fail: botocore stubs and hooks -----------------------------------------


def offline_backend() -> AwsStsBackend:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    return AwsStsBackend(
        AwsSettings(endpoint_url="http://127.0.0.1:9", verify_roles=False, timeout=1),
        session=session,
    )


def test_a_refused_session_policy_is_never_retried_without_it() -> None:
    """STS refusing the policy (PackedPolicyTooLarge) is the answer: one call, with the policy,
    and no second call without it."""
    backend = offline_backend()
    request = planned(backend, mint_request(spec()))
    calls: list[dict[str, Any]] = []
    backend.sts.meta.events.register(
        "provide-client-params.sts.AssumeRole", lambda params, **_: calls.append(dict(params))
    )
    with Stubber(backend.sts) as stub:
        stub.add_response(
            "get_caller_identity",
            {
                "Arn": "arn:aws:iam::123456789012:user/broker",
                "UserId": "u",
                "Account": "123456789012",
            },
        )
        stub.add_client_error(
            "assume_role", service_error_code="PackedPolicyTooLarge", http_status_code=400
        )
        with pytest.raises(ServiceUnavailable) as refused:
            backend.mint(request)
        stub.assert_no_pending_responses()
    assert refused.value.code == "backend_refused"
    assert len(calls) == 1
    assert calls[0]["Policy"] == sts_rules.session_policy(POLICY)
    assert calls[0]["SourceIdentity"] == request.planned["source_identity"]


def test_a_lost_answer_is_an_unknown_outcome_and_every_attempt_carries_the_policy() -> None:
    """A read timeout may follow an issued credential: the broker reports an unknown outcome (so
    the reaper applies the task's kill switch), and botocore's retries resend the same request,
    session policy included."""
    backend = offline_backend()
    request = planned(backend, mint_request(spec()))
    bodies: list[bytes] = []

    def timeout(request: Any, **_: Any) -> None:
        body = request.body or b""
        bodies.append(body.encode() if isinstance(body, str) else bytes(body))
        raise botocore.exceptions.ReadTimeoutError(endpoint_url="http://127.0.0.1:9")

    backend._caller = (time.monotonic(), "arn:aws:iam::123456789012:user/broker")
    backend.sts.meta.events.register("before-send.sts.AssumeRole", timeout)
    with pytest.raises(MintOutcomeUnknown):
        backend.mint(request)
    assert len(bodies) > 1  # botocore retried ...
    assert len(set(bodies)) == 1  # ... the very same request ...
    assert b"Policy=" in bodies[0] and b"SourceIdentity=" in bodies[0]  # ... policy included


def test_an_unreachable_sts_is_a_clean_503() -> None:
    """Nothing listens: ServiceUnavailable, and not an unknown outcome."""
    backend = offline_backend()
    backend._caller = (time.monotonic(), "arn:aws:iam::123456789012:user/broker")
    with pytest.raises(ServiceUnavailable) as down:
        backend.mint(planned(backend, mint_request(spec())))
    assert down.value.code == "backend_unavailable"
    assert not isinstance(down.value, MintOutcomeUnknown)


def test_role_chaining_caps_the_duration_at_one_hour() -> None:
    """When the broker itself runs under an assumed role, sessions last one hour at most."""
    backend = offline_backend()
    backend._caller = (time.monotonic(), "arn:aws:sts::123456789012:assumed-role/broker/pod")
    request = planned(backend, mint_request(spec(role_max_session=43_200), ttl=7200))
    with Stubber(backend.sts) as stub:
        stub.add_response(
            "assume_role",
            {
                "Credentials": {
                    "AccessKeyId": "ASIAEXAMPLEEXAMPLE12",
                    "SecretAccessKey": "s" * 40,
                    "SessionToken": "t" * 40,
                    "Expiration": datetime.now(UTC) + timedelta(hours=1),
                },
                "AssumedRoleUser": {"Arn": ROLE, "AssumedRoleId": "AROAEXAMPLE:x"},
                "PackedPolicySize": 95,
            },
            {
                "RoleArn": ROLE,
                "RoleSessionName": request.planned["role_session_name"],
                "SourceIdentity": request.planned["source_identity"],
                "DurationSeconds": 3600,
                "Policy": ANY,
                "Tags": ANY,
            },
        )
        minted = backend.mint(request)
    assert minted.details["duration"] == 3600
    assert minted.details["packed_policy_size"] == 95
