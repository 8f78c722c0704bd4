"""Key administration shared by the CLI and the demo: create and revoke, audited."""

from __future__ import annotations

import time
from pathlib import Path

from portcullis.audit.events import AuditEvent
from portcullis.credentials import apikeys
from portcullis.gateway import DataPaths, SecretsError, open_audit_store, open_key_store
from portcullis.storage.engine import storage_for
from portcullis.storage.protocols import (
    ApiKeyRecord,
    KeyExistsError,
    RateLimitSpec,
    RevocationKind,
    RevocationRecord,
)


def _admin_event(data_dir: Path, action: str, key_id: str, tenant: str, extra: dict[str, object]) -> None:
    """Append an admin event to the audit log (the store serializes writers)."""
    store = open_audit_store(data_dir)
    try:
        store.append_batch([AuditEvent(
            ts=time.time(), kind="admin", request_id=apikeys.generate_key_id(), decision="allow",
            reason=action, subject="cli", tenant=tenant, credential_id=key_id, extra=dict(extra),
        )])
    finally:
        store.close()


def _require_key_store(data_dir: Path) -> None:
    # A directory bound to a shared database (`storage.url`) has no SQLite key file.
    if storage_for(data_dir).url is None and not DataPaths(data_dir).keys_db.exists():
        raise SecretsError(f"{data_dir}: no key store here (is this the gateway's data directory?)")


def create_key(data_dir: Path, *, name: str, tenant: str, scopes: list[str], roles: list[str],
               expires_at: float | None = None, rate_limit: tuple[int, float, int] | None = None,
               signing_key_id: str | None = None) -> tuple[ApiKeyRecord, str]:
    """Create and store a key; returns the record and the key (shown once).

    ValueError if the name is taken.
    """
    open_audit_store(data_dir).close()  # fail before any change if the audit log is unusable
    store, hasher = open_key_store(data_dir)
    try:
        kid, key = apikeys.generate()
        rec = ApiKeyRecord(
            key_id=kid, name=name, tenant=tenant, scopes=frozenset(scopes), roles=frozenset(roles),
            key_hash=hasher.digest(key), created_at=time.time(), expires_at=expires_at,
            rate_limit=RateLimitSpec(*rate_limit) if rate_limit else None,
            signing_key_id=signing_key_id,
        )
        try:
            store.create(rec)
        except KeyExistsError:
            raise ValueError(f"a key named {name!r} already exists") from None
    finally:
        store.close()
    _admin_event(data_dir, "admin.key_created", kid, tenant, {"name": name, "scopes": sorted(scopes)})
    return rec, key


def revoke_key(data_dir: Path, key_id: str) -> bool:
    """Revoke at once; False if there is no such active key."""
    _require_key_store(data_dir)
    open_audit_store(data_dir).close()  # fail before any change if the audit log is unusable
    store, _ = open_key_store(data_dir, create=False)
    try:
        rec = store.get(key_id)
        ok = store.revoke(key_id, time.time())
    finally:
        store.close()
    if ok and rec is not None:
        _admin_event(data_dir, "admin.key_revoked", key_id, rec.tenant, {"name": rec.name})
    return ok


def revoke_tokens(data_dir: Path, kind: RevocationKind, value: str, *, expires_at: float | None = None,
                  reason: str = "") -> bool:
    """Refuse every access token with this `jti`, subject or client from now on; audited.

    False if the same revocation already exists. A running gateway applies it within
    its poll interval (`keys.revocation_poll_seconds`).
    """
    _require_key_store(data_dir)
    open_audit_store(data_dir).close()  # fail before any change if the audit log is unusable
    store, _ = open_key_store(data_dir, create=False)
    try:
        added = store.revoke_tokens(RevocationRecord(kind, value, time.time(), expires_at, reason))
    finally:
        store.close()
    if added:
        _admin_event(data_dir, "admin.tokens_revoked", "", "", {"kind": kind, "value": value, "reason": reason,
                                                               "expires_at": expires_at})
    return added


def token_revocations(data_dir: Path) -> list[RevocationRecord]:
    store, _ = open_key_store(data_dir, create=False)
    try:
        return store.revocations(time.time())
    finally:
        store.close()
