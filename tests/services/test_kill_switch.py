"""AWS kill switches against moto's IAM: what the broker writes on each role, and when.

moto does not evaluate IAM conditions on assumed-role sessions, so these tests read the policy
the broker wrote to moto's IAM and evaluate it against each session's context
(``tests/support/iam_policy.py``): what AWS would enforce, not its effect on a live session.
"""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest

from broker.backends.aws_sts import AwsStsBackend
from broker.backends.base import Minted, MintOutcomeUnknown, MintRequest
from broker.domain.records import Session
from broker.domain.task import CredentialState
from broker.services.kill_switch import EVENT_LIFT, EVENT_SET, ISSUED_BEFORE
from broker.services.tasks import TaskRequest
from broker.settings import AwsSettings
from broker.store import repo
from broker.wiring import Broker, build_broker
from tests.api.flows import Clock
from tests.support.iam_policy import always_denied, credential_context, denied_by
from tests.support.issuer import TestIssuer
from tests.support.services import Moto

pytestmark = pytest.mark.integration

ROLE = "arn:aws:iam::123456789012:role/broker-s3-read"
PARAMS = {"bucket": "example-data-logs", "prefix": "2024/05"}


@dataclass
class AwsHarness:
    broker: Broker
    clock: Clock
    session: Session
    policy: str
    iam: Any

    def policy_document(self) -> dict[str, Any] | None:
        sts = self.broker.backends["aws_sts"]
        assert isinstance(sts, AwsStsBackend)
        return sts.read_kill_switch(ROLE)

    @property
    def cluster(self) -> str:
        return self.broker.settings.cluster_name

    def denied(self, issued: Any, shift: float = 0.0) -> list[str]:
        """The statements of the role's policy (as IAM holds it) denying this credential."""
        context = credential_context(
            issued.credential.details, issued.credential.expires_at, self.cluster, shift=shift
        )
        return denied_by(self.policy_document(), context)

    def mint_task(self) -> tuple[str, Any]:
        task = self.broker.tasks.request(
            self.session, TaskRequest(scope="aws-s3-read", params=PARAMS, purpose="read logs")
        )
        return task.id, self.broker.credentials.mint(self.session, task.id)


@pytest.fixture
def aws(make_settings: Any, issuer: TestIssuer, moto_server: Moto) -> Iterator[AwsHarness]:
    policy = "broker-kill-" + secrets.token_hex(4)
    clock = Clock()
    settings = make_settings(
        aws=AwsSettings(endpoint_url=moto_server.endpoint, kill_switch_policy=policy),
        session_max_ttl=86_400,
    )
    broker = build_broker(settings, clock=clock)
    session = broker.sessions.exchange(issuer.token("agent-1", ttl=20_000)).session
    iam = boto3.client("iam", endpoint_url=moto_server.endpoint, region_name="us-east-1")
    try:
        yield AwsHarness(broker, clock, session, policy, iam)
    finally:
        broker.stop()
        # The role is shared by the session's tests; IAM counts every inline policy on it.
        with contextlib.suppress(iam.exceptions.NoSuchEntityException):
            iam.delete_role_policy(RoleName="broker-s3-read", PolicyName=policy)


