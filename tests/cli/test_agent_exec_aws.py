"""`broker exec` and `credential_process` with AWS STS (moto): a real boto3 program uses the
injected session, and once it exits the task's sessions are denied by the role's kill switch
(STS cannot revoke a session; the broker denies its SourceIdentity instead)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.support.agent_stack import AgentStack, agent_stack
from tests.support.issuer import TestIssuer
from tests.support.services import Moto, OpenBao

pytestmark = pytest.mark.integration

ROLE = "broker-s3-read"
PROGRAM = """
import json, os, sys, boto3
sts = boto3.client("sts")  # region, endpoint and keys all come from the environment
me = sts.get_caller_identity()
json.dump({"arn": me["Arn"], "key": os.environ["AWS_ACCESS_KEY_ID"],
           "task": os.environ["BROKER_TASK_ID"],
           "has_secret": bool(os.environ.get("AWS_SECRET_ACCESS_KEY")),
           "has_token": bool(os.environ.get("AWS_SESSION_TOKEN"))}, open(sys.argv[1], "w"))
"""


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    issuer: TestIssuer,
    openbao: OpenBao,
    moto_server: Moto,
) -> Iterator[AgentStack]:
    with agent_stack(tmp_path_factory.mktemp("exec-aws"), issuer, openbao, moto=moto_server) as s:
        yield s


def kill_switch(moto: Moto) -> dict[str, object] | None:
    """The role's kill-switch policy as IAM (moto) holds it."""
    iam = boto3.client("iam", endpoint_url=moto.endpoint, region_name="us-east-1")
    try:
        doc = iam.get_role_policy(RoleName=ROLE, PolicyName="broker-kill-switch")["PolicyDocument"]
    except iam.exceptions.NoSuchEntityException:
        return None
    if isinstance(doc, str):
        from urllib.parse import unquote

        doc = json.loads(unquote(doc))
    return dict(doc)


def denied_identities(moto: Moto) -> list[str]:
    doc = kill_switch(moto) or {}
    out: list[str] = []
    for statement in doc.get("Statement", []):  # type: ignore[attr-defined]
        ids = statement.get("Condition", {}).get("StringEquals", {}).get("aws:SourceIdentity", [])
        out.extend([ids] if isinstance(ids, str) else ids)
    return out


def test_exec_runs_a_boto3_program_with_the_sts_session_and_kills_it_afterwards(
    stack: AgentStack, moto_server: Moto, tmp_path: Path
) -> None:
    """`broker exec aws-s3-read -p bucket=... -p prefix=... -- python program.py`: the program's
    own boto3 finds the assumed-role session in its environment and STS says it is the role's
    session named for this credential; after the program exits, the task is completed and the
    role's kill switch denies the task's SourceIdentity, the credential recorded as revoked."""
    out = tmp_path / "caller.json"
    program = tmp_path / "program.py"
    program.write_text(PROGRAM)
    env = stack.env("aws-agent")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "broker",
            "exec",
            "aws-s3-read",
            "-p",
            "bucket=example-data-reports",
            "-p",
            "prefix=2024/q3",
            "--purpose",
            "read the Q3 reports",
            "--",
            sys.executable,
            str(program),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    caller = json.loads(out.read_text())
    assert caller["has_secret"]
    assert caller["has_token"]
    assert caller["arn"].startswith(f"arn:aws:sts::123456789012:assumed-role/{ROLE}/crd_")

    task_id = caller["task"]
    assert stack.task_state(task_id) == "completed"
    (cred,) = stack.credentials(task_id)
    assert cred.handle == caller["key"]  # the program used exactly the minted session
    assert cred.state.value == "revoked"
    assert cred.details["source_identity"] in denied_identities(moto_server)
    (run,) = stack.events(task_id, "broker.credential.use")
    assert run["attributes"]["broker.exec.exit_code"] == 0
    assert run["attributes"]["broker.backend"] == "aws_sts"


def test_credential_process_feeds_an_aws_sdk(
    stack: AgentStack, moto_server: Moto, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An AWS profile whose credential_process is `broker request ... -o credential-process` gives
    boto3 a working STS session (the SDK runs the command itself and reads its JSON)."""
    for key, value in stack.env("sdk-profile").items():
        monkeypatch.setenv(key, value)
    command = (
        f"{sys.executable} -m broker request aws-s3-read -p bucket=example-data-reports "
        '-p prefix=2024 --purpose "nightly report sync" -o credential-process'
    )
    config = tmp_path / "aws-config"
    config.write_text(f"[profile reports]\ncredential_process = {command}\nregion = us-east-1\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    session = boto3.Session(profile_name="reports")
    frozen = session.get_credentials().get_frozen_credentials()
    assert frozen.access_key.startswith(("ASIA", "FSIA"))
    assert frozen.token
    arn = session.client("sts", endpoint_url=moto_server.endpoint).get_caller_identity()["Arn"]
    assert arn.startswith(f"arn:aws:sts::123456789012:assumed-role/{ROLE}/")
    with stack.broker.db.read() as conn:
        from broker.store import repo

        cred = repo.credential_by_handle(conn, "aws_sts", frozen.access_key)
    assert cred is not None
    assert cred.expires_at is not None
