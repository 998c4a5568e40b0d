"""Every backend, and the test double, keep the same contract (run against the real services)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from broker.backends.aws_sts import AwsStsBackend
from broker.backends.base import Backend, Inventory, RevokeRef
from broker.backends.broker_jwt import BrokerJwtBackend
from broker.backends.vault import VaultBackend
from broker.domain.scope import AwsStsBackend as AwsSpec
from broker.domain.scope import BrokerJwtBackend as JwtSpec
from broker.domain.scope import VaultDatabaseBackend, VaultTokenBackend
from broker.errors import InvalidRequest, ServiceUnavailable
from broker.keyring import KeyRing
from broker.settings import AwsSettings
from tests.backends.fakes import FakeBackend
from tests.backends.github_helpers import github_backend
from tests.backends.github_helpers import spec as github_spec
from tests.backends.helpers import mint_request, planned
from tests.support.github_contract import GitHubStandIn
from tests.support.services import Moto, OpenBao

pytestmark = pytest.mark.integration

VAULT_SPEC = VaultTokenBackend(type="vault_token", policies=["kv-read"])
Case = tuple[Backend, Any, Any]  # backend, a spec it mints, a spec it refuses


@pytest.fixture(params=["fake", "vault", "broker_jwt", "aws_sts", "github"])
def case(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    openbao: OpenBao,
    moto_server: Moto,
    github_api: GitHubStandIn,
) -> Case:
    cluster = "c" + secrets.token_hex(4)
    jwt_spec = JwtSpec(type="broker_jwt", audience="svc")
    aws_spec = AwsSpec(type="aws_sts", role_arn="arn:aws:iam::123456789012:role/broker-s3-read")
    builders: dict[str, Callable[[], Case]] = {
        "fake": lambda: (FakeBackend(), VAULT_SPEC, jwt_spec),
        "vault": lambda: (
            VaultBackend(openbao.vault_settings(), cluster=cluster),
            VAULT_SPEC,
            jwt_spec,
        ),
        "broker_jwt": lambda: (
            BrokerJwtBackend(KeyRing(keys_dir=tmp_path / "keys"), "http://broker.test"),
            jwt_spec,
            VAULT_SPEC,
        ),
        "aws_sts": lambda: (
            AwsStsBackend(AwsSettings(endpoint_url=moto_server.endpoint), cluster=cluster),
            aws_spec,
            VaultDatabaseBackend(type="vault_database", role="readonly"),
        ),
        "github": lambda: (github_backend(github_api.url, tmp_path), github_spec(), VAULT_SPEC),
    }
    return builders[request.param]()


def test_it_is_a_backend_with_a_json_plan(case: Case) -> None:
    """The Protocol holds; the plan is plain JSON (it is stored with the intent); a spec of
    another backend is refused by the plan, before anything is recorded."""
    backend, spec, foreign = case
    assert isinstance(backend, Backend)
    assert backend.revocation in ("revoke", "deny_list", "record")
    request = mint_request(spec, cluster=getattr(backend, "cluster", "test"))
    plan = backend.plan(request)
    assert json.loads(json.dumps(plan)) == plan
    with pytest.raises(InvalidRequest):
        backend.plan(mint_request(foreign))
    backend.health()
    assert backend.describe()["kinds"]


def test_mint_keeps_the_secret_out_of_repr_and_within_the_ttl(case: Case) -> None:
    """What mint returns never prints its secret, and expires within the requested TTL, except
    where the backend's own lifetime is fixed (a GitHub token lives its hour; the task still
    ends at its TTL and revokes it then, see tests/api/test_github_examples.py)."""
    backend, spec, _ = case
    request = planned(
        backend, mint_request(spec, ttl=900, cluster=getattr(backend, "cluster", "test"))
    )
    minted = backend.mint(request)
    assert minted.handle
    lifetime = 3600 + 300 if backend.name == "github" else 900
    assert minted.expires_at <= time.time() + lifetime + 5
    for value in minted.secret.values():
        if value != minted.handle:  # an access key id is a handle, not a secret
            assert value not in repr(minted)
    assert set(minted.secret.values()) <= set(minted.env.values()) or minted.kind == "aws_sts"


def test_revocation_is_idempotent_or_honestly_refused(case: Case) -> None:
    """Revoking twice succeeds; a backend that cannot revoke says so (deny_list)."""
    backend, spec, _ = case
    cluster = getattr(backend, "cluster", "test")
    request = planned(backend, mint_request(spec, cluster=cluster))
    minted = backend.mint(request)
    ref = RevokeRef(
        request.credential_id,
        request.task_id,
        minted.kind,
        minted.handle,
        minted.details,
        sealed=minted.sealed,
    )
    if backend.revocation == "deny_list":
        with pytest.raises(ServiceUnavailable) as refused:
            backend.revoke(ref)
        assert refused.value.code == "not_revocable"
        return
    backend.revoke(ref)
    backend.revoke(ref)
    if isinstance(backend, Inventory):
        assert request.credential_id not in {o.credential_id for o in backend.inventory(cluster)}


def test_inventory_finds_what_was_minted_and_a_handle_less_revoke_removes_it(case: Case) -> None:
    """For backends with an inventory: the orphan scan sees the credential by its id, and a
    revocation that knows only the id (a lost answer) removes it."""
    backend, spec, _ = case
    if not isinstance(backend, Inventory):
        pytest.skip(f"{backend.name} keeps no inventory")
    cluster = getattr(backend, "cluster", "test")
    request = planned(backend, mint_request(spec, cluster=cluster))
    backend.mint(request)
    assert request.credential_id in {o.credential_id for o in backend.inventory(cluster)}
    backend.revoke(RevokeRef(request.credential_id, request.task_id, "vault_token", None))
    assert request.credential_id not in {o.credential_id for o in backend.inventory(cluster)}
