"""What a traffic-control backend provides: memory (one node) or Redis (many nodes).

Every backend implements the same contracts, tested by one suite parametrized over the
backends (DESIGN.md, "limits": algorithms apart from storage).

- `RateBackend.check_all`: GCRA over several keys at once, all or nothing — either
  every check admits and each key's state advances, or none does (no refunds needed;
  in Redis one Lua script, one round trip).
- `QuotaBackend.consume`: a counter per key and calendar period (day or month) that
  survives restarts, reset when the period ends.
- `ReplayCache.first_use`: True the first time a value is seen within its TTL (DPoP
  `jti`, RFC 9421 nonces, `private_key_jwt` `jti`), False on a replay.
- `RevocationBus`: tells every node at once that revocations changed (pub/sub), on
  top of the store's revision polling.

A backend that cannot answer raises `BackendUnavailable`; what the caller then does
(fail open to local limits with an alert, or fail closed) is configured per concern.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.gcra import Decision


class BackendUnavailable(Exception):
    """The shared backend (e.g. Redis) did not answer in time; the message says why."""


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One GCRA check: `cost` requests against `spec` under `key`."""

    key: str
    spec: RateLimitSpec
    cost: int = 1


class RateBackend(Protocol):
    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        """One decision per check, in order; all admitted (state advanced for every
        key) or, if any refuses, no state changed at all. Time is the backend's own
        clock (Redis: the server's TIME), so nodes agree."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class QuotaDecision:
    allowed: bool
    used: int  # after this request if allowed, else before it
    limit: int
    resets_at: float  # epoch seconds when the period ends


class QuotaBackend(Protocol):
    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1) -> QuotaDecision:
        """Count `cost` against `key` in calendar `period` (e.g. ``2026-11-29`` or
        ``2026-11``) unless that would exceed `limit`; kept until `resets_at`. A negative
        `cost` is a refund (a request another limit refused after all): the count goes
        down by that much, never below zero, and is always allowed."""
        ...

    async def close(self) -> None: ...


class ReplayCache(Protocol):
    async def first_use(self, namespace: str, value: str, ttl_seconds: float) -> bool:
        """Record `value` in `namespace` for `ttl_seconds`; False if it was already there."""
        ...

    async def close(self) -> None: ...


RevocationListener = Callable[[], Awaitable[None] | None]


class RevocationBus(Protocol):
    async def publish(self) -> None:
        """Tell every node that revocations changed."""
        ...

    def subscribe(self, listener: RevocationListener) -> None:
        """Call `listener` whenever any node publishes (including this one)."""
        ...

    async def close(self) -> None: ...
