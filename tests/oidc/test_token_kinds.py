"""ID tokens and access tokens are not interchangeable: ``typ``, audiences, ``azp``/``client_id``.

The real verifier against a real issuer on a socket, as in the attack suite.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from broker.oidc.errors import TokenRefused
from broker.oidc.verifier import TokenKind, TokenVerifier
from broker.settings import IssuerConfig
from tests.oidc.conftest import MakeVerifier
from tests.oidc.tokens import FakeTime, claims_for, forge
from tests.support.issuer import TestIssuer, new_key

pytestmark = pytest.mark.integration

ACCESS = {"audiences": ["https://api.example"]}


def token(idp: TestIssuer, now: float, typ: Any = "JWT", **claims: Any) -> str:
    key = idp.keys[0]
    header: dict[str, Any] = {"alg": key.alg, "kid": key.kid}
    if typ is not ...:
        header["typ"] = typ
    return forge(header, claims_for(idp, now, **claims), key=key)


def refused(verifier: TokenVerifier, jwt: str, reason: str, kind: TokenKind = "id_token") -> None:
    with pytest.raises(TokenRefused) as info:
        verifier.verify(jwt, kind)
    assert info.value.code == reason, info.value.internal


@pytest.mark.parametrize("typ", ["at+jwt", "AT+JWT", "application/at+jwt", " at+JWT "])
def test_an_access_token_is_refused_as_an_id_token(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, typ: str
) -> None:
    """A JWT whose typ says access token (RFC 9068, any spelling of the media type) is refused
    when presented as an ID token, even when everything else about it is valid and its issuer
    accepts access tokens: the kinds never mix."""
    verifier = make_verifier(idp.issuer_config(access_tokens=ACCESS))
    refused(verifier, token(idp, fake_time.wall, typ), "wrong_token_type")


@pytest.mark.parametrize("typ", ["logout+jwt", "secevent+jwt", "dpop+jwt", "JOSE"])
def test_other_explicitly_typed_tokens_are_no_id_tokens(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, typ: str
) -> None:
    """Explicit typing (RFC 8725 3.11) works both ways: a logout token or security event token
    signed by the issuer is not an ID token either."""
    refused(make_verifier(idp.issuer_config()), token(idp, fake_time.wall, typ), "wrong_token_type")


@pytest.mark.parametrize("typ", [..., "JWT", "jwt", "application/jwt"])
def test_untyped_or_jwt_typed_id_tokens_pass(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, typ: Any
) -> None:
    """What real issuers put in an ID token's header (nothing, or JWT) is accepted."""
    verified = make_verifier(idp.issuer_config()).verify(token(idp, fake_time.wall, typ))
    assert verified.kind == "id_token"


def test_a_non_string_typ_is_malformed(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """typ must be a short string."""
    verifier = make_verifier(idp.issuer_config())
    refused(verifier, token(idp, fake_time.wall, ["JWT"]), "malformed_token")
    refused(verifier, token(idp, fake_time.wall, "x" * 65), "malformed_token")


def test_access_tokens_need_the_issuer_to_accept_them(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Without access_tokens in its configuration, no token of the issuer passes as an access
    token, whatever its typ or audience; nothing is fetched for it."""
    verifier = make_verifier(idp.issuer_config())
    for typ in ("at+jwt", "JWT"):
        refused(
            verifier,
            token(idp, fake_time.wall, typ, aud="https://api.example"),
            "access_token_not_accepted",
            "access_token",
        )
    assert idp.fetches == {}


def test_access_tokens_have_their_own_audiences(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """An access token is accepted with the access-token audiences only; an ID token for this
    broker presented as an access token fails on typ, and on its audience once typ is not
    required."""
    verifier = make_verifier(idp.issuer_config(access_tokens=ACCESS))
    at = token(idp, fake_time.wall, "at+jwt", aud="https://api.example")
    verified = verifier.verify(at, "access_token")
    assert (verified.kind, verified.principal.subject) == ("access_token", "agent-1")
    refused(verifier, token(idp, fake_time.wall, "at+jwt"), "audience_mismatch", "access_token")
    refused(verifier, token(idp, fake_time.wall, "JWT"), "wrong_token_type", "access_token")
    loose = make_verifier(idp.issuer_config(access_tokens={**ACCESS, "require_typ": False}))
    refused(loose, token(idp, fake_time.wall, "JWT"), "audience_mismatch", "access_token")
    untyped_at = token(idp, fake_time.wall, ..., aud="https://api.example")
    assert loose.verify(untyped_at, "access_token").kind == "access_token"
    refused(loose, token(idp, fake_time.wall, "logout+jwt"), "wrong_token_type", "access_token")


def test_access_token_clients(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """With clients named, an access token's client_id (or azp) must be one of them and must
    be present."""
    verifier = make_verifier(idp.issuer_config(access_tokens={**ACCESS, "clients": ["ci-app"]}))

    def at(**claims: Any) -> str:
        return token(idp, fake_time.wall, "at+jwt", aud="https://api.example", **claims)

    assert verifier.verify(at(client_id="ci-app"), "access_token")
    assert verifier.verify(at(azp="ci-app"), "access_token")
    refused(verifier, at(client_id="other"), "unauthorized_party", "access_token")
    refused(verifier, at(), "missing_claim", "access_token")
    refused(verifier, at(client_id=7), "invalid_claim", "access_token")


def test_azp_is_checked_when_the_configuration_names_clients(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """An ID token's azp must be one of authorized_parties when it has one; without azp the
    audience decides; without authorized_parties azp is not looked at."""
    strict = make_verifier(idp.issuer_config(authorized_parties=["broker-cli"]))
    assert strict.verify(token(idp, fake_time.wall, azp="broker-cli"))
    assert strict.verify(token(idp, fake_time.wall))
    refused(strict, token(idp, fake_time.wall, azp="someone-else"), "unauthorized_party")
    refused(strict, token(idp, fake_time.wall, azp=["broker-cli"]), "invalid_claim")
    lax = make_verifier(idp.issuer_config())
    assert lax.verify(token(idp, fake_time.wall, azp="someone-else"))


def test_overlapping_audiences_refuse_to_load(idp: TestIssuer) -> None:
    """An audience shared by ID tokens and access tokens would let one pass as the other: the
    configuration is refused, naming the audience."""
    with pytest.raises(ValidationError, match="also ID token audiences"):
        IssuerConfig(**idp.issuer_config(access_tokens={"audiences": ["broker", "x"]}))


def test_at_most_two_signature_checks_per_token(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """However many published keys share a kid, a token costs at most two signature checks: a
    token signed by the third key of that kid is refused, one by the first verifies."""
    kid = idp.keys[0].kid
    extra = [new_key(kid) for _ in range(3)]
    idp.extra_jwks = [k.jwk() for k in extra]
    verifier = make_verifier(idp.issuer_config())
    claims = claims_for(idp, fake_time.wall)
    assert verifier.verify(forge({"alg": "ES256", "kid": kid}, claims, key=idp.keys[0]))
    refused(
        verifier, forge({"alg": "ES256", "kid": kid}, claims, key=extra[1]), "invalid_signature"
    )
