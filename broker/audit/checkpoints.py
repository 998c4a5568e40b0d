"""Signed checkpoints of the audit chain.

A hash chain alone proves the order and content of events only against someone who cannot
recompute it; anyone who can write to the store can. So every ``checkpoint_interval`` seconds (and
when the broker stops) the broker signs the chain's head, ``(seq, hash, time, key id)``, with its own
key (ES256) and records the checkpoint twice: in ``audit_checkpoints`` and as a
``broker.audit.checkpoint`` event in the chain itself, which is exported like every event, so a copy
of each signed head also lives in the OTLP backend, out of the store's reach. ``broker audit
verify`` checks every signature and that the chain still passes through every signed head.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from broker.devkeys import load_or_create_ec_key
from broker.domain.audit import (
    AuditEvent,
    EventName,
    Outcome,
    checkpoint_statement,
    new_trace_id,
)
from broker.services.common import record
from broker.settings import Settings
from broker.store import Database, repo

log = logging.getLogger(__name__)

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
_P256_BYTES = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_key_id(public: PublicKey) -> str:
    """A key id: the SHA-256 of the public key's SubjectPublicKeyInfo, shortened (as the broker's
    key ring and JWKS name keys)."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]


class CheckpointSigner(Protocol):
    """Signs with the broker's current key (the broker's key ring has this shape)."""

    def sign(self, data: bytes) -> tuple[str, str]:
        """``(key id, base64url signature)`` of ``data``."""
        ...


class CheckpointVerifier(Protocol):
    """Checks a signature by key id (the key ring, or public keys an auditor was given)."""

    def verify(self, key_id: str, data: bytes, signature: str) -> bool: ...


