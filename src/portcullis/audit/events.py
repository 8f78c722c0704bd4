"""The audit event: one per call through the gateway, and one per admin action."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class AuditEvent:
    """Who did what, when, from where, and what the gateway decided.

    `seq`, `prev_hash` and `hash` are assigned by the writer when the event is
    chained; callers leave them at their defaults.
    """

    ts: float  # wall-clock seconds since the epoch (UTC)
    kind: str  # "request" | "admin"
    request_id: str
    decision: str  # "allow" | "deny" | "error"
    reason: str  # reason code, e.g. "ok", "auth.key_revoked", "limit.rate"
    method: str = ""
    host: str = ""
    path: str = ""
    route: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    latency_ms: float = 0.0
    client_ip: str = ""
    user_agent: str = ""
    subject: str = ""
    tenant: str = ""
    credential_id: str = ""
    credential_kind: str = ""
    client_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    prev_hash: str = ""
    hash: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
