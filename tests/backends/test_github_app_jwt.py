"""The GitHub App JWT against GitHub's documented rules ("Generating a JSON Web Token (JWT) for
a GitHub App"): RS256; ``iat`` 60 s in the past against clock drift; ``exp`` no more than 10
minutes into the future; ``iss`` the App's client id or App id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import pytest

from broker.backends.github_app import JWT_REFRESH_MARGIN, app_jwt, app_jwt_claims
from tests.backends.github_helpers import app_key, github_backend

NOW = 1_800_000_000.0


def github_accepts(claims: dict[str, Any], github_now: float) -> bool:
    """GitHub's documented rules, applied at GitHub's clock: issued, not expired, and ``exp`` at
    most 10 minutes ahead."""
    return claims["iat"] <= github_now < claims["exp"] <= github_now + 600


def test_claims_follow_the_documented_rules() -> None:
    """iat is 60 s before now, exp 9 minutes after (so exp - iat is exactly GitHub's 600 s
    ceiling), iss is the issuer as given; nothing else is claimed."""
    claims = app_jwt_claims("Iv23liAbCdEf", NOW)
    assert claims == {"iat": int(NOW) - 60, "exp": int(NOW) + 540, "iss": "Iv23liAbCdEf"}
    assert claims["exp"] - claims["iat"] <= 600
    assert claims["exp"] - NOW <= 600


@pytest.mark.parametrize("drift", [-60, -30, 0, 30, 59])
def test_github_accepts_it_within_a_minute_of_drift(drift: float) -> None:
    """With GitHub's clock up to 60 s behind or 59 s ahead of the broker's, the token is valid
    at GitHub the moment it is sent (the skew margin is what makes the behind case work)."""
    assert github_accepts(app_jwt_claims("1", NOW), NOW + drift)


def test_more_drift_than_the_margin_is_refused_by_the_rules() -> None:
    """The margin is real, not infinite: GitHub's clock 61 s behind sees an iat in its future;
    a token older than its 9 minutes is expired."""
    claims = app_jwt_claims("1", NOW)
    assert not github_accepts(claims, NOW - 61)
    assert not github_accepts(claims, NOW + 540)


def test_the_token_is_rs256_signed_by_the_app_key(tmp_path: Path) -> None:
    """Header alg RS256 and typ JWT; the signature verifies with the App's public key (what
    GitHub holds) and the claims decode as built."""
    _, key = app_key(tmp_path)
    token = app_jwt(key, "12345", NOW)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "typ": "JWT"}
    claims = jwt.decode(
        token,
        key.public_key(),
        algorithms=["RS256"],
        options={"verify_exp": False, "verify_iat": False},
    )
    assert claims == app_jwt_claims("12345", NOW)


@pytest.mark.parametrize(
    ("settings", "iss"), [({"app_id": 12345}, "12345"), ({"client_id": "Iv1.abc123"}, "Iv1.abc123")]
)
def test_the_issuer_is_the_client_id_or_the_app_id(
    tmp_path: Path, settings: dict[str, Any], iss: str
) -> None:
    """GitHub accepts the client id (recommended) or the App id as iss; the backend sends
    whichever is configured."""
    clock = [NOW]
    values = {"app_id": None, **settings}
    backend = github_backend("http://127.0.0.1:9", tmp_path, clock=lambda: clock[0], **values)
    token = backend.app_token()
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == iss


def test_a_cached_token_is_replaced_before_it_expires(tmp_path: Path) -> None:
    """The backend reuses its app JWT while more than two minutes of it remain, then signs a new
    one: a request never carries a JWT about to expire."""
    clock = [NOW]
    backend = github_backend("http://127.0.0.1:9", tmp_path, clock=lambda: clock[0])
    first = backend.app_token()
    clock[0] = NOW + 540 - JWT_REFRESH_MARGIN - 1
    assert backend.app_token() == first
    clock[0] = NOW + 540 - JWT_REFRESH_MARGIN + 1
    second = backend.app_token()
    assert second != first
    assert jwt.decode(second, options={"verify_signature": False})["iat"] == int(clock[0]) - 60
