"""Abuse control across nodes (`portcullis.traffic.abuse_shared`): refusals from one
source are counted in Redis whichever node answered them, and the block one node earns
is enforced by every node. Real servers: the shared Redis (database 15, a fresh key
prefix per test) and, for the outage, a throwaway redis-server of the test's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from portcullis.traffic.abuse import AbuseConfig, AbuseGuard
from portcullis.traffic.abuse_shared import SharedAbuse
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.redis_backend import RedisConnection
from tests.integration.redis_harness import ThrowawayRedis, shared_redis_url, unique_prefix

pytestmark = pytest.mark.services

CFG = {"threshold": 4, "window_seconds": 60, "block_seconds": 30, "max_block_seconds": 3600}
SOURCE = "203.0.113.9"


class Node:
    """One gateway's abuse guard with its share, on its own connection (its own pool)."""

    def __init__(self, url: str, prefix: str, **cfg: object) -> None:
        self.conn = RedisConnection(RedisConfig(url=url, key_prefix=prefix, timeout_ms=500, connect_timeout_ms=500,
                                                pool_timeout_ms=500))
        self.guard = AbuseGuard(AbuseConfig.model_validate({**CFG, **cfg}))
        self.share = SharedAbuse(self.guard, self.conn, probe_interval=0.2, ping_interval=0.2)

    async def start(self) -> None:
        self.share.start()
        async with asyncio.timeout(5):
            await self.share.channel.wait_ready()

    async def refuse(self, n: int, ip: str = SOURCE, status: int = 401) -> None:
        for _ in range(n):
            self.guard.record(ip, status)
        await settle(self.share)

    async def close(self) -> None:
        await self.share.close()
        await self.conn.close()


async def settle(share: SharedAbuse) -> None:
    """Wait for the counts in flight."""
    while share._pending:
        await asyncio.gather(*list(share._pending), return_exceptions=True)


async def eventually(cond: Callable[[], bool], timeout: float = 2.0) -> float:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node]]:
    url, prefix = shared_redis_url(), unique_prefix()
    a, b = Node(url, prefix), Node(url, prefix)
    await a.start()
    await b.start()
    yield a, b
    await a.close()
    await b.close()


async def test_refusals_on_both_nodes_add_up_and_the_block_reaches_both(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await a.refuse(2)
    await b.refuse(2)  # four in all: the threshold, not past it
    assert a.guard.blocked_for(SOURCE) == b.guard.blocked_for(SOURCE) == 0.0
    await a.refuse(1)  # the fifth, on a: a blocks at once
    assert a.guard.blocked_for(SOURCE) == pytest.approx(30, abs=0.5)
    took = await eventually(lambda: b.guard.blocked_for(SOURCE) > 0)  # b hears it on the channel
    assert took < 1.0
    assert b.guard.blocked_for(SOURCE) == pytest.approx(30, abs=1.0)
    assert a.guard.blocked_for("203.0.113.10") == b.guard.blocked_for("203.0.113.10") == 0.0
    assert a.share.local_counts == b.share.local_counts == 0


async def test_a_block_earned_again_soon_escalates_on_every_node() -> None:
    url, prefix = shared_redis_url(), unique_prefix()
    a, b = Node(url, prefix, block_seconds=0.3, max_block_seconds=1.0), Node(url, prefix, block_seconds=0.3,
                                                                             max_block_seconds=1.0)
    await a.start()
    await b.start()
    try:
        await a.refuse(5)
        await eventually(lambda: b.guard.blocked_for(SOURCE) > 0)
        await asyncio.sleep(0.35)  # the first block (0.3 s) is over
        assert a.guard.blocked_for(SOURCE) == b.guard.blocked_for(SOURCE) == 0.0
        await b.refuse(1)  # the bucket is still full: this one earns the next block, twice as long
        assert b.guard.blocked_for(SOURCE) == pytest.approx(0.6, abs=0.1)
        await eventually(lambda: a.guard.blocked_for(SOURCE) > 0.4)
    finally:
        await a.close()
        await b.close()


async def test_a_node_that_starts_later_enforces_the_blocks_in_force() -> None:
    url, prefix = shared_redis_url(), unique_prefix()
    a = Node(url, prefix)
    await a.start()
    try:
        await a.refuse(5)
        late = Node(url, prefix)
        await late.start()
        try:
            await eventually(lambda: late.guard.blocked_for(SOURCE) > 0)
            assert late.guard.blocked_for(SOURCE) == pytest.approx(30, abs=1.0)
        finally:
            await late.close()
    finally:
        await a.close()


async def test_exempt_and_unwatched_answers_are_not_counted(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    exempt = Node(a.conn.cfg.url, a.conn.prefix, exempt=["203.0.113.0/24"])
    await exempt.refuse(10)
    await a.refuse(10, status=404)
    await a.refuse(10, status=200)
    assert exempt.guard.blocked_for(SOURCE) == a.guard.blocked_for(SOURCE) == 0.0
    await exempt.conn.close()


async def test_redis_down_falls_back_to_counting_per_node_and_comes_back(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    server = ThrowawayRedis(tmp_path)
    server.start()
    node = Node(server.url, unique_prefix())
    try:
        await node.start()
        server.stop()
        with caplog.at_level(logging.ERROR, logger="portcullis.traffic"):
            await node.refuse(1)  # fails over: counted locally, alert logged once
            await node.refuse(4)  # within the probe interval: locally at once
        assert node.guard.blocked_for(SOURCE) > 0  # five local refusals: blocked by this node alone
        assert node.share.local_counts >= 5
        assert sum("ALERT abuse control" in r.getMessage() for r in caplog.records) == 1
        server.start()
        await asyncio.sleep(0.25)  # past the probe interval: the next count goes to Redis again
        before = node.share.local_counts
        await node.refuse(1, ip="198.51.100.7")
        assert node.share.local_counts == before
    finally:
        await node.close()
        server.stop()
