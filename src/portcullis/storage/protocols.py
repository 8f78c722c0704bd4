"""What a storage backend must provide. Dependencies point down to these protocols."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class RateLimitSpec:
    """A rate with burst: at most `burst` at once, `requests` per `per_seconds` sustained."""

    requests: int
    per_seconds: float
    burst: int


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """An API key as stored: never the key itself, only its keyed hash."""

    key_id: str
    name: str
    tenant: str
    scopes: frozenset[str]
    roles: frozenset[str]
    key_hash: str
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    rate_limit: RateLimitSpec | None = None
    signing_key_id: str | None = None  # requests with this key must be signed by it (RFC 9421)


class KeyStore(Protocol):
    """Persistent API key records. `revision()` changes on every write, so a reader
    can cache everything and poll one integer to notice revocations at once."""

    def create(self, record: ApiKeyRecord) -> None:
        """Insert; raises `KeyExistsError` if the id or the name is taken."""
        ...

    def get(self, key_id: str) -> ApiKeyRecord | None: ...

    def list(self) -> list[ApiKeyRecord]: ...

    def revoke(self, key_id: str, at: float) -> bool:
        """Mark revoked; False if no such key or already revoked."""
        ...

    def revision(self) -> int: ...

    def close(self) -> None: ...


class KeyExistsError(Exception):
    """A key with that id or name already exists."""


RevocationKind = Literal["jti", "sub", "client"]


@dataclass(frozen=True, slots=True)
class RevocationRecord:
    """Tokens refused from now on: one token (`jti`), every token of a subject, or of a
    client. `expires_at` lets an entry lapse once no token it covers can still be valid."""

    kind: RevocationKind
    value: str
    created_at: float
    expires_at: float | None = None
    reason: str = ""


class RevocationStore(Protocol):
    """Persistent token revocations; shares the key store's revision counter."""

    def revoke_tokens(self, record: RevocationRecord) -> bool:
        """Add; False if the same kind and value is already revoked."""
        ...

    def revocations(self, now: float) -> list[RevocationRecord]:
        """Entries still in force at `now`."""
        ...

    def revision(self) -> int: ...
