"""The broker's own rotating signing key: broker-signed tokens and audit checkpoints.

Private keys live in PEM files (mode 0600) and nowhere else: never in the store, a log or a
response. Their public halves are published in the store (table ``signing_keys``), so every
replica's JWKS lists every replica's keys, and a signature stays verifiable after its key stopped
signing (audit checkpoints are verified years later).

Where the signing key comes from:

- ``signing_key_file`` set (production): that PEM file (Ed25519 or P-256) is the key. Operators
  rotate it by replacing the file; the ring notices within ``CHECK_INTERVAL`` seconds, publishes the
  new public key and keeps the old one published for as long as what it signed may be valid.
- otherwise (dev mode): keys are made under ``data_dir/keys/``, a new one every
  ``signing_key_rotation`` seconds. The next key is published ``lead`` seconds before it starts
  signing, so verifiers that cache the JWKS already know it; a retired private key is deleted.

Small API for other parts of the broker::

    ring.sign(data) -> Signature(key_id, signature)     # base64url signature over ``data``
    ring.verify(key_id, data, signature) -> bool
    ring.jwks() -> {"keys": [...]}                      # public keys valid for verification now
    ring.current() -> SigningKey                        # for JWT libraries (kid, alg, private key)
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from broker.errors import ConfigurationError

log = logging.getLogger(__name__)

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey

#: How often (seconds) the ring looks at its files for rotation or replacement.
CHECK_INTERVAL = 10.0
#: How long a published key list is reused by :meth:`KeyRing.jwks`.
JWKS_CACHE_SECONDS = 5.0


class Signature(NamedTuple):
    """A detached signature: which key made it and the base64url signature bytes."""

    key_id: str
    signature: str


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def key_id(public: PublicKey) -> str:
    """A stable key id: the SHA-256 of the public key's SubjectPublicKeyInfo, shortened."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


def algorithm_of(key: PrivateKey | PublicKey) -> str:
    """The JOSE algorithm name for a key (``EdDSA`` or ``ES256``)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "EdDSA"
    if isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ConfigurationError(f"unsupported signing key curve {key.curve.name}")


def public_jwk(public: PublicKey) -> dict[str, Any]:
    """The JWK (RFC 7517/8037) of a public key, with ``kid``, ``alg`` and ``use``."""
    kid = key_id(public)
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": b64url(raw),
            "kid": kid,
            "alg": "EdDSA",
            "use": "sig",
        }
    numbers = public.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": b64url(numbers.x.to_bytes(32, "big")),
        "y": b64url(numbers.y.to_bytes(32, "big")),
        "kid": kid,
        "alg": algorithm_of(public),
        "use": "sig",
    }


def public_key_from_jwk(jwk: dict[str, Any]) -> PublicKey:
    """Rebuild a public key published by :func:`public_jwk`."""
    if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519":
        return ed25519.Ed25519PublicKey.from_public_bytes(b64url_decode(jwk["x"]))
    if jwk.get("kty") == "EC" and jwk.get("crv") == "P-256":
        x = int.from_bytes(b64url_decode(jwk["x"]), "big")
        y = int.from_bytes(b64url_decode(jwk["y"]), "big")
        return ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    raise ValueError("unsupported JWK")


def raw_sign(private: PrivateKey, data: bytes) -> bytes:
    """Sign as JOSE does: Ed25519 as is, ECDSA as the 64-byte ``r || s``."""
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return private.sign(data)
    r, s = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def raw_verify(public: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
        else:
            if len(signature) != 64:
                return False
            der = encode_dss_signature(
                int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
            )
            public.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def generate_key(algorithm: str) -> PrivateKey:
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigurationError(f"unsupported signing algorithm {algorithm!r}")


def load_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM private key; only Ed25519 and P-256 are accepted."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigurationError(f"{path} is neither an Ed25519 nor a P-256 private key")


def write_private_key(path: Path, key: PrivateKey) -> None:
    """Write a key with mode 0600; refuses to overwrite (another process may have made it)."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