def test_completing_an_sts_task_denies_its_sessions_until_they_expire(aws: AwsHarness) -> None:
    """STS cannot revoke: completion puts the credential's session on the role's deny list at
    once (its SourceIdentity names the credential), a session of another task keeps working,
    and the entry (and the policy) goes away once the credential has expired."""
    task_id, issued = aws.mint_task()
    _, other = aws.mint_task()
    source_identity = issued.credential.details["source_identity"]
    assert source_identity.startswith(issued.credential.id + ".")
    aws.broker.tasks.complete(aws.session, task_id)
    with aws.broker.db.read() as conn:
        cred = repo.get_credential(conn, issued.credential.id)
    assert cred is not None and cred.state is CredentialState.REVOKED
    for shift in (-1.0, 0.0, 1.0):
        assert aws.denied(issued, shift), "the ended session must be denied"
        assert aws.denied(other, shift) == [], "a live session must keep working"
    [entry] = aws.broker.kill_switches.live(ROLE)  # type: ignore[union-attr]
    assert entry.task_id == task_id and entry.credential_id == issued.credential.id
    assert entry.expires_at == pytest.approx(issued.minted.expires_at + 30, abs=1)
    assert entry.issued_from is not None and entry.issued_until is not None
    with aws.broker.db.read() as conn:
        revoke = repo.audit_events(
            conn, credential_id=issued.credential.id, name="broker.credential.revoke"
        )
    assert revoke[0]["attributes"]["broker.revoke.method"] == "deny_list"
    # After the credentials expired, the entry lapses and the reconciler deletes the policy.
    aws.clock.advance(max(issued.minted.expires_at, other.minted.expires_at) - aws.clock() + 61)
    assert aws.broker.kill_switches.reconcile() == 1  # type: ignore[union-attr]
    assert aws.policy_document() is None


def test_the_role_wide_kill_switch_denies_every_older_session_and_can_be_lifted(
    aws: AwsHarness,
) -> None:
    """Per role: Deny * for sessions issued before now (+30 s for clock skew), audited with the
    admin as actor; lifting it removes the statement."""
    admin = aws.session.principal
    before = aws.clock()
    entry = aws.broker.kill_switches.kill_role(ROLE, actor=admin, reason="leaked key")  # type: ignore[union-attr]
    after = aws.clock()
    assert entry.kind == ISSUED_BEFORE
    assert before + 30 - 0.001 <= float(entry.value) <= after + 30  # kept to the millisecond
    document = aws.policy_document()
    assert document is not None
    [statement] = document["Statement"]
    assert statement["Sid"] == "BrokerKillIssuedBefore"
    assert set(statement["Condition"]["DateLessThan"]) == {"aws:TokenIssueTime"}
    aws.broker.kill_switches.lift(entry.id, actor=admin, reason="rotated")  # type: ignore[union-attr]
    assert aws.policy_document() is None
    with aws.broker.db.read() as conn:
        names = [e["name"] for e in repo.audit_events(conn, limit=1000)]
    assert EVENT_SET in names and EVENT_LIFT in names


def test_the_reaper_restores_a_policy_changed_behind_its_back(aws: AwsHarness) -> None:
    """Someone (or a lost concurrent write) removed the policy: the reconciler writes it again
    from the store."""
    task_id, _ = aws.mint_task()
    aws.broker.tasks.complete(aws.session, task_id)
    before = aws.policy_document()
    assert before is not None
    aws.iam.delete_role_policy(RoleName="broker-s3-read", PolicyName=aws.policy)
    assert aws.broker.kill_switches.reconcile() == 1  # type: ignore[union-attr]
    assert aws.policy_document() == before
    assert aws.broker.kill_switches.reconcile() == 0  # type: ignore[union-attr]


def test_an_sts_mint_whose_answer_was_lost_is_killed_by_the_reaper(aws: AwsHarness) -> None:
    """STS issued the credential but the broker never saw the answer: the reaper denies the
    SourceIdentity recorded with the intent, for any issue time between the intent and the
    call's end; the task's retry mints a session with its own SourceIdentity that works."""
    sts = aws.broker.backends["aws_sts"]
    assert isinstance(sts, AwsStsBackend)
    real_mint = sts.mint
    made: list[Minted] = []

    def lost(request: MintRequest) -> Minted:
        made.append(real_mint(request))
        raise MintOutcomeUnknown("lost")

    sts.mint = lost  # type: ignore[method-assign]
    task = aws.broker.tasks.request(
        aws.session, TaskRequest(scope="aws-s3-read", params=PARAMS, purpose="read logs")
    )
    with pytest.raises(MintOutcomeUnknown):
        aws.broker.credentials.mint(aws.session, task.id)
    sts.mint = real_mint  # type: ignore[method-assign]
    with aws.broker.db.read() as conn:
        [cred] = repo.credentials_for(conn, task.id)
    assert cred.state is CredentialState.REVOKE_PENDING and cred.handle is None
    assert "mint_call_ended_at" in cred.details
    aws.broker.reaper.run_once(orphan_scan=False)  # type: ignore[union-attr]
    [lost_session] = made
    context = credential_context(lost_session.details, lost_session.expires_at, aws.cluster)
    assert denied_by(aws.policy_document(), context)
    with aws.broker.db.read() as conn:
        assert repo.get_credential(conn, cred.id).state is CredentialState.REVOKED  # type: ignore[union-attr]
    retry = aws.broker.credentials.mint(aws.session, task.id)
    assert retry.credential.details["source_identity"] != cred.details["source_identity"]
    assert aws.denied(retry) == []


