"""The `redis:` config section: where the shared Redis is and what to do when it is not.

Example::

    redis:
      url: redis://10.0.0.5:6379/0
      password_env: PORTCULLIS_REDIS_PASSWORD   # never put the password in the file kept in git
      connect_timeout_ms: 50
      timeout_ms: 50
      pool_size: 32
      key_prefix: "portcullis:"
      on_failure:
        limits: open        # or closed (the default): refuse with 503 while Redis is down
        nodes: 4            # fail-open: each node enforces 1/4 of every limit locally
        replay: closed      # the only choice: authentication never fails open

Errors name the exact path (``redis.on_failure.limits: ...``) through the gateway's
config loader, like every other section.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

_PREFIX = re.compile(r"[A-Za-z0-9_.:{}-]{0,64}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class RedisFailureConfig(BaseModel):
    """Per-concern behaviour while Redis is down or slower than the timeouts.

    - ``limits``: ``closed`` refuses limited requests with 503; ``open`` falls back to
      per-node local limits (each node enforcing ``1/nodes`` of every limit) and raises
      an alert. Quotas follow the same setting.
    - ``replay``: always ``closed``. A replay check that cannot be made refuses the
      credential (DESIGN.md: authentication never fails open).
    - ``probe_interval_ms``: after a failure, Redis is not asked again for this long
      (requests take the failure path at once instead of each waiting out a timeout);
      then one request probes it, and success ends the outage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    limits: Literal["open", "closed"] = "closed"
    nodes: int = Field(default=1, ge=1, le=10_000)
    replay: Literal["closed"] = "closed"
    probe_interval_ms: float = Field(default=1000, ge=10, le=60_000)

    @field_validator("replay", mode="before")
    @classmethod
    def _replay_closed(cls, v: object) -> object:
        if v != "closed":
            raise ValueError("replay caches always fail closed (authentication never fails open); "
                             "the only accepted value is 'closed'")
        return v


class RedisConfig(BaseModel):
    """Connection and failure settings shared by every Redis-backed traffic backend.

    Timeouts are strict on purpose: Redis answers in well under a millisecond, so a
    reply that takes tens of milliseconds means trouble, and the request should take
    the configured failure path rather than wait.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(default="redis://127.0.0.1:6379/0", repr=False)
    password_env: str | None = None
    connect_timeout_ms: float = Field(default=50, gt=0, le=60_000)
    timeout_ms: float = Field(default=50, gt=0, le=60_000)
    pool_size: int = Field(default=32, ge=1, le=10_000)
    pool_timeout_ms: float = Field(default=50, gt=0, le=60_000)
    key_prefix: str = "portcullis:"
    revocation_channel: str = Field(default="revocations", pattern=r"^[A-Za-z0-9_.:-]{1,100}$")
    max_batch: int = Field(default=128, ge=1, le=10_000)
    # Script calls in flight at once: 2 measured best on 2 cores (fewer, bigger batches;
    # docs/benchmarks.md), at 16 concurrent requests 25k decisions/s with p99 < 1 ms.
    max_inflight: int = Field(default=2, ge=1, le=1_000)
    on_failure: RedisFailureConfig = RedisFailureConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        # The message never repeats the URL: it may carry a password.
        parts = urlsplit(v)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError("expected a redis://, rediss:// or unix:// URL")
        if parts.scheme != "unix" and not parts.hostname:
            raise ValueError("the URL has no host")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("the URL's port is not a number in 0-65535") from None
        return v

    @field_validator("key_prefix")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.fullmatch(v):
            raise ValueError("0-64 of ASCII letters, digits and '_.:{}-'")
        return v

    @field_validator("password_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        if v is not None and not _ENV.fullmatch(v):
            raise ValueError("not an environment variable name")
        return v

    def display_url(self) -> str:
        """The URL with any password replaced by ``***``, for logs and errors."""
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        host = parts.hostname or ""
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
