"""limit: per-credential and per-route rate limits with burst (DESIGN.md, step 6).

Every check is GCRA (`portcullis.traffic.gcra`). A request passes when every limit
that applies to it admits it: the route's named policy (keyed by credential, tenant,
client IP or route) and the credential's own limit. The answer carries
``RateLimit-Policy`` and ``RateLimit`` (draft-ietf-httpapi-ratelimit-headers-10 §4, §5,
structured fields: ``"name";q=<quota>;w=<window>`` and ``"name";r=<remaining>;t=<reset>``)
for the tightest limit; a refusal is a 429 with ``Retry-After`` (RFC 9110 §10.2.3).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from portcullis.exchange import Exchange
from portcullis.problems import Problem
from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.gcra import Decision, MemoryGcra


class RateLimitConfig(BaseModel):
    """A named policy: `requests` per `per_seconds` sustained, `burst` at once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(gt=0, le=10**12)
    per_seconds: float = Field(gt=0, le=86_400 * 31)
    burst: int = Field(gt=0, le=10**9)
    key: Literal["credential", "tenant", "ip", "route"] = "credential"

    def spec(self) -> RateLimitSpec:
        return RateLimitSpec(self.requests, self.per_seconds, self.burst)


class LimitStage:
    """Applies the limits; adds RateLimit headers to every answer of a limited route."""

    name: ClassVar[str] = "limit"

    def __init__(self, policies: dict[str, RateLimitConfig], limiter: MemoryGcra,
                 credential_default: RateLimitSpec | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._policies = {n: (p, p.spec()) for n, p in policies.items()}
        self._limiter = limiter
        self._credential_default = credential_default
        self._clock = clock

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return None
        now = self._clock()
        p = ex.principal
        results: list[tuple[str, RateLimitSpec, Decision]] = []
        keys: list[str] = []
        name = route.config.rate_limit
        if name is not None:
            cfg, spec = self._policies[name]
            if cfg.key == "credential" and p is not None:
                subject = "c:" + (p.limit_key or p.credential_id)
            elif cfg.key == "tenant" and p is not None:
                subject = "t:" + p.tenant
            elif cfg.key == "route":
                subject = "r:" + route.name
            else:  # ip, or no principal on a public route
                subject = "i:" + ex.client_ip
            keys.append(f"{name}|{subject}")
            results.append((name, spec, self._limiter.check(keys[-1], spec, now)))
        if p is not None:
            own = RateLimitSpec(*p.rate_limit) if p.rate_limit else self._credential_default
            if own is not None:
                keys.append("credential|" + (p.limit_key or p.credential_id))
                results.append(("credential", own, self._limiter.check(keys[-1], own, now)))
        if not results:
            return None
        ex.response_headers.append((b"ratelimit-policy", ", ".join(
            f'"{n}";q={s.requests};w={_window(s)}' for n, s, _ in results).encode()))
        refused = [r for r in results if not r[2].allowed]
        if refused:
            # A refused request must not use up the limits that admitted it.
            for key, (_, spec, decision) in zip(keys, results, strict=True):
                if decision.allowed:
                    self._limiter.refund(key, spec)
            n, _, d = max(refused, key=lambda r: r[2].retry_after)
            retry = max(1, math.ceil(d.retry_after))
            ex.facts["rate_limit"] = n
            return Problem(429, "rate-limited", "limit.rate", f"Rate limit '{n}' exceeded; retry later.",
                           headers=[(b"retry-after", str(retry).encode()),
                                    (b"ratelimit", f'"{n}";r=0;t={retry}'.encode())])
        n, _, d = min(results, key=lambda r: r[2].remaining)
        ex.response_headers.append((b"ratelimit", f'"{n}";r={d.remaining};t={math.ceil(d.reset_after)}'.encode()))
        return None


def _window(spec: RateLimitSpec) -> int:
    return max(1, math.ceil(spec.per_seconds))
