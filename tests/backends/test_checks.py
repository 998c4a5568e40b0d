"""`broker scopes check --live`: each backend checks a scope's prerequisites against the real
OpenBao and moto, and says exactly what is missing and how to create it."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from broker.backends.aws_sts import AwsStsBackend
from broker.backends.aws_trust import principal_arn, trust_verdict
from broker.backends.base import Checkable
from broker.backends.vault import VaultBackend
from broker.scopes.loader import LoadedTemplate, parse_template
from broker.scopes.prerequisites import Requirement, renderable, requirements
from broker.settings import AwsSettings
from tests.support.services import Moto, OpenBao

HEAD = """\
name: {name}
description: A template under test.
owner: platform-team
requester:
  all:
    - claim: groups
      one_of: [developers]
ttl:
  default: 900
  max: 1800
risk: low
approval:
  mode: auto
"""


def template(tmp_path: Path, name: str, backend: str, extra: str = "") -> LoadedTemplate:
    path = tmp_path / f"{name}.yaml"
    path.write_text(HEAD.format(name=name) + backend + extra)
    loaded, problems = parse_template(path)
    assert loaded is not None, [str(p) for p in problems]
    return loaded


def statuses(found: list[Requirement]) -> dict[str, str]:
    return {r.what: r.status for r in found}


def test_renderable_values_are_listed_when_they_can_be(tmp_path: Path) -> None:
    """An enum-typed placeholder expands to every value; a free string cannot be listed."""
    loaded = template(
        tmp_path,
        "kv-team",
        "backend:\n  type: vault_token\n  policies: ['kv-{{params.team}}', kv-read]\n"
        "  maximum: {policies: ['kv-*']}\n",
        "parameters:\n  team: {enum: [a, b]}\n  free: {pattern: '[a-z]{1,9}', required: false, default: x}\n",
    )
    t = loaded.template
    assert renderable(t, "kv-{{params.team}}") == ["kv-a", "kv-b"]
    assert renderable(t, "kv-{{params.free}}") is None
    assert renderable(t, "fixed") == ["fixed"]
    whats = [r.what for r in requirements(t)]
    assert "OpenBao/Vault has the ACL policy 'kv-a', granting no sudo" in whats
    assert "OpenBao/Vault has the ACL policy 'kv-read', granting no sudo" in whats


@pytest.mark.integration
def test_vault_check_names_the_missing_policy_and_the_role_that_refuses_it(
    tmp_path: Path, openbao: OpenBao
) -> None:
    """A template naming a policy OpenBao lacks: the check says MISSING with the command that
    creates it, and that the token role does not allow it, listing what the role allows and
    the exact `bao write` to fix it; once both are created the same check is all ok (nothing
    was cached in between). A database role that does not exist is missing too."""
    name = f"kv-team-{secrets.token_hex(3)}"
    backend = VaultBackend(openbao.vault_settings(), cluster="check")
    assert isinstance(backend, Checkable)
    loaded = template(
        tmp_path, "kv-check", f"backend:\n  type: vault_token\n  policies: [{name}]\n"
    )
    found = {r.key: r for r in backend.check(loaded.template)}
    assert found[("policy", name)].status == "missing"
    assert found[("policy", name)].fix.startswith(f"bao policy write {name} ")
    allows = found[("role_allows", name)]
    assert allows.status == "missing"
    assert "allows only kv-read, kv-write" in (allows.found or "")
    assert (
        allows.fix
        == f"bao write auth/token/roles/broker-child allowed_policies=kv-read,kv-write,{name}"
    )
    with openbao.client() as root:
        role = root.get("/v1/auth/token/roles/broker-child").json()["data"]
        assert (
            root.put(
                f"/v1/sys/policies/acl/{name}",
                json={"policy": 'path "secret/data/demo/*" { capabilities = ["read"] }'},
            ).status_code
            == 204
        )
        try:
            assert (
                root.post(
                    "/v1/auth/token/roles/broker-child",
                    json={"allowed_policies": [*role["allowed_policies"], name]},
                ).status_code
                == 204
            )
            assert {r.status for r in backend.check(loaded.template)} == {"ok"}
        finally:
            root.post(
                "/v1/auth/token/roles/broker-child",
                json={"allowed_policies": role["allowed_policies"]},
            )
    database = template(
        tmp_path, "db-check", "backend:\n  type: vault_database\n  role: no-such-role\n"
    )
    db_found = {r.key: r for r in backend.check(database.template)}
    assert db_found[("database_role", "no-such-role")].status == "missing"


@pytest.fixture
def aws_role(moto_server: Moto) -> Iterator[tuple[str, dict[str, object]]]:
    """A fresh role in moto and its IAM client; removed afterwards."""
    iam = boto3.client(
        "iam",
        endpoint_url=moto_server.endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",  # moto's dummy keys
    )
    name = f"broker-check-{secrets.token_hex(3)}"
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    arn = iam.create_role(
        RoleName=name, AssumeRolePolicyDocument=json.dumps(trust), MaxSessionDuration=3600
    )["Role"]["Arn"]
    yield arn, {"iam": iam, "name": name}
    iam.delete_role(RoleName=name)


@pytest.mark.integration
def test_aws_check_finds_missing_roles_and_incomplete_trust(
    tmp_path: Path, moto_server: Moto, aws_role: tuple[str, dict[str, object]]
) -> None:
    """A role that does not exist is MISSING; a role whose trust policy allows AssumeRole but not
    TagSession and SetSourceIdentity is MISSING with the exact statement to add (naming the
    broker's principal); once the trust allows all three, it is ok."""
    arn, info = aws_role
    backend = AwsStsBackend(AwsSettings(endpoint_url=moto_server.endpoint), cluster="check")
    gone = template(
        tmp_path,
        "aws-gone",
        "backend:\n  type: aws_sts\n  role_arn: arn:aws:iam::123456789012:role/not-there\n",
    )
    assert [r.status for r in backend.check(gone.template)] == ["missing", "missing"]
    here = template(tmp_path, "aws-here", f"backend:\n  type: aws_sts\n  role_arn: {arn}\n")
    found = {r.key: r for r in backend.check(here.template)}
    assert found[("iam_role", arn)].status == "ok"
    trust = found[("trust", arn)]
    assert trust.status == "missing"
    assert "sts:TagSession, sts:SetSourceIdentity" in (trust.found or "")
    assert '"sts:SetSourceIdentity"' in trust.fix and "arn:aws:iam::123456789012:" in trust.fix
    iam = info["iam"]
    iam.update_assume_role_policy(  # type: ignore[attr-defined]
        RoleName=info["name"],
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": {"AWS": "arn:aws:iam::123456789012:root"},
                        "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
                    }
                ],
            }
        ),
    )
    assert {r.status for r in backend.check(here.template)} == {"ok"}


def test_trust_verdicts() -> None:
    """An assumed-role caller is matched by its role; wildcards and account roots count; an
    explicit Deny wins; conditions are reported, not evaluated."""
    caller = "arn:aws:sts::123456789012:assumed-role/broker/session-1"
    assert principal_arn(caller) == "arn:aws:iam::123456789012:role/broker"
    everything = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::123456789012:role/broker"},
                "Action": "sts:*",
            }
        ]
    }
    assert trust_verdict(everything, caller).missing == []
    denied = {
        "Statement": [
            *everything["Statement"],
            {"Effect": "Deny", "Principal": "*", "Action": "sts:TagSession"},
        ]
    }
    assert trust_verdict(denied, caller).missing == ["sts:TagSession"]
    other = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "arn:aws:iam::999999999999:root"},
                "Action": "*",
            }
        ]
    }
    assert len(trust_verdict(other, caller).missing) == 3
    conditional = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": "123456789012"},
                "Action": ["sts:AssumeRole", "sts:TagSession", "sts:SetSourceIdentity"],
                "Condition": {"StringEquals": {"sts:ExternalId": "x"}},
            }
        ]
    }
    verdict = trust_verdict(json.dumps(conditional), caller)
    assert verdict.missing == [] and verdict.conditional
