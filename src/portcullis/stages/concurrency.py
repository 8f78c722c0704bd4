"""concurrency: slots per upstream and per tenant, held for the whole proxied exchange.

On the way in (after authorization, before the limit stage, so a request shed here
uses up no rate or quota) the stage takes a slot from `ConcurrencyLimiter` for the
route's upstream and the principal's tenant, or sheds the request with 503 and
``Retry-After``. The slot is given back in `on_complete`, which the app runs once
the exchange is over whatever happened: response streamed to the end, refused by a
later stage, upstream error or timeout, client gone mid-stream, or a stage raising.

The latency fed to the adaptive limit is the time to the upstream's response head
(`on_response`), the signal Envoy's controller uses; a request that timed out
upstream counts with its full time, and one that never got an answer for another
reason (unreachable, refused later) is not a sample.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import ClassVar

from portcullis.exchange import Exchange
from portcullis.problems import Problem
from portcullis.traffic.concurrency import ConcurrencyLimiter, Shed, Slot

_SLOT = "_concurrency_slot"
_RTT = "_concurrency_rtt"
_DETAIL = {
    "upstream": "The upstream service is at capacity; retry shortly.",
    "tenant_share": "This tenant has too many requests in flight to this service; retry shortly.",
    "tenant": "This tenant has too many requests in flight; retry shortly.",
}


class ConcurrencyStage:
    """Request, response and completion stage around `ConcurrencyLimiter`."""

    name: ClassVar[str] = "concurrency"

    def __init__(self, limiter: ConcurrencyLimiter, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = limiter
        self._clock = clock

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return None
        tenant = ex.principal.tenant if ex.principal is not None else None
        got = self.limiter.acquire(route.config.upstream, tenant)
        if isinstance(got, Shed):
            ex.facts["concurrency"] = got.limit
            return Problem(503, "service-unavailable", "limit.concurrency_" + got.limit, _DETAIL[got.limit],
                           headers=[(b"retry-after", str(got.retry_after).encode())])
        ex.facts[_SLOT] = got
        return None

    async def on_response(self, ex: Exchange) -> None:
        slot = ex.facts.get(_SLOT)
        if isinstance(slot, Slot):
            ex.facts[_RTT] = self._clock() - slot.started

    def on_complete(self, ex: Exchange) -> None:
        slot = ex.facts.pop(_SLOT, None)
        if not isinstance(slot, Slot):
            return
        rtt = ex.facts.get(_RTT)
        if rtt is None and ex.reason == "upstream.timeout":
            rtt = self._clock() - slot.started
        self.limiter.release(slot, rtt if isinstance(rtt, float) else None)
