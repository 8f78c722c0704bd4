"""Redis backends for many nodes: rate limits, quotas, replay caches, revocation fan-out.

They implement the contracts of `portcullis.traffic.protocols`:

- `RedisRateBackend`: GCRA over every key of a request in one Lua script
  (``lua/gcra.lua``), all or nothing, with the server's ``TIME`` as the clock so every
  node agrees. Requests that arrive in the same event-loop tick share one script call
  (automatic pipelining: one round trip for the lot, each request still decided on its
  own, as if alone).
- `RedisQuota`: a capped counter per key and period (``lua/quota.lua``), expiring when
  the period ends.
- `RedisReplayCache`: ``SET NX PX``; the value is stored as its SHA-256 only.
- `RedisRevocationBus`: a pub/sub channel; the listener reconnects by itself and, after
  a reconnect, calls the listeners once because messages may have been missed.

Scripts are sent by SHA (``EVALSHA``) and loaded on the first ``NOSCRIPT`` (a fresh or
restarted server), by redis-py's `AsyncScript`.

Every call has a strict budget (connect + pool wait + read timeouts, tens of ms by
default): a failure or a timeout raises `BackendUnavailable`, and the caller applies the
configured failure behaviour (`portcullis.traffic.failover`). Nothing here retries:
a retry would only spend the request's time budget twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import os
import random
import re
import secrets
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.config import RedisConfig
from portcullis.traffic.gcra import Decision
from portcullis.traffic.protocols import (
    BackendUnavailable,
    LimitCheck,
    QuotaDecision,
    RevocationListener,
)

log = logging.getLogger("portcullis.traffic.redis")

T = TypeVar("T")

_NAMESPACE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_PERIOD = re.compile(r"[A-Za-z0-9_-]{1,32}")


def lua_script(name: str) -> str:
    """The text of ``traffic/lua/<name>`` (package data)."""
    return (resources.files("portcullis.traffic") / "lua" / name).read_text(encoding="utf-8")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisConnection:
    """One client and connection pool, shared by every Redis backend of a node.

    The pool is blocking with a short wait (`pool_timeout_ms`): under a burst, a request
    waits briefly for a free connection rather than opening unbounded new ones.
    `call` puts an overall deadline on each command and maps every failure to
    `BackendUnavailable`.
    """

    def __init__(self, cfg: RedisConfig, *, password: str | None = None) -> None:
        self.cfg = cfg
        self.prefix = cfg.key_prefix
        extra: dict[str, Any] = {}
        if password is not None:
            extra["password"] = password
        self._pool = BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.pool_size,
            timeout=cfg.pool_timeout_ms / 1000,
            socket_connect_timeout=cfg.connect_timeout_ms / 1000,
            socket_timeout=cfg.timeout_ms / 1000,
            # No retries: the budget is the timeouts; the failure path decides.
            retry=Retry(NoBackoff(), 0),
            client_name="portcullis",
            **extra,
        )
        self.client = Redis(connection_pool=self._pool)
        # The whole budget of one command: waiting for a connection, connecting, reading.
        self.deadline = (cfg.pool_timeout_ms + cfg.connect_timeout_ms + cfg.timeout_ms) / 1000

    @classmethod
    def from_config(cls, cfg: RedisConfig) -> RedisConnection:
        """Build from config, reading the password from `cfg.password_env` if named.

        Raises `ValueError` (naming the variable, never its value) if it is not set."""
        password = None
        if cfg.password_env is not None:
            password = os.environ.get(cfg.password_env)
            if password is None:
                raise ValueError(f"redis.password_env: environment variable {cfg.password_env} is not set")
        return cls(cfg, password=password)

    def key(self, *parts: str) -> str:
        """A key under this node's prefix."""
        return self.prefix + ":".join(parts)

    async def call(self, what: str, aw: Awaitable[T]) -> T:
        """Await one Redis operation within the deadline; `BackendUnavailable` on any failure."""
        try:
            async with asyncio.timeout(self.deadline):
                return await aw
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendUnavailable(f"redis {what}: {_describe(exc)} ({self.cfg.display_url()})") from exc

    async def ping(self) -> None:
        """Raise `BackendUnavailable` unless the server answers."""
        await self.call("ping", self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()
        await self._pool.disconnect()


_MAX_SCRIPT_KEYS = 4000
_MAX_CHECKS = 100
_Pending = tuple[Sequence[LimitCheck], "asyncio.Future[list[Decision]]"]


class RedisRateBackend:
    """`RateBackend` on Redis: every request's checks in one GCRA script call.

    Concurrent calls made in the same event-loop tick are batched into one script call
    of at most `max_batch` requests (one round trip for all of them); the script decides
    them one after another, each all or nothing, so batching changes throughput, never
    outcomes. A failed call fails every request of its batch with `BackendUnavailable`.
    """

    def __init__(self, conn: RedisConnection, *, max_batch: int | None = None,
                 max_inflight: int | None = None) -> None:
        self._conn = conn
        self._max_inflight = max_inflight or conn.cfg.max_inflight
        self._script = conn.client.register_script(lua_script("gcra.lua"))
        self._max_batch = max_batch or conn.cfg.max_batch
        self._queue: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        # Interval and tolerance in microseconds, per spec (specs are few and frozen).
        self._spec_args: dict[RateLimitSpec, bytes] = {}
        self._prefix = (conn.prefix + "rl:").encode()

    async def check_all(self, checks: Sequence[LimitCheck]) -> list[Decision]:
        if not checks:
            return []
        if self._closed:
            raise BackendUnavailable("redis rate backend is closed")
        if len(checks) > _MAX_CHECKS:
            raise ValueError(f"at most {_MAX_CHECKS} checks per request")
        for c in checks:
            if c.cost < 0:
                raise ValueError("cost must be >= 0")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Decision]] = loop.create_future()
        self._queue.append((checks, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await fut

    def _flush(self) -> None:
        self._scheduled = False
        if len(self._tasks) >= self._max_inflight and not self._closed:
            return  # the next batch to finish flushes the queue (`_done`): bigger batches
        queue, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        start, n_keys = 0, 0
        for i, (checks, _) in enumerate(queue):
            # A batch ends at `max_batch` requests or before passing _MAX_SCRIPT_KEYS keys
            # (Lua's unpack() of KEYS has a stack limit).
            if i > start and (i - start >= self._max_batch or n_keys + len(checks) > _MAX_SCRIPT_KEYS):
                self._spawn(loop, queue[start:i])
                start, n_keys = i, 0
            n_keys += len(checks)
        self._spawn(loop, queue[start:])

    def _spawn(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        task = loop.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._queue and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _args(self, spec: RateLimitSpec) -> bytes:
        got = self._spec_args.get(spec)
        if got is None:
            interval = spec.per_seconds * 1_000_000 / spec.requests
            got = f"{interval!r} {interval * spec.burst!r}".encode()
            if len(self._spec_args) < 10_000:
                self._spec_args[spec] = got
        return got

    async def _run(self, batch: list[_Pending]) -> None:
        # Keys go in KEYS as the scripting contract asks; the numbers travel as one
        # space-separated argument (encoding four arguments per check was most of the
        # client's work per decision).
        keys: list[bytes] = []
        nums: list[bytes] = [b"%d" % len(batch)]
        prefix = self._prefix
        spec_args = self._args
        for checks, _ in batch:
            nums.append(b"%d" % len(checks))
            for c in checks:
                keys.append(prefix + c.key.encode())
                nums.append(spec_args(c.spec))
                nums.append(b"%d" % c.cost)
        args = [b" ".join(nums)]
        try:
            raw: Any = await self._conn.call("rate check", self._script(keys, args))
            if not isinstance(raw, list) or len(raw) != 4 * len(keys):
                raise BackendUnavailable("redis rate check: unexpected reply from the script")
        except BackendUnavailable as exc:
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(BackendUnavailable(*exc.args))
            return
        except BaseException as exc:  # cancelled on close, or a bug: never leave a caller hanging
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(BackendUnavailable(f"redis rate check: {_describe(exc)}"))
            raise
        i = 0
        for checks, fut in batch:
            out: list[Decision] = []
            for _ in checks:
                out.append(Decision(raw[i] == 1, int(raw[i + 1]), raw[i + 2] / 1e6, raw[i + 3] / 1e6))
                i += 4
            if not fut.done():  # the caller may have given up (cancelled) meanwhile
                fut.set_result(out)

    async def close(self) -> None:
        """Stop taking calls and wait for the ones in flight (the connection is the owner's)."""
        self._closed = True
        if self._queue:
            self._flush()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class RedisQuota:
    """`QuotaBackend` on Redis: one capped ``INCRBY`` per call, in a script.

    A negative `cost` gives back what an earlier call counted (the limit stage does so
    when another limit refused the same request); the count never goes below zero."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._script = conn.client.register_script(lua_script("quota.lua"))
        self._raise = conn.client.register_script(lua_script("quota_raise.lua"))

    async def consume(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1, *,
                      seed: int = 0) -> QuotaDecision:
        """`QuotaBackend.consume`; a counter that does not exist starts from `seed`
        (`portcullis.traffic.ledger` passes the last count known)."""
        return (await self.consume_seeded(key, period, limit, resets_at, cost, seed=seed))[0]

    async def consume_seeded(self, key: str, period: str, limit: int, resets_at: float, cost: int = 1, *,
                             seed: int = 0) -> tuple[QuotaDecision, bool]:
        """`consume`, and whether the counter was missing and restored from `seed` (> 0)."""
        if limit < 0:
            raise ValueError("limit must be >= 0")
        if seed < 0:
            raise ValueError("seed must be >= 0")
        if not _PERIOD.fullmatch(period):
            raise ValueError("period: 1-32 ASCII letters, digits, '-', '_'")
        name = self._conn.key("q", period, key)
        raw: Any = await self._conn.call("quota", self._script([name], [limit, cost, int(resets_at * 1000), seed]))
        try:
            allowed, used, restored = int(raw[0]), int(raw[1]), int(raw[2])
        except (TypeError, ValueError, IndexError):
            raise BackendUnavailable("redis quota: unexpected reply from the script") from None
        return QuotaDecision(allowed == 1, used, limit, resets_at), restored == 1

    async def raise_to(self, key: str, period: str, floor: int) -> int:
        """Raise an existing counter to at least `floor` (expiry kept); the count after."""
        if not _PERIOD.fullmatch(period):
            raise ValueError("period: 1-32 ASCII letters, digits, '-', '_'")
        raw: Any = await self._conn.call("quota raise", self._raise([self._conn.key("q", period, key)], [floor]))
        return int(raw)

    async def close(self) -> None:
        return None


class RedisReplayCache:
    """`ReplayCache` on Redis: ``SET key 1 NX PX ttl``; first writer wins on every node.

    Values are stored as SHA-256 digests: keys stay short whatever the value, and the
    cache holds nothing an attacker could reuse."""

    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn

    async def first_use(self, namespace: str, value: str, ttl_seconds: float) -> bool:
        if not _NAMESPACE.fullmatch(namespace):
            raise ValueError("namespace: 1-64 ASCII letters, digits, '-', '_', '.'")
        digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
        ttl_ms = max(1, math.ceil(ttl_seconds * 1000))
        created = await self._conn.call("replay check",
                                        self._conn.client.set(self._conn.key("rp", namespace, digest), b"1",
                                                              nx=True, px=ttl_ms))
        return created is True

    async def close(self) -> None:
        return None


class RedisChannel:
    """One pub/sub channel, listened to by a background task that survives outages.

    `listen` starts the task (it needs a running event loop). The task subscribes, pings
    when idle to notice a dead or frozen server, and reconnects with capped exponential
    backoff. Subclasses get each message's data (`_message`) and every (re)subscription
    (`_subscribed`: messages published while the listener was away are lost by pub/sub).
    """

    def __init__(self, conn: RedisConnection, channel: str, *, ping_interval: float = 1.0,
                 max_backoff: float = 1.0) -> None:
        self._conn = conn
        self._channel = conn.key(channel)
        self._ping_interval = ping_interval
        self._max_backoff = max_backoff
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closing = False
        self.reconnects = 0  # how many times the listener lost and re-made its subscription
        self.received = 0  # messages received

    @property
    def connected(self) -> bool:
        """True while the listener holds a live subscription."""
        return self._ready.is_set()

    def listen(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen(), name=f"redis-channel-{self._channel}")

    async def wait_ready(self) -> None:
        """Wait until the listener is subscribed (bound it with `asyncio.timeout`)."""
        await self._ready.wait()

    async def _message(self, data: bytes) -> None:
        """One message's data (override)."""

    async def _subscribed(self, first: bool) -> None:
        """Called after every subscription; `first` is False after an outage (override)."""

    async def _listen(self) -> None:
        backoff = 0.05
        first = True
        loop = asyncio.get_running_loop()
        while not self._closing:
            pubsub = self._conn.client.pubsub(ignore_subscribe_messages=True)
            try:
                await self._conn.call("subscribe", pubsub.subscribe(self._channel))
                self._ready.set()
                if not first:
                    log.warning("%s: subscribed again after an outage", self._channel)
                await self._subscribed(first)
                first = False
                backoff = 0.05
                last_seen = loop.time()
                while not self._closing:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=self._ping_interval)
                    now = loop.time()
                    if msg is None:
                        if now - last_seen > 3 * self._ping_interval:
                            raise TimeoutError("no answer to pings")
                        await self._conn.call("ping", pubsub.ping())
                        continue
                    last_seen = now
                    if msg.get("type") == "message":
                        self.received += 1
                        data = msg.get("data")
                        await self._message(data if isinstance(data, bytes) else str(data).encode())
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, TimeoutError, BackendUnavailable) as exc:
                if self._ready.is_set() or self.reconnects == 0:  # once per outage, not per retry
                    log.error("%s: lost the subscription (%s); reconnecting", self._channel, _describe(exc))
                self._ready.clear()
                self.reconnects += 1
            finally:
                with contextlib.suppress(RedisError, OSError, TimeoutError):
                    await asyncio.wait_for(pubsub.aclose(), timeout=self._conn.deadline)  # type: ignore[no-untyped-call]
            if not self._closing:
                await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter, not a secret
                backoff = min(backoff * 2, self._max_backoff)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            # redis-py's `get_message` can swallow a cancellation that lands at the wrong
            # moment (seen here: the task stayed "cancelling" for good), so cancel until
            # the task ends; `_closing` also ends the loop at its next turn.
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=0.25)
            with contextlib.suppress(asyncio.CancelledError):
                task.result()
        self._ready.clear()