def _raw_verify(public: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, data)
            return True
        if len(signature) != 2 * _P256_BYTES:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:_P256_BYTES], "big"),
            int.from_bytes(signature[_P256_BYTES:], "big"),
        )
        public.verify(der, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


class PublicKeys:
    """Public keys by key id: what ``broker audit verify`` trusts."""

    def __init__(self, keys: Mapping[str, PublicKey] | None = None) -> None:
        self.keys: dict[str, PublicKey] = dict(keys or {})

    def add(self, public: PublicKey) -> str:
        kid = public_key_id(public)
        self.keys[kid] = public
        return kid

    def add_jwk_set(self, body: Mapping[str, Any]) -> list[str]:
        """Add every key of a JWK Set (``{"keys": [...]}``) or of a single JWK."""
        import jwt

        jwks = body.get("keys", [body])
        added = []
        for jwk in jwks if isinstance(jwks, list) else []:
            try:
                key = jwt.PyJWK(jwk).key
            except (jwt.PyJWKError, KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"not a usable public key: {exc}") from None
            if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
                raise ValueError("only P-256 and Ed25519 public keys are supported")
            added.append(self.add(key))
        return added

    def add_file(self, path: Path) -> list[str]:
        """Add a PEM public key, or every key of a JWK Set (``{"keys": [...]}``) or JWK file."""
        data = path.read_bytes()
        if data.lstrip().startswith(b"{"):
            body = json.loads(data)
            try:
                return self.add_jwk_set(body if isinstance(body, dict) else {})
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            raise ValueError(f"{path} is not a P-256 or Ed25519 public key")
        return [self.add(key)]

    def verify(self, key_id: str, data: bytes, signature: str) -> bool:
        public = self.keys.get(key_id)
        if public is None:
            return False
        try:
            raw = b64url_decode(signature)
        except (ValueError, TypeError):
            return False
        return _raw_verify(public, data, raw)


class StoreKeys:
    """The broker's published public keys (table ``signing_keys``): every key the key ring ever
    signed with stays there, so checkpoints verify years after their key stopped signing."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cache = PublicKeys()

    def verify(self, key_id: str, data: bytes, signature: str) -> bool:
        if key_id not in self._cache.keys:
            with self.db.read() as conn:
                row = repo.signing_key(conn, key_id)
            if row is None:
                return False
            import jwt

            try:
                key = jwt.PyJWK(dict(row["jwk"])).key
            except (jwt.PyJWKError, KeyError, ValueError, TypeError):
                return False
            if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
                return False
            if public_key_id(key) != key_id:
                return False  # a published row that does not match its id is not trusted
            self._cache.keys[key_id] = key
        return self._cache.verify(key_id, data, signature)

    def jwks(self) -> dict[str, Any]:
        """Every published key, as a JWK Set an auditor can keep and verify with offline."""
        with self.db.read() as conn:
            rows = repo.signing_keys_since(conn, float("-inf"))
        return {"keys": [dict(r["jwk"]) for r in rows]}


class AnyKey:
    """Valid when any of the given verifiers accepts the signature."""

    def __init__(self, *verifiers: CheckpointVerifier) -> None:
        self.verifiers = verifiers

    def verify(self, key_id: str, data: bytes, signature: str) -> bool:
        return any(v.verify(key_id, data, signature) for v in self.verifiers)


class FileKeySigner:
    """ES256 with the broker's signing key file (used until a key ring is injected)."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        self._key = private_key
        self.key_id = public_key_id(private_key.public_key())

    @classmethod
    def from_settings(cls, settings: Settings) -> FileKeySigner:
        """The broker's signing key; created on first use only in dev mode."""
        return cls(
            load_or_create_ec_key(settings.effective_signing_key_file, create=settings.dev_mode)
        )

    def sign(self, data: bytes) -> tuple[str, str]:
        r, s = decode_dss_signature(self._key.sign(data, ec.ECDSA(hashes.SHA256())))
        return self.key_id, b64url(r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big"))

    def public_keys(self) -> PublicKeys:
        return PublicKeys({self.key_id: self._key.public_key()})

    def verify(self, key_id: str, data: bytes, signature: str) -> bool:
        return self.public_keys().verify(key_id, data, signature)

    def public_pem(self) -> str:
        return (
            self._key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )


def create_checkpoint(
    db: Database, signer: CheckpointSigner, clock: Callable[[], float], *, force: bool = False
) -> dict[str, Any] | None:
    """Sign the chain's head if events were added since the last checkpoint; returns it or None.

    The head is read, signed outside any transaction (the key ring may write to the store when
    it rotates), then recorded. A head signed while new events arrived is still a valid
    checkpoint of that point of the chain; two replicas signing the same head record it once.
    """
    with db.read() as conn:
        seq, head = repo.audit_head(conn)
        last = repo.latest_checkpoint(conn)
        fresh = last is None or repo.count_events_after(
            conn, int(last["seq"]), except_name=EventName.AUDIT_CHECKPOINT
        )
    if seq == 0 or (last is not None and int(last["seq"]) >= seq) or not (fresh or force):
        return None
    now = clock()
    kid, signature = signer.sign(checkpoint_statement(seq, head, now))
    with db.write() as conn:
        if not repo.insert_checkpoint(conn, seq, head, now, kid, signature):
            return None  # another replica signed this head first
        record(
            conn,
            AuditEvent(
                name=EventName.AUDIT_CHECKPOINT,
                outcome=Outcome.SUCCESS,
                time=now,
                trace_id=new_trace_id(),
                attributes={
                    "broker.audit.checkpoint.seq": seq,
                    "broker.audit.checkpoint.hash": head,
                    "broker.audit.checkpoint.created_at": now,
                    "broker.audit.checkpoint.key_id": kid,
                    "broker.audit.checkpoint.signature": signature,
                },
            ),
        )
    return {"seq": seq, "hash": head, "created_at": now, "key_id": kid}


class Checkpointer:
    """Takes a checkpoint every ``interval`` seconds and a last one when stopped."""

    def __init__(
        self,
        db: Database,
        signer: CheckpointSigner,
        clock: Callable[[], float],
        interval: float,
        *,
        dedup_retention: float = 7 * 86_400.0,
    ) -> None:
        self.db = db
        self.signer = signer
        self.clock = clock
        self.interval = interval
        self.dedup_retention = dedup_retention
        self._last_prune = float("-inf")
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def prune(self) -> int:
        """Forget ingested-record ids older than the dedup retention (hourly at most)."""
        now = self.clock()
        if now - self._last_prune < 3600:
            return 0
        self._last_prune = now
        with self.db.write() as conn:
            return repo.forget_ingested_before(conn, now - self.dedup_retention)

    def run_once(self) -> dict[str, Any] | None:
        try:
            self.prune()
            made = create_checkpoint(self.db, self.signer, self.clock)
        except Exception as exc:
            self.last_error = type(exc).__name__
            log.warning("audit checkpoint failed: %s", type(exc).__name__)
            return None
        self.last_error = None
        if made is not None:
            self.last = made
        return made

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.run_once()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="broker-audit-checkpoint", daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self.run_once()

    def health(self) -> dict[str, Any]:
        return {"interval": self.interval, "last": self.last, "last_error": self.last_error}
