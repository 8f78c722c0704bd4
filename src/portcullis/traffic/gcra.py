"""GCRA (generic cell rate algorithm) rate limiting, in process memory.

A limit of `requests` per `per_seconds` with `burst` is a bucket of capacity `burst`
refilling at one request every T = per_seconds / requests. GCRA stores one number
per key, the theoretical arrival time (TAT); a request at `now` is allowed when
``max(TAT, now) + T - now <= T * burst``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from portcullis.storage.protocols import RateLimitSpec

# Arrival times are floats: a request arriving exactly on schedule can land a few ulps
# past the tolerance. Nanosecond slack keeps "exactly at the rate" admitted.
_EPSILON = 1e-9


@dataclass(slots=True)
class Decision:
    """The outcome of one rate-limit check, with what the RateLimit headers need."""

    allowed: bool
    remaining: int
    reset_after: float  # seconds until the bucket is full again
    retry_after: float  # seconds until the next request would be allowed (0 if allowed)


class MemoryGcra:
    """GCRA with per-key state in a dict. Single event loop: no locks needed.

    Memory is bounded: `max_keys` entries; when full, entries whose bucket is already
    full again (they carry no information) are swept, and if none can be swept the
    oldest-inserted keys go (they can only gain, never lose, allowance by it).
    """

    def __init__(self, max_keys: int = 1_000_000) -> None:
        self._tat: dict[str, float] = {}
        self._max_keys = max_keys

    def __len__(self) -> int:
        return len(self._tat)

    def check(self, key: str, spec: RateLimitSpec, now: float, cost: int = 1) -> Decision:
        """Admit or refuse one request of `cost` for `key` at monotonic time `now`."""
        interval = spec.per_seconds / spec.requests
        tolerance = interval * spec.burst
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + interval * cost
        if new_tat - now > tolerance + _EPSILON:
            # Refused: state unchanged. Retry when enough of the bucket has drained.
            retry = new_tat - now - tolerance
            remaining = max(0, math.floor((tolerance - (tat - now)) / interval))
            return Decision(False, remaining, tat - now, retry)
        if key not in self._tat and len(self._tat) >= self._max_keys:
            self._sweep(now)
        self._tat[key] = new_tat
        remaining = max(0, math.floor((tolerance - (new_tat - now)) / interval + _EPSILON))
        return Decision(True, remaining, new_tat - now, 0.0)

    def refund(self, key: str, spec: RateLimitSpec, cost: int = 1) -> None:
        """Give back an admitted request (another limit refused it after all)."""
        tat = self._tat.get(key)
        if tat is not None:
            self._tat[key] = tat - spec.per_seconds / spec.requests * cost

    def _sweep(self, now: float) -> None:
        sweep(self._tat, now, self._max_keys)


def sweep(tats: dict[str, float], now: float, max_keys: int) -> None:
    """Make room in a full TAT table: drop keys whose bucket is full again (they carry no
    information); if that is not enough, the oldest-inserted tenth (they can only gain,
    never lose, allowance by it)."""
    stale = [k for k, t in tats.items() if t <= now]
    for k in stale:
        del tats[k]
    if len(tats) >= max_keys:
        for k in list(tats)[: max(1, max_keys // 10)]:
            del tats[k]
