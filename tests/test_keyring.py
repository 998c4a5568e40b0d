"""The broker's rotating signing key: signatures, rotation, operator keys, keys shared by replicas."""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

import broker.keyring as keyring_module
from broker.keyring import KeyRing, PublishedKeys, public_key_from_jwk
from broker.store import Database
from tests.api.flows import Clock


@pytest.fixture(autouse=True)
def no_check_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyring_module, "CHECK_INTERVAL", 0.0)
    monkeypatch.setattr(keyring_module, "JWKS_CACHE_SECONDS", 0.0)


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256"])
def test_sign_and_verify(tmp_path: Path, algorithm: str) -> None:
    """A signature verifies for its data and key only; unknown keys and garbage fail closed."""
    ring = KeyRing(keys_dir=tmp_path / "keys", algorithm=algorithm)
    signed = ring.sign(b"checkpoint 42")
    assert ring.verify(signed.key_id, b"checkpoint 42", signed.signature)
    assert not ring.verify(signed.key_id, b"checkpoint 43", signed.signature)
    assert not ring.verify("0" * 16, b"checkpoint 42", signed.signature)
    assert not ring.verify(signed.key_id, b"checkpoint 42", "not-base64!")
    assert not ring.verify(signed.key_id, b"checkpoint 42", "")
    [jwk] = ring.jwks()["keys"]
    assert jwk["kid"] == signed.key_id and jwk["alg"] == algorithm and jwk["use"] == "sig"
    assert "d" not in jwk  # never the private part


def test_private_keys_are_files_only_their_owner_reads(tmp_path: Path) -> None:
    """The key directory is 0700 and each key file 0600."""
    ring = KeyRing(keys_dir=tmp_path / "keys")
    ring.current()
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    [key_file] = list((tmp_path / "keys").glob("*.pem"))
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_rotation_publishes_the_next_key_before_it_signs(tmp_path: Path) -> None:
    """The successor appears in the JWKS ``lead`` seconds early; at the term it signs; the old
    private key is deleted but its public key keeps verifying what it signed, and leaves the
    JWKS only after the verify window."""
    clock = Clock()
    ring = KeyRing(keys_dir=tmp_path / "keys", rotation=3600, verify_window=600, clock=clock)
    first = ring.current()
    old_signature = ring.sign(b"old")
    assert [k["kid"] for k in ring.jwks()["keys"]] == [first.kid]
    clock.advance(3600 - ring.lead + 1)
    assert ring.current().kid == first.kid  # still signing
    assert len(ring.jwks()["keys"]) == 2  # the successor is already published
    clock.advance(ring.lead)
    second = ring.current()
    assert second.kid != first.kid
    assert len(list((tmp_path / "keys").glob("*.pem"))) == 1  # the retired private key is gone
    assert ring.verify(old_signature.key_id, b"old", old_signature.signature)
    assert first.kid in {k["kid"] for k in ring.jwks()["keys"]}
    clock.advance(601)
    assert first.kid not in {k["kid"] for k in ring.jwks()["keys"]}
    assert ring.verify(old_signature.key_id, b"old", old_signature.signature)  # forever


def test_an_operator_key_file_is_used_and_its_replacement_noticed(tmp_path: Path) -> None:
    """``signing_key_file``: the broker signs with that key; when the operator replaces the file,
    the new key signs and the old one still verifies."""
    path = tmp_path / "signing.pem"

    def write(key: Any) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    write(ec.generate_private_key(ec.SECP256R1()))
    ring = KeyRing(keys_dir=tmp_path / "unused", key_file=path)
    first = ring.sign(b"a")
    assert ring.current().alg == "ES256"
    write(ed25519.Ed25519PrivateKey.generate())
    second = ring.sign(b"b")
    assert second.key_id != first.key_id and ring.current().alg == "EdDSA"
    assert ring.verify(first.key_id, b"a", first.signature)
    assert not (tmp_path / "unused").exists()  # no generated keys beside an operator's


def test_replicas_publish_their_keys_to_one_store(tmp_path: Path, sqlite_url: str) -> None:
    """Two replicas with their own key files and one store: each JWKS lists both keys and each
    verifies the other's signatures (the store holds public keys only)."""
    from broker.store.migrate import upgrade

    upgrade(sqlite_url)
    db = Database(sqlite_url)
    try:
        a = KeyRing(keys_dir=tmp_path / "a", published=PublishedKeys(db))
        b = KeyRing(keys_dir=tmp_path / "b", published=PublishedKeys(db))
        signed = a.sign(b"from a")
        assert b.verify(signed.key_id, b"from a", signed.signature)
        b.current()
        assert {k["kid"] for k in a.jwks()["keys"]} == {a.current().kid, b.current().kid}
        from broker.store import repo

        with db.read() as conn:
            row = repo.signing_key(conn, signed.key_id)
        assert row is not None and set(row["jwk"]) == {"kty", "crv", "x", "kid", "alg", "use"}
        assert public_key_from_jwk(row["jwk"]) is not None
    finally:
        db.dispose()
