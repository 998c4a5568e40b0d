"""Discovery and key fetching hold against a hostile or broken issuer, and keys are chosen well.

All against a real issuer on a socket: oversized, compressed, redirected, trickling and lying
documents; key sets with unfit keys; refresh and withdrawal; keys from a configured URL or file.
"""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from broker.oidc.errors import IssuerUnavailable, TokenRefused
from broker.oidc.verifier import TokenVerifier
from tests.oidc.conftest import MakeVerifier
from tests.oidc.tokens import FakeTime, claims_for, forge
from tests.support.issuer import SigningKey, TestIssuer, new_key

pytestmark = pytest.mark.integration


def token(idp: TestIssuer, now: float, key: SigningKey | None = None, **claims: Any) -> str:
    key = key or idp.keys[0]
    return forge({"alg": key.alg, "kid": key.kid}, claims_for(idp, now, **claims), key=key)


def unavailable(verifier: TokenVerifier, tok: str) -> IssuerUnavailable:
    with pytest.raises(IssuerUnavailable) as info:
        verifier.verify(tok)
    assert info.value.status == 503
    return info.value


# --- hostile documents -----------------------------------------------------------------------


def test_oversized_key_set_is_refused(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A key set over the size cap is not read (announced length, or streamed without one)."""
    verifier = make_verifier(idp.issuer_config())
    big = json.dumps({"keys": [idp.keys[0].jwk()], "pad": "x" * 300_000}).encode()
    idp.responses["/jwks"] = (200, {"Content-Type": "application/json"}, big)
    error = unavailable(verifier, token(idp, fake_time.wall))
    assert "Content-Length" in (error.internal or "")

    def stream_without_length(handler: BaseHTTPRequestHandler) -> bool:
        if handler.path != "/jwks":
            return False
        handler.send_response(200)
        handler.end_headers()
        for _ in range(100):
            handler.wfile.write(b" " * 10_000)
        return True

    del idp.responses["/jwks"]
    idp.hook = stream_without_length
    fake_time.advance(5)
    error = unavailable(verifier, token(idp, fake_time.wall))
    assert "body over" in (error.internal or "")


def test_compressed_documents_are_refused(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A gzip body could inflate a thousandfold: any Content-Encoding is refused."""
    import gzip

    body = gzip.compress(json.dumps({"keys": [idp.keys[0].jwk()]}).encode())
    idp.responses["/jwks"] = (200, {"Content-Encoding": "gzip"}, body)
    verifier = make_verifier(idp.issuer_config())
    assert "Content-Encoding" in (unavailable(verifier, token(idp, fake_time.wall)).internal or "")


def test_redirects_are_not_followed(
    idp: TestIssuer, other_idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """A redirect from the key URL to anywhere else is a failure; the target is never asked."""
    other_idp.keys = idp.keys
    idp.responses["/jwks"] = (302, {"Location": f"{other_idp.url}/jwks"}, b"")
    verifier = make_verifier(idp.issuer_config())
    unavailable(verifier, token(idp, fake_time.wall))
    assert other_idp.fetches == {}


def test_a_trickling_issuer_hits_the_deadline(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """An issuer sending one byte at a time cannot hold a worker past the fetch deadline, even
    though each read returns well within the read timeout."""

    def trickle(handler: BaseHTTPRequestHandler) -> bool:
        if handler.path != "/jwks":
            return False
        handler.send_response(200)
        handler.end_headers()
        try:
            for _ in range(200):
                handler.wfile.write(b" ")
                handler.wfile.flush()
                time.sleep(0.05)
        except OSError:
            pass  # the broker hung up, as it should
        return True

    idp.hook = trickle
    verifier = make_verifier(idp.issuer_config(fetch_timeout=0.5))
    error = unavailable(verifier, token(idp, fake_time.wall))
    assert "no complete answer" in (error.internal or "")


def test_discovery_naming_another_issuer_is_refused(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """The discovery document must name exactly the configured issuer (here: a trailing slash
    more); its keys are then never fetched."""
    idp.discovery = {"issuer": idp.url + "/"}
    verifier = make_verifier(idp.issuer_config())
    assert "names issuer" in (unavailable(verifier, token(idp, fake_time.wall)).internal or "")
    assert idp.fetch_count("/jwks") == 0


@pytest.mark.parametrize(
    "jwks_uri",
    [
        "http://169.254.169.254/latest/meta-data/",
        "https://attacker.example/jwks",
        "file:///etc/passwd",
        "http://user:pw@127.0.0.1:1/jwks",
        "/jwks",
        7,
    ],
)
def test_discovery_cannot_send_the_broker_elsewhere(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, jwks_uri: Any
) -> None:
    """A jwks_uri off the issuer's origin, not https, with credentials, relative or not a
    string is refused: discovery is no SSRF vector."""
    idp.discovery = {"jwks_uri": jwks_uri}
    verifier = make_verifier(idp.issuer_config())
    unavailable(verifier, token(idp, fake_time.wall))
    assert idp.fetch_count("/jwks") == 0


def test_jwks_on_another_port_needs_jwks_hosts(
    idp: TestIssuer, other_idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Keys served from another origin are fetched only when jwks_hosts names it."""
    other_idp.keys = idp.keys
    idp.discovery = {"jwks_uri": f"{other_idp.url}/jwks"}
    verifier = make_verifier(idp.issuer_config())
    unavailable(verifier, token(idp, fake_time.wall))
    assert other_idp.fetches == {}
    host = other_idp.url.removeprefix("http://")
    verifier = make_verifier(idp.issuer_config(jwks_hosts=[host]))
    verifier.verify(token(idp, fake_time.wall))
    assert other_idp.fetch_count("/jwks") == 1


@pytest.mark.parametrize(
    "document",
    [
        b'{"keys": []',
        b'{"keys": [], "keys": []}',
        b'{"keys": {}}',
        b"[]",
        b'{"keys": [' + b",".join([b"{}"] * 65) + b"]}",
        b"<html>oops</html>",
    ],
)
def test_broken_key_sets_are_refused(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, document: bytes
) -> None:
    """A key set that is not strict JSON, repeats members, is not a key set or holds more than
    64 keys is an issuer failure (503), never a 500 and never an accepted token."""
    idp.responses["/jwks"] = (200, {"Content-Type": "application/json"}, document)
    verifier = make_verifier(idp.issuer_config())
    unavailable(verifier, token(idp, fake_time.wall))


# --- which keys ----------------------------------------------------------------------------


def test_unfit_keys_are_skipped_and_do_not_spoil_the_set(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Short RSA keys, keys with private members, encryption keys, keys without the verify
    operation, symmetric keys and unknown types are ignored; good keys keep working."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    short = SigningKey(
        "short", rsa.generate_private_key(public_exponent=65537, key_size=1024), "RS256"
    )
    private = json.loads(RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048)))
    enc, no_verify = new_key("enc"), new_key("noverify")
    idp.extra_jwks = [
        short.jwk(),
        {**private, "kid": "private"},
        {**enc.jwk(), "use": "enc"},
        {**no_verify.jwk(), "key_ops": ["sign"]},
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "XYZ", "kid": "weird"},
        "not a key",
    ]
    verifier = make_verifier(idp.issuer_config(algorithms=["ES256", "RS256"]))
    verifier.verify(token(idp, fake_time.wall))
    for key in (short, enc, no_verify):
        with pytest.raises(TokenRefused) as info:
            verifier.verify(token(idp, fake_time.wall, key=key))
        assert info.value.code == "unknown_key"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES384", "ES512", "EdDSA"])
def test_each_asymmetric_algorithm_verifies(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, alg: str
) -> None:
    """RSA (PKCS#1 and PSS), EC on its curve and EdDSA keys verify their own tokens."""
    idp.keys = [new_key(alg=alg)]
    verifier = make_verifier(idp.issuer_config(algorithms=[alg]))
    assert verifier.verify(token(idp, fake_time.wall)).principal.subject == "agent-1"


def test_a_token_without_kid_needs_a_single_fitting_key(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Without a kid the one fitting key is used; with two candidates the token is refused
    rather than trying every key."""
    verifier = make_verifier(idp.issuer_config())
    key = idp.keys[0]
    no_kid = forge({"alg": "ES256"}, claims_for(idp, fake_time.wall), key=key)
    verifier.verify(no_kid)
    idp.keys.append(new_key())
    verifier = make_verifier(idp.issuer_config())
    with pytest.raises(TokenRefused) as info:
        verifier.verify(no_kid)
    assert info.value.code == "unknown_key"


def test_withdrawn_keys_stop_working_after_refresh(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """Keys are refreshed every jwks_refresh seconds: a key the issuer withdraws (say, after a
    compromise) is refused from the next refresh on."""
    verifier = make_verifier(idp.issuer_config(jwks_refresh=60))
    old = idp.keys[0]
    verifier.verify(token(idp, fake_time.wall))
    idp.keys = [new_key()]
    fake_time.advance(30)
    verifier.verify(token(idp, fake_time.wall, key=old))  # still cached
    fake_time.advance(30)
    with pytest.raises(TokenRefused) as info:
        verifier.verify(token(idp, fake_time.wall, key=old))
    assert info.value.code == "unknown_key"
    verifier.verify(token(idp, fake_time.wall))


def test_configured_jwks_uri_skips_discovery(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime
) -> None:
    """With jwks_uri set, the discovery document is never fetched."""
    verifier = make_verifier(idp.issuer_config(jwks_uri=f"{idp.url}/jwks"))
    verifier.verify(token(idp, fake_time.wall))
    assert idp.fetches == {"/jwks": 1}


def test_keys_from_a_file_follow_rotation(
    idp: TestIssuer, make_verifier: MakeVerifier, fake_time: FakeTime, tmp_path: Path
) -> None:
    """jwks_file (for clusters whose discovery is private) is read like a URL: a rotated key
    written into the file is picked up at its first token, without restart."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [idp.keys[0].jwk()]}))
    verifier = make_verifier(idp.issuer_config(jwks_file=str(path)))
    verifier.verify(token(idp, fake_time.wall))
    rotated = new_key()
    path.write_text(json.dumps({"keys": [rotated.jwk(), idp.keys[0].jwk()]}))
    verifier.verify(token(idp, fake_time.wall, key=rotated))
    assert idp.fetches == {}
