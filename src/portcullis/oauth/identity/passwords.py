"""Human passwords: argon2id hashes (argon2-cffi) and the acceptance policy.

Policy (NIST SP 800-63B §5.1.1.2, ASVS v5 V6.2): at least 12 characters, at most 256,
not in the bundled list of common/breached passwords (case-insensitive), and not
containing the username (or the local part of an email-like one). Passwords are NFKC
normalised before hashing so the same characters typed on another keyboard match.
"""

from __future__ import annotations

import gzip
import secrets
import threading
import unicodedata
from importlib import resources

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 12
MAX_LENGTH = 256


class WeakPasswordError(ValueError):
    """The password is refused; `str(self)` is user-safe and says why."""


def normalize(password: str) -> str:
    return unicodedata.normalize("NFKC", password)


def load_common_passwords() -> frozenset[str]:
    """The bundled list (data/common-passwords.txt.gz; source and licence in data/README.md)."""
    ref = resources.files("portcullis.oauth.identity").joinpath("data/common-passwords.txt.gz")
    with ref.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        return frozenset(line.strip().lower() for line in fh if line.strip())


class PasswordPolicy:
    """Says whether a new password is acceptable."""

    def __init__(self, common: frozenset[str] | None = None) -> None:
        self._common = load_common_passwords() if common is None else common

    def problem(self, password: str, username: str) -> str | None:
        """None when acceptable, else a user-safe reason."""
        pw = normalize(password)
        if len(pw) < MIN_LENGTH:
            return f"Use at least {MIN_LENGTH} characters."
        if len(pw) > MAX_LENGTH:
            return f"Use at most {MAX_LENGTH} characters."
        low = pw.lower()
        if low in self._common or low.strip() in self._common:
            return "This password appears in a list of common or breached passwords; choose another."
        name = username.strip().lower()
        local = name.split("@", 1)[0]
        if (name and name in low) or (len(local) >= 3 and local in low):
            return "The password must not contain your username."
        return None

    def check(self, password: str, username: str) -> None:
        """Raise WeakPasswordError when the password is not acceptable."""
        reason = self.problem(password, username)
        if reason is not None:
            raise WeakPasswordError(reason)


class PasswordHasher:
    """argon2id with explicit parameters (default: RFC 9106 §4 second recommended option,
    t=3, m=64 MiB, p=4). `verifications` counts every argon2 verification — including
    the dummy one done for unknown users — a seam for tests asserting equal work."""

    def __init__(self, *, time_cost: int = 3, memory_cost: int = 65536, parallelism: int = 4) -> None:
        self._ph = _Argon2(time_cost=time_cost, memory_cost=memory_cost, parallelism=parallelism,
                           hash_len=32, salt_len=16, type=Type.ID)
        self._dummy: str | None = None
        self._lock = threading.Lock()
        self.verifications = 0

    def hash(self, password: str) -> str:
        return self._ph.hash(normalize(password))

    def verify(self, stored: str, password: str) -> bool:
        """Constant-work check of `password` against an argon2 hash (never raises)."""
        with self._lock:
            self.verifications += 1
        try:
            return bool(self._ph.verify(stored, normalize(password)))
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def verify_dummy(self, password: str) -> bool:
        """The same work as `verify` against a hash with current parameters; always False.
        Used for unknown and disabled users so their answers take as long as a wrong password."""
        if self._dummy is None:
            self._dummy = self._ph.hash(secrets.token_urlsafe(24))
        self.verify(self._dummy, password)
        return False

    def needs_rehash(self, stored: str) -> bool:
        try:
            return bool(self._ph.check_needs_rehash(stored))
        except InvalidHashError:
            return True
