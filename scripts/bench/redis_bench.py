"""Rate-limit decisions per second through Redis from ONE worker (one process, one loop).

A decision is one `RedisRateBackend.check_all` call (one request, `--keys` limits at
once), timed from the call to its answer. `--concurrency` coroutines run back to back
for `--seconds`; concurrent calls share script calls (automatic pipelining), so
throughput grows with concurrency while latency stays one round trip plus the wait.

    PYTHONPATH=src .venv/bin/python scripts/bench/redis_bench.py \
        --url redis://127.0.0.1:6379/0 --concurrency 32 --seconds 5 --keys 2

Prints decisions/s and latency percentiles. `--max-batch 1` switches the pipelining
off (one script call per decision) for comparison. Uses uvloop when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.protocols import LimitCheck
from portcullis.traffic.redis_backend import RedisConnection, RedisRateBackend


async def run(args: argparse.Namespace) -> dict[str, float]:
    cfg = RedisConfig(url=args.url, key_prefix=f"bench{secrets.token_hex(4)}:", pool_size=args.pool,
                      timeout_ms=1000, connect_timeout_ms=1000, pool_timeout_ms=1000)
    conn = RedisConnection(cfg)
    backend = RedisRateBackend(conn, max_batch=args.max_batch, max_inflight=args.max_inflight)
    # Generous limits: the benchmark measures deciding, and every decision is a write.
    spec = RateLimitSpec(10**9, 1.0, 10**9)
    tenants = [f"tenant{i}" for i in range(16)]
    latencies: list[int] = []
    admitted = 0
    stop_at = 0.0

    async def worker(n: int) -> None:
        nonlocal admitted
        checks = [LimitCheck(f"cred{n}", spec)] + [LimitCheck(f"{tenants[n % 16]}:{k}", spec)
                                                   for k in range(args.keys - 1)]
        clock = time.perf_counter_ns
        lat = latencies
        while time.perf_counter() < stop_at:
            t0 = clock()
            d = await backend.check_all(checks)
            lat.append(clock() - t0)
            admitted += d[0].allowed

    # Warm up: connections, script load.
    await asyncio.gather(*(backend.check_all([LimitCheck("warm", spec)]) for _ in range(args.concurrency)))
    stop_at = time.perf_counter() + args.seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
    elapsed = time.perf_counter() - t0
    await backend.close()
    await conn.close()
    latencies.sort()
    n = len(latencies)

    def pct(p: float) -> float:
        return latencies[min(n - 1, int(n * p))] / 1e6

    return {"decisions": n, "seconds": elapsed, "per_second": n / elapsed, "admitted": admitted,
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": latencies[-1] / 1e6,
            "mean_ms": statistics.fmean(latencies) / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--keys", type=int, default=2, help="limits checked per decision (1 = credential only)")
    ap.add_argument("--max-batch", type=int, default=128, help="requests per script call (1 = no pipelining)")
    ap.add_argument("--max-inflight", type=int, default=2, help="script calls in flight at once")
    ap.add_argument("--pool", type=int, default=8)
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    if not args.no_uvloop:
        try:
            import uvloop
            uvloop.install()
        except ImportError:
            pass
    r = asyncio.run(run(args))
    print(f"concurrency={args.concurrency} keys/decision={args.keys} max_batch={args.max_batch} "
          f"max_inflight={args.max_inflight}")
    print(f"{r['decisions']:.0f} decisions in {r['seconds']:.2f} s = {r['per_second']:,.0f} decisions/s "
          f"(admitted {r['admitted']:.0f})")
    print(f"latency ms: p50 {r['p50_ms']:.3f}  p90 {r['p90_ms']:.3f}  p99 {r['p99_ms']:.3f}  "
          f"max {r['max_ms']:.3f}  mean {r['mean_ms']:.3f}")


if __name__ == "__main__":
    main()
