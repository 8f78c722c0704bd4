"""The identity area's secret: one 32-byte file in the data directory's secrets folder
(0600, written once with `secretfile.create_once`), from which each use derives its own
key with HKDF (RFC 5869), so no key serves two purposes."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from portcullis.secretfile import create_once

KEY_FILE = "identity.key"
KEY_BYTES = 32


def _derive(root: bytes, label: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"portcullis identity " + label.encode()).derive(root)


@dataclass(frozen=True, slots=True)
class IdentityKeys:
    """Purpose-bound keys: CSRF tokens, session ids, recovery codes, TOTP secrets at
    rest (AES-256-GCM), throttle keys."""

    csrf: bytes = field(repr=False)
    session: bytes = field(repr=False)
    recovery: bytes = field(repr=False)
    totp: bytes = field(repr=False)
    throttle: bytes = field(repr=False)

    @classmethod
    def from_root(cls, root: bytes) -> IdentityKeys:
        if len(root) != KEY_BYTES:
            raise ValueError(f"the identity key must be {KEY_BYTES} bytes")
        return cls(csrf=_derive(root, "csrf"), session=_derive(root, "session"),
                   recovery=_derive(root, "recovery"), totp=_derive(root, "totp"),
                   throttle=_derive(root, "throttle"))

    @classmethod
    def load(cls, secrets_dir: Path) -> IdentityKeys:
        """Read (creating once, race-safe) `secrets_dir/identity.key`."""
        path = secrets_dir / KEY_FILE
        if not path.exists():
            create_once(path, secrets.token_bytes(KEY_BYTES))
        return cls.from_root(path.read_bytes())


def keyed_hash(key: bytes, value: str) -> str:
    """HMAC-SHA256 hex of `value` (for high-entropy secrets and lookup keys)."""
    return hmac.digest(key, value.encode("utf-8"), "sha256").hex()
