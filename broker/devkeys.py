"""Keys the broker keeps on disk: its signing key (checkpoints, broker-signed tokens) and dev keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def load_or_create_ec_key(path: Path, *, create: bool) -> ec.EllipticCurvePrivateKey:
    """Load a P-256 private key (PEM); create it with mode 0600 when allowed and missing."""
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path} is not an EC private key")
        return key
    if not create:
        raise FileNotFoundError(f"signing key {path} does not exist")
    key = ec.generate_private_key(ec.SECP256R1())
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return key


def key_id(key: ec.EllipticCurvePrivateKey) -> str:
    """A stable key id: the SHA-256 of the public key, shortened."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:16]
