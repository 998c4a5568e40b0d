"""Fixtures for token verification: a fresh issuer per test, a controllable clock, a verifier."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from broker.oidc.verifier import TokenVerifier
from broker.settings import IssuerConfig
from tests.oidc.tokens import FakeTime
from tests.support.issuer import TestIssuer


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def idp() -> Iterator[TestIssuer]:
    """A fresh issuer for this test only (its fetch counts start at zero)."""
    iss = TestIssuer().start()
    yield iss
    iss.stop()


@pytest.fixture
def other_idp() -> Iterator[TestIssuer]:
    """A second, independent issuer."""
    iss = TestIssuer().start()
    yield iss
    iss.stop()


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=5) as client:
        yield client


MakeVerifier = Callable[..., TokenVerifier]


@pytest.fixture
def make_verifier(fake_time: FakeTime, http: httpx.Client) -> MakeVerifier:
    """A verifier over the given issuer configurations, on the fake clocks."""

    def build(*configs: dict[str, Any]) -> TokenVerifier:
        return TokenVerifier(
            [IssuerConfig(**c) for c in configs],
            http,
            clock=fake_time.clock,
            monotonic=fake_time.monotonic,
            allow_http_loopback=True,
        )

    return build
