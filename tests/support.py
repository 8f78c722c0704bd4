"""Test support shared by unit tests and benchmarks: real implementations of the
storage protocols held in memory, and an Exchange factory."""

from __future__ import annotations

import builtins
from typing import Any

from portcullis.exchange import Exchange, Headers
from portcullis.storage.protocols import ApiKeyRecord, KeyExistsError, RevocationRecord


class MemoryKeyStore:
    """A `KeyStore` in a dict (a protocol implementation, not a mock)."""

    def __init__(self, *records: ApiKeyRecord) -> None:
        self._records = {r.key_id: r for r in records}
        self._revocations: dict[tuple[str, str], RevocationRecord] = {}
        self._revision = 1

    def create(self, record: ApiKeyRecord) -> None:
        if record.key_id in self._records or any(r.name == record.name for r in self._records.values()):
            raise KeyExistsError(record.key_id)
        self._records[record.key_id] = record
        self._revision += 1

    def get(self, key_id: str) -> ApiKeyRecord | None:
        return self._records.get(key_id)

    def list(self) -> list[ApiKeyRecord]:
        return list(self._records.values())

    def revoke(self, key_id: str, at: float) -> bool:
        rec = self._records.get(key_id)
        if rec is None or rec.revoked_at is not None:
            return False
        from dataclasses import replace

        self._records[key_id] = replace(rec, revoked_at=at)
        self._revision += 1
        return True

    def revoke_tokens(self, record: RevocationRecord) -> bool:
        old = self._revocations.get((record.kind, record.value))
        if old is not None and (old.expires_at is None or old.expires_at > record.created_at):
            return False  # still in force; a lapsed one may be made again
        self._revocations[(record.kind, record.value)] = record
        self._revision += 1
        return True

    def revocations(self, now: float) -> builtins.list[RevocationRecord]:
        return [r for r in self._revocations.values() if r.expires_at is None or r.expires_at > now]

    def revision(self) -> int:
        return self._revision

    def close(self) -> None:
        pass


async def no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}


def exchange(method: str = "GET", path: bytes = b"/", headers: Headers | None = None,
             client_ip: str = "127.0.0.1") -> Exchange:
    return Exchange(scope={"type": "http", "scheme": "http"}, receive=no_body, method=method, raw_path=path,
                    query=b"", headers=headers or [(b"host", b"gw")], request_id="rid", client_ip=client_ip)
