"""A client process for the accuracy test: hammers one shared limit through Redis.

    python -m tests.integration.redis_hammer URL PREFIX START STOP REQUESTS PER_SECONDS BURST

From wall-clock START to STOP, 16 coroutines call `check_all` back to back, each with
the shared key and one of its own (so all-or-nothing is exercised too). Prints one JSON
line: attempts, admitted, errors, and the wall-clock times of the first and last call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.protocols import BackendUnavailable, LimitCheck
from portcullis.traffic.redis_backend import RedisConnection, RedisRateBackend


async def main(url: str, prefix: str, start: float, stop: float, spec: RateLimitSpec) -> dict[str, float]:
    conn = RedisConnection(RedisConfig(url=url, key_prefix=prefix, timeout_ms=2000, connect_timeout_ms=2000,
                                       pool_timeout_ms=2000))
    rates = RedisRateBackend(conn)
    roomy = RateLimitSpec(10**9, 1, 10**9)
    await conn.ping()
    counts = {"attempts": 0, "admitted": 0, "errors": 0}
    span = {"first": 0.0, "last": 0.0}

    async def worker(i: int) -> None:
        checks = [LimitCheck("shared", spec), LimitCheck(f"own:{os.getpid()}:{i}", roomy)]
        while time.time() < stop:
            if not span["first"]:
                span["first"] = time.time()
            try:
                d = await rates.check_all(checks)
            except BackendUnavailable:
                counts["errors"] += 1
                continue
            counts["attempts"] += 1
            counts["admitted"] += d[0].allowed and d[1].allowed

    await asyncio.sleep(max(0.0, start - time.time()))
    await asyncio.gather(*(worker(i) for i in range(16)))
    span["last"] = time.time()
    await rates.close()
    await conn.close()
    return {**counts, **span}


if __name__ == "__main__":
    url, prefix, start, stop, requests, per_seconds, burst = sys.argv[1:8]
    spec = RateLimitSpec(int(requests), float(per_seconds), int(burst))
    print(json.dumps(asyncio.run(main(url, prefix, float(start), float(stop), spec))))
