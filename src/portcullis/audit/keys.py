"""The Ed25519 key that signs audit checkpoints."""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from portcullis.secretfile import create_once

log = logging.getLogger("portcullis.audit")


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of SHA-256 over the raw 32-byte public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _load(path: Path) -> Ed25519PrivateKey:
    data = path.read_bytes()
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        # Loud but not fatal: refusing to start would take the gateway down over a
        # permission an operator may have set on purpose.
        log.warning("audit signing key %s is accessible by group/others (mode %o)", path, mode)
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_or_create_audit_key(path: Path) -> Ed25519PrivateKey:
    """Load the PKCS#8 PEM Ed25519 key at `path`, creating it (mode 0600) if absent.

    Creation is atomic and race-safe: the key is written to a private temporary file
    and hard-linked into place, so concurrent callers all end up with the one key that
    won, and no reader ever sees a partly written file. Parent directories are created
    (mode 0700). Raises ValueError if the file holds something other than an Ed25519
    private key.
    """
    if path.exists():
        return _load(path)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption(),
    )
    create_once(path, pem)  # concurrent creators all end up with the one key that won
    return _load(path)