class RedisRevocationBus(RedisChannel):
    """`RevocationBus` on Redis pub/sub (`RedisChannel`). After every re-subscription it
    calls the listeners once: a spurious "changed" only costs them a re-read of the store.
    """

    def __init__(self, conn: RedisConnection, *, channel: str | None = None,
                 ping_interval: float = 1.0, max_backoff: float = 1.0) -> None:
        super().__init__(conn, channel or conn.cfg.revocation_channel, ping_interval=ping_interval,
                         max_backoff=max_backoff)
        self._listeners: list[RevocationListener] = []
        self._node = secrets.token_hex(8)

    async def publish(self) -> None:
        await self._conn.call("publish", self._conn.client.publish(self._channel, self._node))

    def subscribe(self, listener: RevocationListener) -> None:
        self._listeners.append(listener)
        self.listen()

    async def _message(self, data: bytes) -> None:
        await self._notify()

    async def _subscribed(self, first: bool) -> None:
        if not first:
            await self._notify()

    async def _notify(self) -> None:
        for listener in list(self._listeners):
            try:
                result = listener()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("revocation listener failed")


@dataclass
class RedisBackends:
    """Every Redis backend of one node over one connection pool; `close` closes all."""

    connection: RedisConnection
    rates: RedisRateBackend
    quotas: RedisQuota
    replay: RedisReplayCache
    revocations: RedisRevocationBus

    @classmethod
    def open(cls, cfg: RedisConfig) -> RedisBackends:
        """Build them (no I/O yet: connections open on first use)."""
        conn = RedisConnection.from_config(cfg)
        return cls(conn, RedisRateBackend(conn), RedisQuota(conn), RedisReplayCache(conn), RedisRevocationBus(conn))

    async def close(self) -> None:
        await self.revocations.close()
        await self.rates.close()
        await self.quotas.close()
        await self.replay.close()
        await self.connection.close()