def test_a_mint_lost_in_a_crash_is_denied_whenever_it_was_issued(aws: AwsHarness) -> None:
    """A stale intent (the broker died mid-mint, nothing bounds the issue time) is denied by its
    SourceIdentity alone: at any issue time within the longest session lifetime."""
    task = aws.broker.tasks.request(
        aws.session, TaskRequest(scope="aws-s3-read", params=PARAMS, purpose="read logs")
    )
    sts = aws.broker.backends["aws_sts"]
    assert isinstance(sts, AwsStsBackend)
    real_mint = sts.mint

    class Crashed(BaseException):
        """The process dies between the backend call and the record."""

    def crash(request: MintRequest) -> Minted:
        real_mint(request)
        raise Crashed

    sts.mint = crash  # type: ignore[method-assign]
    with pytest.raises(Crashed):
        aws.broker.credentials.mint(aws.session, task.id)
    sts.mint = real_mint  # type: ignore[method-assign]
    with aws.broker.db.read() as conn:
        [cred] = repo.credentials_for(conn, task.id)
    assert cred.state is CredentialState.MINTING
    aws.clock.advance(aws.broker.settings.reaper_mint_grace + 1)
    aws.broker.reaper.run_once(orphan_scan=False)  # type: ignore[union-attr]
    [entry] = [e for e in aws.broker.kill_switches.live(ROLE) if e.credential_id == cred.id]  # type: ignore[union-attr]
    assert entry.issued_from is None
    assert always_denied(aws.policy_document(), cred.details["source_identity"], aws.cluster)


def test_a_role_whose_inline_policies_leave_no_room_keeps_the_revocation_pending(
    aws: AwsHarness,
) -> None:
    """IAM counts a role's inline policies together (10,240 characters): with another policy
    taking nearly all of it, the deny cannot be written, so the credential stays
    ``revoke_pending`` (never "revoked"); once room is made the reaper's retry writes it."""
    task_id, issued = aws.mint_task()
    filler = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "F" * 9_800, "Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}
        ],
    }
    aws.iam.put_role_policy(
        RoleName="broker-s3-read",
        PolicyName=aws.policy + "-filler",
        PolicyDocument=json.dumps(filler),
    )
    sts = aws.broker.backends["aws_sts"]
    assert isinstance(sts, AwsStsBackend)
    sts._budgets.clear()  # the other policies are re-read every few minutes; now, for the test
    try:
        aws.broker.tasks.complete(aws.session, task_id)
        with aws.broker.db.read() as conn:
            cred = repo.get_credential(conn, issued.credential.id)
        assert cred is not None and cred.state is CredentialState.REVOKE_PENDING
        assert cred.last_error is not None and "available" in cred.last_error
    finally:
        aws.iam.delete_role_policy(RoleName="broker-s3-read", PolicyName=aws.policy + "-filler")
    sts._budgets.clear()
    aws.clock.advance(10)
    aws.broker.reaper.run_once(orphan_scan=False)  # type: ignore[union-attr]
    with aws.broker.db.read() as conn:
        cred = repo.get_credential(conn, issued.credential.id)
    assert cred is not None and cred.state is CredentialState.REVOKED
    assert aws.denied(issued)
