"""Shared fixtures: the real services start once per session; each test gets a fresh store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.settings import Settings
from broker.store.migrate import upgrade
from tests.support.github_contract import GitHubStandIn, NpmUnavailable, github_stand_in
from tests.support.issuer import TestIssuer
from tests.support.otlp import OtlpReceiver
from tests.support.services import (
    Moto,
    OpenBao,
    pg_available,
    pg_database,
    start_test_moto,
    start_test_openbao,
    stop_test_openbao,
)

REPO = Path(__file__).resolve().parent.parent
SCOPES = REPO / "scopes"


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    """A real OpenBao dev server, provisioned like `broker dev` does; when PostgreSQL answers,
    with the database secrets engine on a database of its own (``openbao.database``)."""
    bao = start_test_openbao(
        tmp_path_factory.mktemp("openbao"), with_database=pg_available() is None
    )
    yield bao
    stop_test_openbao(bao)


@pytest.fixture(scope="session")
def openbao_db(openbao: OpenBao, pg_admin_ok: None) -> OpenBao:
    """The ``openbao`` server, required to have its database secrets engine (PostgreSQL)."""
    if openbao.database is None:
        pytest.fail("OpenBao has no database engine although PostgreSQL answers")
    return openbao


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Moto]:
    """moto's standalone STS/IAM server, with the example scopes' roles; the broker's standard
    AWS credential chain finds moto's dummy keys in the environment."""
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = start_test_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.process.stop()


@pytest.fixture(scope="session")
def github_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHubStandIn]:
    """GitHub's API as its published OpenAPI description says it (prism validating every
    request); the npm packages are installed into a cache folder on first use."""
    try:
        with github_stand_in(tmp_path_factory.mktemp("github")) as stand_in:
            yield stand_in
    except NpmUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"the GitHub contract stand-in is required in CI: {exc}")
        pytest.skip(f"the GitHub contract stand-in is unavailable: {exc}")


@pytest.fixture(scope="session")
def issuer() -> Iterator[TestIssuer]:
    """A test OIDC issuer on a real socket."""
    iss = TestIssuer().start()
    yield iss
    iss.stop()


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    """An OTLP/HTTP receiver decoding protobuf from the wire."""
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def pg_admin_ok() -> None:
    reason = pg_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required in CI but unreachable: {reason}")
        pytest.skip(
            f"PostgreSQL not reachable ({reason}); start it or set BROKER_TEST_PG_URL to enable these tests"
        )


@pytest.fixture
def pg_url(pg_admin_ok: None) -> Iterator[str]:
    """A fresh PostgreSQL database for this test."""
    with pg_database() as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'broker.db'}"


@pytest.fixture
def make_settings(tmp_path: Path, issuer: TestIssuer) -> Any:
    """Build dev-mode settings for a test, with the test issuer trusted and a migrated store."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "dev_mode": True,
            "data_dir": tmp_path / "data",
            "scopes_dir": SCOPES,
            "issuers": [issuer.issuer_config()],
        }
        values.update(overrides)
        settings = Settings(**values)
        upgrade(settings.effective_database_url)
        return settings

    return build
