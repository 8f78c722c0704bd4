"""Abuse control: repeated refusals from one source earn a temporary denial.

Each answer with a watched status (401, 403, 429 by default) counts against its
source — the client address, IPv6 addresses grouped by prefix (/64 by default, what
one host usually gets) — in a GCRA bucket of `threshold` per `window_seconds`. The
refusal that overflows the bucket blocks the source for `block_seconds`; a block
that is earned again while the previous one has not long expired doubles, up to
`max_block_seconds`.

Memory is bounded: the counting buckets by `max_sources` (GCRA sweeps refilled ones
first), the blocks by `max_sources` too (when full, the tenth closest to their end go).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.storage.protocols import RateLimitSpec
from portcullis.traffic.gcra import MemoryGcra


class AbuseConfig(BaseModel):
    """`traffic.abuse`: when a source is refused for a while, and how it is told."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    statuses: list[int] = Field(default_factory=lambda: [401, 403, 429], min_length=1)
    threshold: int = Field(default=30, ge=1, le=1_000_000)
    window_seconds: float = Field(default=60, gt=0, le=86_400)
    block_seconds: float = Field(default=300, gt=0, le=86_400)
    max_block_seconds: float = Field(default=3600, gt=0, le=7 * 86_400)
    status: Literal[403, 429] = 429
    ipv6_prefix: int = Field(default=64, ge=32, le=128)
    exempt: list[str] = Field(default_factory=list)  # CIDRs never blocked (monitoring, own proxies)
    max_sources: int = Field(default=100_000, ge=100, le=10_000_000)

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, v: list[int]) -> list[int]:
        for s in v:
            if not 400 <= s <= 499:
                raise ValueError(f"{s} is not a 4xx status (server errors are not the client's doing)")
        return v

    @field_validator("exempt")
    @classmethod
    def _exempt(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"{c!r} is not an IP network (CIDR)") from None
        return v


class AbuseShare(Protocol):
    """Where a node's refusals are counted when several nodes share abuse control."""

    def count(self, src: str) -> bool:
        """Take one refusal of `src` for shared counting (answered asynchronously); False
        if it cannot (the shared store is down or backed up): count it locally then."""
        ...


class AbuseGuard:
    """Counts refusals per source and answers whether a source is blocked.

    All methods take epoch-free monotonic `now` from `clock`; single event loop, no locks.
    """

    def __init__(self, cfg: AbuseConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = cfg
        # Several nodes: refusals are counted (and blocks earned) in Redis instead, and
        # blocks arrive from every node (`portcullis.traffic.abuse_shared`).
        self.share: AbuseShare | None = None
        self._clock = clock
        self._statuses = frozenset(cfg.statuses)
        self._spec = RateLimitSpec(cfg.threshold, cfg.window_seconds, cfg.threshold)
        self._counts = MemoryGcra(max_keys=cfg.max_sources)
        # source -> (blocked until, current block length); insertion order ≈ end order.
        self._blocks: dict[str, tuple[float, float]] = {}
        self._exempt = [ipaddress.ip_network(c, strict=False) for c in cfg.exempt]

    @property
    def statuses(self) -> frozenset[int]:
        return self._statuses

    def source(self, client_ip: str) -> str:
        """The source key of an address: IPv6 grouped by `ipv6_prefix`, else the address."""
        if ":" not in client_ip:
            return client_ip
        try:
            net = ipaddress.IPv6Network((client_ip, self._cfg.ipv6_prefix), strict=False)
        except ValueError:
            return client_ip
        return str(net)

    def blocked_for(self, client_ip: str) -> float:
        """Seconds the source of `client_ip` stays blocked (0.0: not blocked)."""
        if not self._blocks:
            return 0.0
        entry = self._blocks.get(self.source(client_ip))
        if entry is None:
            return 0.0
        left = entry[0] - self._clock()
        return left if left > 0 else 0.0

    def record(self, client_ip: str, status: int) -> bool:
        """Count an answer to `client_ip`; True if this answer earned the source a block
        here and now (with a `share`, the count goes to Redis and the block, if earned,
        arrives a moment later: False)."""
        if status not in self._statuses or self._is_exempt(client_ip):
            return False
        src = self.source(client_ip)
        if self.share is not None and self.share.count(src):
            return False
        return self.count_locally(src)

    def count_locally(self, src: str) -> bool:
        """Count one refusal of source `src` in this process (no share, or it is down)."""
        now = self._clock()
        if self._counts.check(src, self._spec, now).allowed:
            return False
        prev = self._blocks.get(src)
        length = self._cfg.block_seconds
        if prev is not None and now < prev[0] + prev[1]:
            # Blocked again soon after the last block ended (or still in it): escalate.
            length = min(self._cfg.max_block_seconds, prev[1] * 2)
        self.block(src, length)
        return True

    def block(self, src: str, length: float) -> None:
        """Block source `src` for `length` seconds from now (a longer block in force stays)."""
        now = self._clock()
        prev = self._blocks.pop(src, None)
        until = now + length
        if prev is not None and prev[0] > until:
            until, length = prev
        if len(self._blocks) >= self._cfg.max_sources:
            self._evict(now)
        self._blocks[src] = (until, length)

    @property
    def config(self) -> AbuseConfig:
        return self._cfg

    def _is_exempt(self, client_ip: str) -> bool:
        if not self._exempt:
            return False
        try:
            addr = ipaddress.ip_address(client_ip)
        except ValueError:
            return False
        return any(addr in net for net in self._exempt)

    def _evict(self, now: float) -> None:
        # Forget blocks (and their escalation memory) that ended a block-length ago.
        for k in [k for k, (until, length) in self._blocks.items() if until + length <= now]:
            del self._blocks[k]
        if len(self._blocks) >= self._cfg.max_sources:
            # Still full: drop the tenth closest to ending, in one pass (not one scan per block).
            for k in sorted(self._blocks, key=lambda k: self._blocks[k][0])[: max(1, len(self._blocks) // 10)]:
                del self._blocks[k]