@dataclass(frozen=True)
class SigningKey:
    """One private key of the ring, with its public description."""

    kid: str
    alg: str
    private: PrivateKey = field(repr=False)
    activates_at: float
    signs_until: float

    @property
    def jwk(self) -> dict[str, Any]:
        return public_jwk(self.private.public_key())


class PublishedKeys:
    """Where public keys are published: the store (shared by replicas) or memory (tests)."""

    def __init__(self, db: Any | None = None) -> None:
        self.db = db
        self._memory: dict[str, dict[str, Any]] = {}

    def publish(self, key: SigningKey) -> None:
        row: dict[str, Any] = {
            "kid": key.kid,
            "alg": key.alg,
            "jwk": key.jwk,
            "created_at": key.activates_at,
            "signs_until": key.signs_until,
        }
        if self.db is None:
            old = self._memory.get(key.kid)
            if old is None or old["signs_until"] < key.signs_until:
                self._memory[key.kid] = row
            return
        from broker.store import repo

        with self.db.write() as conn:
            repo.publish_signing_key(conn, **row)

    def get(self, kid: str) -> dict[str, Any] | None:
        if self.db is None:
            return self._memory.get(kid)
        from broker.store import repo

        with self.db.read() as conn:
            return repo.signing_key(conn, kid)

    def valid_after(self, since: float) -> list[dict[str, Any]]:
        """Keys that signed (or will sign) something at or after ``since``."""
        if self.db is None:
            return [r for r in self._memory.values() if r["signs_until"] >= since]
        from broker.store import repo

        with self.db.read() as conn:
            return repo.signing_keys_since(conn, since)


