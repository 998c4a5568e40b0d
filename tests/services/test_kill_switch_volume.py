"""AWS revocation at volume: 1,000 STS tasks ended on one role within minutes (well inside the
role's one-hour session lifetime), against moto's IAM.

moto enforces none of IAM's limits and evaluates no condition, so the test checks the limit
itself after every completion and proves the final policy, as moto's IAM holds it, by evaluating
it against each session's context (``tests/support/iam_policy.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker.backends.sts_deny import ROLE_INLINE_POLICY_MAX_CHARS, policy_chars
from broker.domain.task import CredentialState
from broker.services.tasks import TaskRequest
from broker.store import repo
from tests.support.iam_policy import credential_context, denied_by, session_context
from tests.support.issuer import TestIssuer
from tests.support.services import Moto
from tests.support.sts_volume import PERMISSIONS, role_for_run, run_volume, volume_broker

pytestmark = pytest.mark.integration


@pytest.mark.timeout(1200)
def test_a_thousand_ended_sts_tasks_on_one_role_stay_denied_within_iams_limits(
    tmp_path: Path, moto_server: Moto, issuer: TestIssuer
) -> None:
    """1,000 tasks on one role: 980 completed at once, 20 kept live, the role-wide kill switch
    set after task 500. After every completion the role's inline policies fit IAM's 10,240
    characters; at the end no revocation is pending, every ended session is denied, the
    role-wide switch still denies everything issued before it, live sessions issued after it
    work, and a session minted afterwards works."""
    role_arn = role_for_run(moto_server.endpoint)
    broker = volume_broker(tmp_path, moto_server.endpoint, issuer, role_arn)
    try:
        session = broker.sessions.exchange(issuer.token("volume-agent", ttl=20_000)).session
        run = run_volume(broker, session, role_arn, tasks=1000, live_every=50, kill_at=500)
        print("kill switch volume:", run.summary())

        others = policy_chars(PERMISSIONS)
        assert max(run.policy_chars) + others <= ROLE_INLINE_POLICY_MAX_CHARS
        with broker.db.read() as conn:
            pending = repo.list_credentials(conn, states=[CredentialState.REVOKE_PENDING], limit=10)
            states = {c.id: c.state for c in repo.list_credentials(conn, limit=2000)}
        assert pending == []
        ended = [s for s in run.sessions if s.ended]
        live = [s for s in run.sessions if not s.ended]
        assert len(ended) == 980 and len(live) == 20
        assert {states[s.credential_id] for s in ended} == {CredentialState.REVOKED}

        sts = broker.backends["aws_sts"]
        document = sts.read_kill_switch(role_arn)  # type: ignore[attr-defined]
        assert document is not None
        assert run.role_kill_at is not None
        for minted in run.sessions:
            for shift in (-1.0, 0.0, 1.0):
                context = credential_context(
                    minted.details, minted.expires_at, run.cluster, shift=shift
                )
                verdict = denied_by(document, context)
                issued_at = float(context["aws:TokenIssueTime"])
                if minted.ended or issued_at < run.role_kill_at:
                    assert verdict, f"{minted.credential_id} must be denied"
                else:
                    assert verdict == [], f"live {minted.credential_id} denied by {verdict}"
        assert any(
            not s.ended and s.expires_at - s.details["duration"] > run.role_kill_at for s in live
        )
        # The role-wide switch still applies to anyone's session issued before it.
        outsider = session_context(None, run.role_kill_at - 60, None)
        assert denied_by(document, outsider) == ["BrokerKillIssuedBefore"]

        task = broker.tasks.request(
            session, TaskRequest(scope="volume-sts", params={}, purpose="after the volume")
        )
        fresh = broker.credentials.mint(session, task.id)
        context = credential_context(fresh.credential.details, fresh.minted.expires_at, run.cluster)
        assert denied_by(sts.read_kill_switch(role_arn), context) == []  # type: ignore[attr-defined]
    finally:
        broker.stop()
