"""Many STS tasks ended on one role: the scenario behind the volume test and its benchmark.

A broker built in this process (real clock, so the broker's time and moto's agree) mints STS
sessions through moto on a role of its own and completes almost all of them at once; a few stay
live, and halfway an operator sets the role-wide kill switch. After each completion the role's
kill-switch policy is read back from moto's IAM, so its size is known at every step. The caller
asserts (``tests/services/test_kill_switch_volume.py``) or reports (``bench/sts_kill_switch.py``).
"""

from __future__ import annotations

import json
import secrets
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3

from broker.backends.aws_sts import AwsStsBackend, trust_policy
from broker.backends.sts_deny import policy_chars
from broker.domain.records import Session
from broker.services.credentials import Issued
from broker.services.tasks import TaskRequest
from broker.settings import AwsSettings, Settings
from broker.store.migrate import upgrade
from broker.wiring import Broker, build_broker
from tests.support.issuer import TestIssuer

ACCOUNT = "123456789012"
#: The role's own permissions: an inline policy sharing IAM's 10,240 characters with the switch.
PERMISSIONS = {
    "Version": "2012-10-17",
    "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}
    ],
}

TEMPLATE = """\
name: volume-sts
description: Many short STS tasks on one role (the kill-switch volume test).
owner: platform-team
backend:
  type: aws_sts
  role_arn: {role_arn}
  role_max_session: 3600
requester:
  all:
    - claim: sub
      regex: "[A-Za-z0-9._:/@-]{{1,128}}"
ttl:
  default: 900
  max: 3600
max_active_tasks: 1000
risk: low
approval:
  mode: auto
"""


@dataclass
class Minted:
    """One session as the test knows it (never its secret)."""

    task_id: str
    credential_id: str
    details: dict[str, Any]
    expires_at: float
    ended: bool = False


@dataclass
class VolumeRun:
    """What happened: every session, the kill moment, timings and policy sizes."""

    role_arn: str
    cluster: str
    sessions: list[Minted] = field(default_factory=list)
    role_kill_at: float | None = None
    complete_ms: list[float] = field(default_factory=list)
    put_policy_ms: list[float] = field(default_factory=list)
    policy_chars: list[int] = field(default_factory=list)
    budget: int = 0
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        ended = [s for s in self.sessions if s.ended]
        per_session_chars = sum(len(s.details["source_identity"]) + 3 for s in ended) + 120
        return {
            "sessions": len(self.sessions),
            "ended": len(ended),
            "live": len(self.sessions) - len(ended),
            "seconds": round(self.seconds, 1),
            "complete_p50_ms": round(statistics.median(self.complete_ms), 1),
            "complete_p95_ms": round(_percentile(self.complete_ms, 95), 1),
            "complete_max_ms": round(max(self.complete_ms), 1),
            "bare_put_role_policy_p50_ms": round(statistics.median(self.put_policy_ms), 1)
            if self.put_policy_ms
            else None,
            "policy_chars_max": max(self.policy_chars),
            "policy_chars_last": self.policy_chars[-1],
            "inline_budget": self.budget,
            "one_deny_per_session_would_need_chars": per_session_chars,
        }


def _percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def role_for_run(endpoint: str) -> str:
    """A fresh role in moto (MaxSessionDuration one hour) carrying its own permissions."""
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = "broker-volume-" + secrets.token_hex(4)
    role = iam.create_role(
        RoleName=name,
        AssumeRolePolicyDocument=trust_policy(ACCOUNT),
        MaxSessionDuration=3600,
    )["Role"]
    iam.put_role_policy(
        RoleName=name, PolicyName="permissions", PolicyDocument=json.dumps(PERMISSIONS)
    )
    return str(role["Arn"])


def volume_broker(
    base: Path, endpoint: str, issuer: TestIssuer, role_arn: str, **overrides: Any
) -> Broker:
    """A broker on a fresh SQLite store (or ``database_url``), serving only the volume scope."""
    scopes = base / "scopes"
    scopes.mkdir(parents=True, exist_ok=True)
    (scopes / "volume-sts.yaml").write_text(TEMPLATE.format(role_arn=role_arn))
    values: dict[str, Any] = {
        "dev_mode": True,
        "data_dir": base / "data",
        "scopes_dir": scopes,
        "issuers": [issuer.issuer_config()],
        "session_max_ttl": 86_400,
        "aws": AwsSettings(endpoint_url=endpoint, kill_switch_policy="broker-kill-switch"),
        "cluster_name": "vol-" + secrets.token_hex(3),
        **overrides,
    }
    settings = Settings(**values)
    upgrade(settings.effective_database_url)
    return build_broker(settings)


def run_volume(
    broker: Broker,
    session: Session,
    role_arn: str,
    *,
    tasks: int = 1000,
    live_every: int = 50,
    kill_at: int | None = 500,
    measure_bare_put: bool = True,
) -> VolumeRun:
    """Mint ``tasks`` sessions and complete all but every ``live_every``-th; the operator kills
    the whole role after task ``kill_at``."""
    sts = broker.backends["aws_sts"]
    assert isinstance(sts, AwsStsBackend)
    assert broker.kill_switches is not None
    run = VolumeRun(role_arn=role_arn, cluster=broker.settings.cluster_name)
    run.budget = sts.kill_switch_budget(role_arn)
    started = time.monotonic()
    for i in range(tasks):
        task = broker.tasks.request(
            session, TaskRequest(scope="volume-sts", params={}, purpose=f"volume task {i}")
        )
        issued: Issued = broker.credentials.mint(session, task.id)
        minted = Minted(
            task.id,
            issued.credential.id,
            dict(issued.credential.details),
            float(issued.minted.expires_at),
        )
        run.sessions.append(minted)
        if i % live_every != live_every - 1:
            t0 = time.perf_counter()
            broker.tasks.complete(session, task.id)
            run.complete_ms.append((time.perf_counter() - t0) * 1000)
            minted.ended = True
            document = sts.read_kill_switch(role_arn)
            run.policy_chars.append(policy_chars(document) if document else 0)
            if measure_bare_put and document is not None and i % 25 == 0:
                # The bare IAM write of the same document: what any revocation costs at least.
                t0 = time.perf_counter()
                sts.write_kill_switch(role_arn, document)
                run.put_policy_ms.append((time.perf_counter() - t0) * 1000)
        if kill_at is not None and i == kill_at:
            entry = broker.kill_switches.kill_role(
                role_arn, actor=session.principal, reason="volume test: the role-wide switch"
            )
            run.role_kill_at = float(entry.value)
    run.seconds = time.monotonic() - started
    return run