class KeyRing:
    """The broker's signing keys; thread-safe, cheap on the hot path."""

    def __init__(
        self,
        *,
        keys_dir: Path,
        key_file: Path | None = None,
        algorithm: str = "EdDSA",
        rotation: float = 86_400.0,
        verify_window: float = 12 * 3600.0,
        published: PublishedKeys | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``verify_window``: how long after a key stops signing its public key stays in the
        JWKS (the longest lifetime of anything it signed, plus leeway)."""
        self.keys_dir = keys_dir
        self.key_file = key_file
        self.algorithm = algorithm
        self.rotation = float(rotation)
        self.lead = min(600.0, self.rotation / 4)
        self.verify_window = float(verify_window)
        self.published = published or PublishedKeys()
        self.clock = clock
        self._lock = threading.Lock()
        self._current: SigningKey | None = None
        self._file_stamp: tuple[int, int] | None = None
        self._checked = float("-inf")
        self._publics: dict[str, PublicKey] = {}
        self._jwks_cache: tuple[float, dict[str, Any]] | None = None

    # --- the current key ------------------------------------------------------------------

    def current(self) -> SigningKey:
        """The key that signs now (rotating or reloading it first when due)."""
        now = self.clock()
        with self._lock:
            if self._current is None or time.monotonic() - self._checked >= CHECK_INTERVAL:
                self._current = self._refresh(now)
                self._checked = time.monotonic()
            elif now >= self._current.signs_until:
                self._current = self._refresh(now)
            return self._current

    def _refresh(self, now: float) -> SigningKey:
        if self.key_file is not None:
            return self._from_operator_file(now)
        return self._from_ring_dir(now)

    def _from_operator_file(self, now: float) -> SigningKey:
        assert self.key_file is not None
        try:
            stat = self.key_file.stat()
        except FileNotFoundError:
            raise ConfigurationError(
                f"the signing key file {self.key_file} does not exist"
            ) from None
        stamp = (stat.st_ino, stat.st_mtime_ns)
        current = self._current
        # Keep signing with the same key while the file is unchanged; extend its published
        # validity ahead of time so verifiers keep it.
        if current is not None and stamp == self._file_stamp:
            if current.signs_until - now < self.rotation / 2:
                current = SigningKey(
                    current.kid,
                    current.alg,
                    current.private,
                    current.activates_at,
                    now + self.rotation,
                )
                self.published.publish(current)
            return current
        private = load_private_key(self.key_file)
        if current is not None:
            # The operator replaced the file: the old key stops signing now.
            self.published.publish(
                SigningKey(current.kid, current.alg, current.private, current.activates_at, now)
            )
        key = SigningKey(
            kid=key_id(private.public_key()),
            alg=algorithm_of(private),
            private=private,
            activates_at=now,
            signs_until=now + self.rotation,
        )
        self.published.publish(key)
        self._file_stamp = stamp
        log.info("signing with key %s from %s", key.kid, self.key_file)
        return key

    def _ring_files(self) -> list[tuple[float, Path]]:
        out = []
        if self.keys_dir.is_dir():
            for path in self.keys_dir.glob("*.pem"):
                stem = path.stem.split("-", 1)[0]
                if stem.isdigit():
                    out.append((float(stem), path))
        return sorted(out)

    def _make(self, activates_at: float) -> None:
        private = generate_key(self.algorithm)
        kid = key_id(private.public_key())
        path = self.keys_dir / f"{int(activates_at)}-{kid}.pem"
        self.keys_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.keys_dir, 0o700)
        write_private_key(path, private)
        self.published.publish(
            SigningKey(kid, self.algorithm, private, activates_at, activates_at + self.rotation)
        )
        log.info("made signing key %s (signs from %.0f)", kid, activates_at)

    def _from_ring_dir(self, now: float) -> SigningKey:
        files = self._ring_files()
        active = [(t, p) for t, p in files if t <= now]
        if not active or active[-1][0] + self.rotation <= now:
            # No key, or the newest active one is past its term (a broker that was down).
            self._make(now)
            files = self._ring_files()
            active = [(t, p) for t, p in files if t <= now]
        activates_at, path = active[-1]
        if activates_at + self.rotation - self.lead <= now and not any(t > now for t, _ in files):
            # Publish the successor ahead of its first use.
            self._make(activates_at + self.rotation)
        # Retired private keys are not needed: verification uses the published public halves.
        for _, old in active[:-1]:
            with contextlib.suppress(FileNotFoundError):
                old.unlink()
        private = load_private_key(path)
        key = SigningKey(
            kid=key_id(private.public_key()),
            alg=algorithm_of(private),
            private=private,
            activates_at=activates_at,
            signs_until=activates_at + self.rotation,
        )
        if self._current is None or self._current.kid != key.kid:
            self.published.publish(key)  # idempotent; covers a key made by another process
        return key

    # --- signing and verification ---------------------------------------------------------

    def sign(self, data: bytes) -> Signature:
        """Sign ``data`` with the current key."""
        key = self.current()
        return Signature(key.kid, b64url(raw_sign(key.private, data)))

    def public_key(self, kid: str) -> PublicKey | None:
        """A published public key by id, whatever its age (old checkpoints stay verifiable)."""
        cached = self._publics.get(kid)
        if cached is not None:
            return cached
        row = self.published.get(kid)
        if row is None:
            return None
        try:
            public = public_key_from_jwk(row["jwk"])
        except (KeyError, ValueError):
            return None
        if key_id(public) != kid:
            return None  # a published row that does not match its id is not trusted
        self._publics[kid] = public
        return public

    def verify(self, key_id: str, data: bytes, signature: str) -> bool:
        """True iff ``signature`` is a valid signature over ``data`` by the published key."""
        public = self.public_key(key_id)
        if public is None:
            return False
        try:
            raw = b64url_decode(signature)
        except (ValueError, TypeError):
            return False
        return raw_verify(public, data, raw)

    def jwks(self) -> dict[str, Any]:
        """The JWK Set of every key that signs now, will sign soon, or signed something that may
        still be valid."""
        self.current()  # make sure this replica's key is published
        now = self.clock()
        cached = self._jwks_cache
        if cached is not None and now - cached[0] < JWKS_CACHE_SECONDS:
            return cached[1]
        rows = self.published.valid_after(now - self.verify_window)
        keys = sorted(rows, key=lambda r: -r["created_at"])
        body = {"keys": [dict(r["jwk"]) for r in keys]}
        self._jwks_cache = (now, body)
        return body
