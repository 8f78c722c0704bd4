"""Recovery codes: 10 per user, shown once, stored as keyed hashes (HMAC-SHA256 under a
key derived from the data directory's identity secret — each code carries ~60 bits of
entropy, so a keyed hash is enough: ASVS v5 V6.6), each usable once."""

from __future__ import annotations

import secrets

from portcullis.oauth.identity.keys import keyed_hash

COUNT = 10
# No 0/o, 1/l/i: codes are read off paper.
ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"
GROUPS, GROUP_LEN = 3, 4


def new_codes(count: int = COUNT) -> list[str]:
    return ["-".join("".join(secrets.choice(ALPHABET) for _ in range(GROUP_LEN)) for _ in range(GROUPS))
            for _ in range(count)]


def normalize(code: str) -> str | None:
    """The canonical form of a typed code (case, spaces and hyphens ignored), or None."""
    c = "".join(ch for ch in code.lower() if ch not in " -\t")
    if len(c) != GROUPS * GROUP_LEN or any(ch not in ALPHABET for ch in c):
        return None
    return c


def code_hash(key: bytes, code: str) -> str | None:
    c = normalize(code)
    return None if c is None else keyed_hash(key, "recovery\x00" + c)
