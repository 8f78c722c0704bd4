"""In-process traffic backends for one node: rates, replay cache, revocation bus.

`MemoryRateBackend` is the GCRA of `portcullis.traffic.gcra` (same formulas, same
`Decision`) behind the `RateBackend` contract: `check_all` decides every check first
and writes only when all of them admit, so a refused request changes no state. Being
synchronous on one event loop, nothing can interleave between deciding and writing.

`MemoryReplayCache` and `MemoryRevocationBus` are the single-node `ReplayCache` and
`RevocationBus`; several processes need the Redis ones.
"""

from __future__ import annotations

import heapq
import inspect
import logging
import math
import time
from collections.abc import Callable, Sequence

from portcullis.traffic.gcra import Decision, sweep
from portcullis.traffic.protocols import LimitCheck, RevocationListener

log = logging.getLogger("portcullis.traffic")

# As in gcra.py: a request arriving exactly on schedule may land a few ulps past the
# tolerance; nanosecond slack keeps "exactly at the rate" admitted.
_EPSILON = 1e-9


class MemoryRateBackend:
    """GCRA over a dict of theoretical arrival times (TAT), all-or-nothing.

    Memory is bounded by `max_keys`: when full, keys whose bucket has refilled are
    swept (they carry no information); if none can be, the oldest-inserted tenth goes
    (those keys can only gain allowance by it, never lose it).
    Time is `clock` (monotonic seconds), the backend's own, as the contract says.
    """

    def __init__(self, *, max_keys: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self._tat: dict[str, float] = {}
        self._max_keys = max_keys
        self._clock = clock

    def __len__(self) -> int:
        return len(self._tat)

    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        """One decision per check, in order; state advances only if all admit."""
        return self.check_all_at(checks, self._clock())

    def check_all_at(self, checks: Sequence[LimitCheck], now: float) -> list[Decision]:
        """`check_all` at an explicit time `now` (same clock as the backend's)."""
        tats = self._tat
        if len(checks) == 1:  # the common case, without the staging dict
            c = checks[0]
            spec = c.spec
            interval = spec.per_seconds / spec.requests
            tolerance = interval * spec.burst
            tat = tats.get(c.key, now)
            if tat < now:  # noqa: PLR1730 - an `if` is cheaper than a max() call on this path
                tat = now
            new_tat = tat + interval * c.cost
            if new_tat - now > tolerance + _EPSILON:
                return [Decision(False, max(0, math.floor((tolerance - (tat - now)) / interval)), tat - now,
                                 new_tat - now - tolerance)]
            if len(tats) >= self._max_keys and c.key not in tats:
                self._sweep(now)
            tats[c.key] = new_tat
            return [Decision(True, max(0, math.floor((tolerance - (new_tat - now)) / interval + _EPSILON)),
                             new_tat - now, 0.0)]
        # Stage the new TATs so two checks of one key see each other, and write them
        # only if every check admits.
        staged: dict[str, float] = {}
        out: list[Decision] = []
        refused = False
        for c in checks:
            spec = c.spec
            interval = spec.per_seconds / spec.requests
            tolerance = interval * spec.burst
            prior = staged.get(c.key)
            tat = max(tats.get(c.key, now) if prior is None else prior, now)
            new_tat = tat + interval * c.cost
            if new_tat - now > tolerance + _EPSILON:
                refused = True
                out.append(Decision(False, max(0, math.floor((tolerance - (tat - now)) / interval)), tat - now,
                                    new_tat - now - tolerance))
            else:
                staged[c.key] = new_tat
                out.append(Decision(True, max(0, math.floor((tolerance - (new_tat - now)) / interval + _EPSILON)),
                                    new_tat - now, 0.0))
        if refused:
            # The admitted ones report what they *would* have left; nothing is written.
            return out
        if len(tats) + len(staged) > self._max_keys:
            self._sweep(now)
        tats.update(staged)
        return out

    async def close(self) -> None:
        self._tat.clear()

    def _sweep(self, now: float) -> None:
        sweep(self._tat, now, self._max_keys)


class MemoryReplayCache:
    """`ReplayCache` in a dict with a heap of expiries; one node only.

    Bounded by `max_entries`. When full of values that have not expired, `first_use`
    answers False (treat as a replay) rather than evict one: evicting would let that
    value be replayed, and a full cache means an attack or a mis-sized bound, so it
    fails closed and logs why.
    """

    def __init__(self, *, max_entries: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._seen: dict[tuple[str, str], float] = {}
        self._expiries: list[tuple[float, str, str]] = []
        self._max = max_entries
        self._clock = clock
        self._full_logged = False

    def __len__(self) -> int:
        return len(self._seen)

    async def first_use(self, namespace: str, value: str, ttl_seconds: float) -> bool:
        """True the first time `value` is seen in `namespace` within `ttl_seconds`."""
        now = self._clock()
        k = (namespace, value)
        until = self._seen.get(k)
        if until is not None and until > now:
            return False
        if until is None and len(self._seen) >= self._max:
            self._expire(now)
            if len(self._seen) >= self._max:
                if not self._full_logged:
                    log.error("replay cache full (%d unexpired values): refusing new values", self._max)
                    self._full_logged = True
                return False
            self._full_logged = False
        expires = now + ttl_seconds
        self._seen[k] = expires
        heapq.heappush(self._expiries, (expires, namespace, value))
        # Drop expired entries as we go, a few at a time, so the heap stays bounded.
        self._expire(now, budget=2)
        return True

    def _expire(self, now: float, budget: int | None = None) -> None:
        heap = self._expiries
        n = 0
        while heap and heap[0][0] <= now and (budget is None or n < budget):
            expires, ns, value = heapq.heappop(heap)
            if self._seen.get((ns, value)) == expires:
                del self._seen[(ns, value)]
            n += 1

    async def close(self) -> None:
        self._seen.clear()
        self._expiries.clear()


class MemoryRevocationBus:
    """`RevocationBus` for one process: `publish` calls every listener in turn.

    A listener that raises is logged and does not stop the others (a revocation must
    reach every listener)."""

    def __init__(self) -> None:
        self._listeners: list[RevocationListener] = []

    def subscribe(self, listener: RevocationListener) -> None:
        self._listeners.append(listener)

    async def publish(self) -> None:
        for listener in list(self._listeners):
            try:
                result = listener()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:  # one failing listener must not silence the rest
                log.error("revocation listener failed: %s", type(exc).__name__)

    async def close(self) -> None:
        self._listeners.clear()
