"""The attack suite: hostile tokens and hostile conditions the verifier must refuse, and how.

Every test runs the real verifier against a real issuer on a socket (JWKS and discovery over
HTTP, fetches counted per path), with the clock under the test's control. Each refusal must be a
``TokenRefused`` with its stable reason - never any other exception - and, where it matters, the
test proves what was (not) fetched.
"""

from __future__ import annotations

import json
import threading
import tracemalloc
import uuid
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from broker.oidc.errors import IssuerUnavailable, TokenRefused
from broker.oidc.verifier import TokenVerifier
from tests.oidc.conftest import MakeVerifier
from tests.oidc.tokens import FakeTime, b64, claims_for, forge
from tests.support.issuer import TestIssuer, new_key

pytestmark = pytest.mark.integration


def refused(verifier: TokenVerifier, token: str, reason: str) -> TokenRefused:
    with pytest.raises(TokenRefused) as info:
        verifier.verify(token)
    assert info.value.code == reason, info.value.internal
    if len(token) > 16:  # the token never appears in what the refusal says
        assert token not in str(info.value)
        assert token not in (info.value.internal or "")
    return info.value


def good(idp: TestIssuer, now: float, **claims: Any) -> str:
    key = idp.keys[0]
    return forge(
        {"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims_for(idp, now, **claims), key=key
    )


@pytest.fixture
def verifier(idp: TestIssuer, make_verifier: MakeVerifier) -> TokenVerifier:
    return make_verifier(idp.issuer_config())


def test_a_valid_token_passes(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """The baseline every attack below deviates from: a proper token verifies."""
    verified = verifier.verify(good(idp, fake_time.wall))
    assert verified.principal.key == (idp.url, "agent-1")


# --- algorithms --------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_is_refused_without_fetching(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, alg: str
) -> None:
    """An unsigned token (any spelling of none) is refused before any key is fetched."""
    token = forge({"alg": alg, "kid": idp.keys[0].kid}, claims_for(idp, fake_time.wall))
    refused(verifier, token, "algorithm_not_allowed")
    assert idp.fetches == {}


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_hmac_signed_with_the_issuers_public_key_is_refused(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, alg: str
) -> None:
    """Algorithm confusion: an HMAC over the token keyed with the issuer's public key (as PEM and
    as its JWK text) is refused on its algorithm, and no key is fetched for it."""
    public = idp.keys[0].private.public_key()
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (pem, json.dumps(idp.keys[0].jwk()).encode()):
        token = forge(
            {"alg": alg, "kid": idp.keys[0].kid},
            claims_for(idp, fake_time.wall),
            alg=alg,
            secret=secret,
        )
        refused(verifier, token, "algorithm_not_allowed")
    assert idp.fetches == {}


def test_an_algorithm_the_key_does_not_fit_is_refused(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A token claiming ES384 (allowed for the issuer) while the kid names a P-256 ES256 key
    finds no fitting key: the key's type and curve bind the algorithm."""
    verifier = make_verifier(idp.issuer_config(algorithms=["ES256", "ES384"]))
    key = idp.keys[0]
    attacker = new_key(key.kid, alg="ES384")
    token = forge({"alg": "ES384", "kid": key.kid}, claims_for(idp, fake_time.wall), key=attacker)
    refused(verifier, token, "unknown_key")


# --- keys: kid, jku, x5u, jwk --------------------------------------------------------------


def test_forged_kid_with_a_foreign_signature_is_refused(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """The issuer's real kid on a token signed by an attacker's key: bad signature."""
    attacker = new_key(idp.keys[0].kid)
    token = forge(
        {"alg": "ES256", "kid": idp.keys[0].kid}, claims_for(idp, fake_time.wall), key=attacker
    )
    refused(verifier, token, "invalid_signature")


@pytest.mark.parametrize("kid", ["nope", "../../../etc/passwd", "' OR 1=1 --", "k" * 256])
def test_unknown_kid_is_refused_after_one_refetch(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, kid: str
) -> None:
    """An unknown kid costs the issuer one refetch (after the first fetch) and is refused."""
    verifier.verify(good(idp, fake_time.wall))
    attacker = new_key(kid)
    token = forge({"alg": "ES256", "kid": kid}, claims_for(idp, fake_time.wall), key=attacker)
    refused(verifier, token, "unknown_key")
    assert idp.fetch_count("/jwks") == 2


def test_oversized_or_non_string_kid_is_malformed(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """A kid that is not a short string is refused before any lookup."""
    for kid in ["k" * 257, 7, ["a"], ""]:
        token = forge(
            {"alg": "ES256", "kid": kid}, claims_for(idp, fake_time.wall), key=idp.keys[0]
        )
        refused(verifier, token, "malformed_token")
    assert idp.fetches == {}


@pytest.mark.parametrize("member", ["jku", "x5u"])
def test_key_url_headers_are_never_fetched(
    idp: TestIssuer,
    other_idp: TestIssuer,
    verifier: TokenVerifier,
    fake_time: FakeTime,
    member: str,
) -> None:
    """A token signed with the attacker's key, pointing jku/x5u at the attacker's key server:
    refused, and the attacker's server never hears from the broker."""
    attacker = other_idp.keys[0]
    token = forge(
        {"alg": "ES256", "kid": attacker.kid, member: f"{other_idp.url}/jwks"},
        claims_for(idp, fake_time.wall),
        key=attacker,
    )
    refused(verifier, token, "unknown_key")
    assert other_idp.fetches == {}
    # Even with the issuer's own kid, the attacker's URL is not consulted.
    token = forge(
        {"alg": "ES256", "kid": idp.keys[0].kid, member: f"{other_idp.url}/jwks"},
        claims_for(idp, fake_time.wall),
        key=attacker,
    )
    refused(verifier, token, "invalid_signature")
    assert other_idp.fetches == {}


def test_embedded_jwk_header_is_ignored(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """A token carrying its own public key (jwk header, also as x5c) does not get to use it."""
    attacker = new_key()
    for kid in (attacker.kid, idp.keys[0].kid):
        token = forge(
            {"alg": "ES256", "kid": kid, "jwk": attacker.jwk(), "x5c": ["MIIB"]},
            claims_for(idp, fake_time.wall),
            key=attacker,
        )
        with pytest.raises(TokenRefused) as info:
            verifier.verify(token)
        assert info.value.code in {"unknown_key", "invalid_signature"}


@pytest.mark.parametrize("crit", [["exp"], ["b64"], ["urn:example:unknown"], "b64", []])
def test_unknown_crit_is_refused(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, crit: Any
) -> None:
    """A critical header extension the broker does not implement refuses the token, validly signed."""
    key = idp.keys[0]
    token = forge(
        {"alg": "ES256", "kid": key.kid, "crit": crit, "b64": True, "exp": 1},
        claims_for(idp, fake_time.wall),
        key=key,
    )
    refused(verifier, token, "unsupported_critical_header")


def test_signature_with_another_trusted_issuers_key(
    idp: TestIssuer, other_idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Both issuers are trusted; a token naming one but signed with the other's key is refused,
    whether it names the other's kid (absent from its own issuer's keys) or its own."""
    verifier = make_verifier(idp.issuer_config(), other_idp.issuer_config(name="other"))
    theirs = other_idp.keys[0]
    claims = claims_for(idp, fake_time.wall)
    refused(verifier, forge({"alg": "ES256", "kid": theirs.kid}, claims, key=theirs), "unknown_key")
    refused(
        verifier,
        forge({"alg": "ES256", "kid": idp.keys[0].kid}, claims, key=theirs),
        "invalid_signature",
    )
    assert other_idp.fetches == {}  # the other issuer's keys were never consulted for it


# --- time -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -30 + 1}, None),  # just inside the leeway
        ({"exp": -30}, "token_expired"),  # just outside
        ({"nbf": 30}, None),
        ({"nbf": 31}, "token_not_yet_valid"),
        ({"iat": 30, "nbf": ...}, None),
        ({"iat": 31, "nbf": ...}, "token_not_yet_valid"),
    ],
)
def test_time_claims_at_the_edges_of_the_leeway(
    idp: TestIssuer,
    verifier: TokenVerifier,
    fake_time: FakeTime,
    claims: dict[str, Any],
    reason: str | None,
) -> None:
    """exp, nbf and iat exactly one second inside and outside the 30 s leeway."""
    now = fake_time.wall
    shifted = {k: (v if v is ... else int(now) + v) for k, v in claims.items()}
    if "exp" in shifted and shifted["exp"] is not ...:
        shifted.setdefault("iat", int(now) - 600)
        shifted.setdefault("nbf", int(now) - 600)
    token = good(idp, now, **shifted)
    if reason is None:
        verifier.verify(token)
    else:
        refused(verifier, token, reason)


@pytest.mark.parametrize(
    "exp",
    ["9999999999", True, None, [], {}, -1, 10**30, 10**400, 1e308, 0.5],
)
def test_non_numeric_and_huge_exp(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, exp: Any
) -> None:
    """exp must be a sane number: strings, booleans, null, containers, negative, absurdly far
    (10**400 does not fit a float) and long past values are all refused with a reason."""
    with pytest.raises(TokenRefused) as info:
        verifier.verify(good(idp, fake_time.wall, exp=exp))
    assert info.value.code in {
        "invalid_claim",
        "missing_claim",
        "token_lifetime_too_long",
        "token_expired",
    }


@pytest.mark.parametrize("raw_exp", ["1e400", "-1e400", "NaN", "Infinity", "1" * 5000, "1.0e99999"])
def test_raw_json_numbers_that_break_parsers(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, raw_exp: str
) -> None:
    """Numbers that parse to inf/NaN or exceed int conversion limits are refused, never a crash."""
    claims = claims_for(idp, fake_time.wall)
    body = json.dumps(claims).replace(f'"exp": {claims["exp"]}', f'"exp": {raw_exp}')
    key = idp.keys[0]
    token = forge({"alg": "ES256", "kid": key.kid}, body, key=key)
    with pytest.raises(TokenRefused) as info:
        verifier.verify(token)
    assert info.value.code in {"malformed_token", "invalid_claim", "token_expired"}


def test_token_age_and_lifetime_caps(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """max_token_age refuses a token issued too long ago; max_token_lifetime one valid for too long."""
    verifier = make_verifier(idp.issuer_config(max_token_age=300, max_token_lifetime=3600))
    now = int(fake_time.wall)
    verifier.verify(good(idp, now, iat=now - 300 - 30, nbf=...))
    refused(verifier, good(idp, now, iat=now - 300 - 31, nbf=...), "token_too_old")
    verifier.verify(good(idp, now, exp=now + 3600))
    refused(verifier, good(idp, now, exp=now + 3601), "token_lifetime_too_long")


# --- audiences and issuers -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("aud", "reason"),
    [
        (..., "missing_claim"),
        ("other", "audience_mismatch"),
        (["broker", "other"], "audience_mismatch"),
        ([], "invalid_claim"),
        ([1], "invalid_claim"),
        ({"a": "broker"}, "invalid_claim"),
        ("Broker", "audience_mismatch"),
        (["broker"], None),
        ("broker", None),
    ],
)
def test_audiences(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, aud: Any, reason: str | None
) -> None:
    """aud must be present, name this broker, and name nothing else (no extra audiences)."""
    token = good(idp, fake_time.wall, aud=aud)
    if reason is None:
        verifier.verify(token)
    else:
        refused(verifier, token, reason)


def issuer_variants(url: str) -> list[str]:
    scheme, rest = url.split("://")
    return [
        url + "/",
        url + "x",
        url + "/evil",
        url[:-1],
        url.upper(),
        f"{scheme.upper()}://{rest}",
        " " + url,
        url + " ",
        url.replace("127.0.0.1", "localhost"),
        url + "?",
        url + "#",
        f"{scheme}://user@{rest}",
    ]


def test_issuer_variants_are_unknown_and_fetch_nothing(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """Prefix, suffix, trailing-slash, case, whitespace and host-spelling variants of a trusted
    issuer, each validly signed by its key: refused as unknown issuers, and nothing is fetched."""
    key = idp.keys[0]
    for variant in issuer_variants(idp.url):
        token = forge(
            {"alg": "ES256", "kid": key.kid},
            claims_for(idp, fake_time.wall, iss=variant),
            key=key,
        )
        error = refused(verifier, token, "unknown_issuer")
        assert error.issuer is None  # no configured issuer is credited with it
    assert idp.fetches == {}


def test_a_configured_trailing_slash_is_exact_too(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """An issuer configured with a trailing slash accepts exactly that spelling."""
    idp.discovery = {"issuer": idp.url + "/"}
    verifier = make_verifier(idp.issuer_config(issuer=idp.url + "/"))
    refused(verifier, good(idp, fake_time.wall), "unknown_issuer")
    verifier.verify(good(idp, fake_time.wall, iss=idp.url + "/"))


def test_unknown_issuer_fetches_nothing_anywhere(
    idp: TestIssuer, other_idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """A well-formed token of an issuer that is not configured (a real, reachable one) is refused
    without a single request to it - nor to the trusted issuer."""
    token = other_idp.token()
    refused(verifier, token, "unknown_issuer")
    assert other_idp.fetches == {}
    assert idp.fetches == {}


@pytest.mark.parametrize("iss", [None, 7, ["x"], {"a": 1}, ""])
def test_missing_or_non_string_issuer(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime, iss: Any
) -> None:
    """A token without a usable iss is an unknown issuer."""
    refused(verifier, good(idp, fake_time.wall, iss=iss), "unknown_issuer")


# --- shape, size, nesting, duplicates -------------------------------------------------------


MALFORMED = [
    "",
    "a",
    "a.b",
    "a.b.c",
    "...",
    "a.b.c.d",
    "a.b.c.d.e",  # JWE compact form
    "eyJhbGciOiJFUzI1NiJ9.e30",
    "eyJhbGciOiJFUzI1NiJ9=.e30.",  # padding
    "eyJhbGciOiJFUzI1NiJ9.e31.",  # non-canonical base64url (e30 is {})
    b64("[]") + "." + b64("{}") + ".",
    b64('{"alg":"ES256"}') + "." + b64("[1,2]") + ".",
    b64('{"alg":"ES256"}') + "." + b64("null") + ".",
    b64('{"alg":"ES256"}') + "." + b64(b"\xff\xfe") + ".",
    b64('{"alg":"ES256"}') + "." + b64('{"sub":"\\u0000"}') + ".",
    b64('{"alg":"ES256"}') + "." + b64('{"sub":"\\ud800"}') + ".",
    b64('{"alg":"ES256"}') + "." + b64("{") + ".",
    "é.é.é",
    "eyJ hbGc.e30.",
]


@pytest.mark.parametrize("token", MALFORMED)
def test_malformed_tokens(idp: TestIssuer, verifier: TokenVerifier, token: str) -> None:
    """Anything that is not a canonical three-part JWS of JSON objects is malformed."""
    refused(verifier, token, "malformed_token")
    assert idp.fetches == {}


def test_duplicate_json_members_are_refused(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """Duplicate members mean different things to different parsers: refused in the payload
    (a second sub) and in the header (a second alg), though validly signed."""
    key = idp.keys[0]
    claims = claims_for(idp, fake_time.wall)
    body = json.dumps(claims)[:-1] + ', "sub": "admin"}'
    refused(verifier, forge({"alg": "ES256", "kid": key.kid}, body, key=key), "malformed_token")
    header = '{"alg": "none", "alg": "ES256", "kid": "' + key.kid + '"}'
    refused(verifier, forge(header, claims, key=key), "malformed_token")
    nested = json.dumps({**claims, "x": {"a": 1}}).replace('{"a": 1}', '{"a": 1, "a": 2}')
    refused(verifier, forge({"alg": "ES256", "kid": key.kid}, nested, key=key), "malformed_token")


def test_deeply_nested_and_oversized_tokens_in_bounded_memory(
    idp: TestIssuer, verifier: TokenVerifier
) -> None:
    """Deep nesting is refused before the JSON parser recurses; an oversized token is refused
    before it is decoded at all: peak memory stays a small fraction of a 10 MB token."""
    head = b64('{"alg":"ES256"}')
    deep_arrays = head + "." + b64("[" * 6000 + "]" * 6000) + ".AAAA"
    deep_objects = head + "." + b64('{"a":' * 2000 + "1" + "}" * 2000) + ".AAAA"
    deeper = head + "." + b64("[" * 20_000 + "]" * 20_000) + ".AAAA"
    huge = head + "." + "A" * 10_000_000 + ".AAAA"
    tracemalloc.start()
    try:
        for token, reason in [
            (deep_arrays, "malformed_token"),
            (deep_objects, "malformed_token"),
            (deeper, "token_too_large"),
            (huge, "token_too_large"),
        ]:
            tracemalloc.reset_peak()
            refused(verifier, token, reason)
            _, peak = tracemalloc.get_traced_memory()
            assert peak < 2_000_000, (reason, peak)
    finally:
        tracemalloc.stop()
    just_too_deep = head + "." + b64('{"a":' * 17 + "1" + "}" * 17) + ".AAAA"
    refused(verifier, just_too_deep, "malformed_token")
    assert idp.fetches == {}


# --- replay ------------------------------------------------------------------------------


def test_replayed_jti_is_refused(make_settings: Any, issuer: TestIssuer) -> None:
    """With one-time tokens on, the same ID token opens one session; the replay is refused
    (the cross-replica case on PostgreSQL is in tests/services/test_sessions_replay.py)."""
    from broker.wiring import build_broker

    broker = build_broker(make_settings(issuers=[issuer.issuer_config(require_jti=True)]))
    try:
        token = issuer.token("replayer")
        broker.sessions.exchange(token)
        with pytest.raises(TokenRefused) as info:
            broker.sessions.exchange(token)
        assert info.value.code == "token_replayed"
        assert info.value.subject == "replayer"
    finally:
        broker.stop()


# --- flooding and outages -------------------------------------------------------------------


def random_kid_token(idp: TestIssuer, now: float) -> str:
    attacker = new_key(uuid.uuid4().hex)
    return forge({"alg": "ES256", "kid": attacker.kid}, claims_for(idp, now), key=attacker)


def test_flood_of_random_kids_costs_one_fetch_per_cooldown(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """200 tokens with random kids cost the issuer one refetch per 5 s cooldown, not 200."""
    verifier.verify(good(idp, fake_time.wall))
    assert idp.fetch_count() == 1
    for round_ in range(3):
        for _ in range(200):
            refused(verifier, random_kid_token(idp, fake_time.wall), "unknown_key")
        assert idp.fetch_count() == 2 + round_
        fake_time.advance(5)
    assert idp.fetch_count("/.well-known/openid-configuration") == 1
    verifier.verify(good(idp, fake_time.wall))  # real tokens were never disturbed


def test_concurrent_flood_shares_one_refetch(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """32 threads presenting random kids at once share a single refetch."""
    verifier.verify(good(idp, fake_time.wall))
    tokens = [random_kid_token(idp, fake_time.wall) for _ in range(32)]
    barrier = threading.Barrier(len(tokens))
    outcomes: list[str] = []

    def attack(token: str) -> None:
        barrier.wait()
        try:
            verifier.verify(token)
            outcomes.append("accepted")
        except TokenRefused as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=attack, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == ["unknown_key"] * 32
    assert idp.fetch_count() == 2


def test_rotated_key_is_accepted_at_once_even_during_a_flood(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """A key the issuer has just rotated in is accepted on its first token - no 30 s wait - and
    within one cooldown even while an attacker keeps the refetch budget busy."""
    verifier.verify(good(idp, fake_time.wall))
    rotated = new_key()
    idp.keys.insert(0, rotated)
    verifier.verify(good(idp, fake_time.wall))  # first token with the new kid: accepted now
    assert idp.fetch_count() == 2

    # Next rotation lands while a flood has just spent the cooldown's refetch.
    fake_time.advance(5)
    refused(verifier, random_kid_token(idp, fake_time.wall), "unknown_key")
    idp.keys.insert(0, new_key())
    refused(verifier, good(idp, fake_time.wall), "unknown_key")
    fake_time.advance(5)
    verifier.verify(good(idp, fake_time.wall))


def test_issuer_down_serves_last_good_keys_for_a_bounded_time(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """While the issuer is down, cached keys keep working past their refresh time, up to
    jwks_max_stale; then the broker fails closed (503, never a 500); fetches stay bounded;
    when the issuer returns, tokens verify again."""
    verifier = make_verifier(
        idp.issuer_config(jwks_refresh=60, jwks_cooldown=5, jwks_max_stale=600)
    )
    verifier.verify(good(idp, fake_time.wall))
    idp.down = True
    fake_time.advance(61)  # stale: a refresh is tried (and fails), the old keys still serve
    verifier.verify(good(idp, fake_time.wall))
    for _ in range(50):  # no hammering: within the cooldown nothing more is fetched
        verifier.verify(good(idp, fake_time.wall))
    with pytest.raises(IssuerUnavailable):  # an unknown kid cannot be checked while it is down
        verifier.verify(random_kid_token(idp, fake_time.wall))
    # The first discovery and key fetch, then a single refresh attempt while down.
    assert sum(idp.fetches.values()) == 3
    fake_time.advance(600 - 61)
    with pytest.raises(IssuerUnavailable) as info:
        verifier.verify(good(idp, fake_time.wall))
    assert info.value.status == 503
    assert info.value.code == "issuer_unavailable"
    idp.down = False
    fake_time.advance(5)
    verifier.verify(good(idp, fake_time.wall))


def test_issuer_down_from_the_start_fails_closed(
    idp: TestIssuer, verifier: TokenVerifier, fake_time: FakeTime
) -> None:
    """With no keys ever fetched, an unreachable issuer means 503, and repeated tokens within
    the cooldown do not each cost a fetch."""
    idp.down = True
    for _ in range(20):
        with pytest.raises(IssuerUnavailable):
            verifier.verify(good(idp, fake_time.wall))
    assert idp.fetch_count("/.well-known/openid-configuration") == 1
