"""TOTP (RFC 6238) with pyotp: 30 s steps, 6 digits, HMAC-SHA1 (what authenticator apps
implement), accepting the previous and next step for clock drift (RFC 6238 §5.2,
"at most one time step"). The caller stores the last accepted step per user and refuses
any step not after it, so each code is usable once (RFC 6238 §5.2: "the verifier MUST NOT
accept the second attempt of the OTP after the successful validation").

Secrets are stored encrypted (AES-256-GCM, the user id as associated data so a
ciphertext cannot be moved to another user).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Callable
from typing import Any

import pyotp
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

STEP_SECONDS = 30
DIGITS = 6
WINDOW = 1
SECRET_CHARS = 32  # base32 characters: 160 bits, the RFC 4226 §4 recommended key length


def new_secret() -> str:
    return pyotp.random_base32(SECRET_CHARS)


def provisioning_uri(secret: str, username: str, issuer_name: str) -> str:
    """The `otpauth://totp/...` URI authenticator apps import (Key URI Format)."""
    return pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS).provisioning_uri(
        name=username, issuer_name=issuer_name)


def match_step(secret: str, code: str, now: float, *, window: int = WINDOW, digits: int = DIGITS,
               interval: int = STEP_SECONDS, digest: Callable[..., Any] = hashlib.sha1) -> int | None:
    """The time step (RFC 6238 §4.2 `T`) whose code equals `code`, searching `now`'s step
    ± `window`, or None. Comparisons are constant-time; every candidate is computed."""
    code = code.strip().replace(" ", "")
    if len(code) != digits or not code.isdigit():
        return None
    totp = pyotp.TOTP(secret, digits=digits, digest=digest, interval=interval)
    current = int(now) // interval
    found: int | None = None
    for step in range(current - window, current + window + 1):
        if step >= 0 and hmac.compare_digest(totp.generate_otp(step).encode(), code.encode()):
            found = step if found is None else found
    return found


def valid_secret(secret: str) -> bool:
    try:
        return len(base64.b32decode(secret.upper() + "=" * (-len(secret) % 8))) >= 16
    except ValueError:
        return False


class SecretBox:
    """AES-256-GCM for TOTP secrets at rest: `v1.` + base64(nonce || ciphertext)."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def seal(self, secret: str, user_id: str) -> str:
        nonce = os.urandom(12)
        ct = self._aead.encrypt(nonce, secret.encode(), user_id.encode())
        return "v1." + base64.urlsafe_b64encode(nonce + ct).decode()

    def open(self, sealed: str, user_id: str) -> str | None:
        """The secret, or None if the blob is malformed, tampered with or another user's."""
        if not sealed.startswith("v1."):
            return None
        try:
            raw = base64.urlsafe_b64decode(sealed[3:])
            return self._aead.decrypt(raw[:12], raw[12:], user_id.encode()).decode()
        except (ValueError, InvalidTag):
            return None
