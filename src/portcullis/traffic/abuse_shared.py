"""Abuse control across nodes: refusals counted in Redis, blocks told to every node.

With ``redis:`` each node hands every watched refusal (401/403/429 by default) to
`SharedAbuse.count`, which runs ``lua/abuse.lua`` in the background: one GCRA count per
source, shared by all nodes, and — when it overflows — a block, escalated as in one
process (`portcullis.traffic.abuse`), stored in Redis and published on a channel. Every
node listens on that channel and enforces the block locally, so the request path never
waits on Redis for it; a node that (re)subscribes reads the blocks in force first.

Failure behaviour: when Redis cannot be reached (or too many counts are in flight), a
refusal is counted by the node alone, as without ``redis:``, and an ALERT is logged once
per outage; a probe every `probe_interval` seconds finds out when Redis is back. Blocks
already received stay in force. The counting is a security control that degrades to
per-node, never off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from portcullis.traffic.abuse import AbuseGuard
from portcullis.traffic.protocols import BackendUnavailable
from portcullis.traffic.redis_backend import RedisChannel, RedisConnection, lua_script

log = logging.getLogger("portcullis.traffic")

CHANNEL = "abuse"
MAX_PENDING = 256  # counts in flight at once; past it, refusals are counted locally


class SharedAbuse:
    """The `AbuseShare` of a node: see the module doc. `start` inside the running loop."""

    def __init__(self, guard: AbuseGuard, conn: RedisConnection, *, probe_interval: float = 1.0,
                 max_pending: int = MAX_PENDING, ping_interval: float = 1.0) -> None:
        cfg = guard.config
        self._guard = guard
        self._conn = conn
        self._script = conn.client.register_script(lua_script("abuse.lua"))
        interval_us = cfg.window_seconds * 1_000_000 / cfg.threshold
        self._args: list[str | int] = [repr(interval_us), repr(interval_us * cfg.threshold),
                                       round(cfg.block_seconds * 1000), round(cfg.max_block_seconds * 1000),
                                       conn.key(CHANNEL)]
        self._probe_interval = probe_interval
        self._max_pending = max_pending
        self._pending: set[asyncio.Task[None]] = set()
        self._down_until = 0.0  # monotonic: while in the future, count locally
        self._down = False
        self.channel = _BlockChannel(self, conn, ping_interval=ping_interval)
        self.blocks_received = 0
        self.local_counts = 0

    def start(self) -> None:
        """Subscribe to the blocks channel and take counts from the guard from now on."""
        self.channel.listen()
        self._guard.share = self

    def count(self, src: str) -> bool:
        if time.monotonic() < self._down_until or len(self._pending) >= self._max_pending:
            self.local_counts += 1
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        task = loop.create_task(self._count(src))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return True

    async def _count(self, src: str) -> None:
        keys = [self._conn.key("abuse", "n", src), self._conn.key("abuse", "b", src)]
        try:
            raw: Any = await self._conn.call("abuse count", self._script(keys, [*self._args, src]))
            earned = int(raw[0]) == 1
            length_ms = int(raw[1]) if earned else 0
        except (BackendUnavailable, TypeError, ValueError, IndexError) as exc:
            if not self._down:
                self._down = True
                log.error("ALERT abuse control: Redis unavailable (%s); refusals counted per node until it is back",
                          exc)
            self._down_until = time.monotonic() + self._probe_interval
            self.local_counts += 1
            self._guard.count_locally(src)
            return
        if self._down:
            self._down = False
            log.warning("abuse control: Redis is back; refusals counted across nodes again")
        if earned:  # ours at once; the other nodes hear it on the channel
            self._guard.block(src, length_ms / 1000)

    def receive(self, length_ms: int, src: str) -> None:
        """A block another node (or this one) earned."""
        self.blocks_received += 1
        self._guard.block(src, length_ms / 1000)

    async def load_blocks(self) -> int:
        """Apply every block in force in Redis (after a (re)subscription); how many."""
        client = self._conn.client
        prefix = self._conn.key("abuse", "b", "")
        n = 0
        server = await self._conn.call("time", client.time())
        now_ms = int(server[0]) * 1000 + int(server[1]) // 1000
        async for key in client.scan_iter(match=prefix + "*", count=500):
            name = key.decode() if isinstance(key, bytes) else str(key)
            until = await self._conn.call("abuse block", client.hget(name, "until_ms"))
            if until is None:
                continue
            left = int(until) - now_ms
            if left > 0:
                self._guard.block(name[len(prefix):], left / 1000)
                n += 1
        return n

    async def close(self) -> None:
        if self._guard.share is self:
            self._guard.share = None
        await self.channel.close()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)


class _BlockChannel(RedisChannel):
    def __init__(self, owner: SharedAbuse, conn: RedisConnection, *, ping_interval: float) -> None:
        super().__init__(conn, CHANNEL, ping_interval=ping_interval)
        self._owner = owner

    async def _message(self, data: bytes) -> None:
        try:
            length, src = data.decode().split(" ", 1)
            self._owner.receive(int(length), src)
        except (UnicodeDecodeError, ValueError):
            log.warning("abuse channel: malformed message ignored")

    async def _subscribed(self, first: bool) -> None:
        try:
            n = await self._owner.load_blocks()
        except (BackendUnavailable, ValueError) as exc:
            log.error("abuse control: could not read the blocks in force (%s)", exc)
            return
        if n:
            log.info("abuse control: %d block(s) in force loaded from Redis", n)
