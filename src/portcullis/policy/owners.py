"""Object-level authorization (BOLA): who owns the resource a request names.

A route with ``policy.resources.<route>.owner`` asks an owner source before the decision;
the answer becomes the Cedar resource's ``owner`` and ``tenant`` (see `mapping`), so
another user's or another tenant's ``projects/{id}`` is refused whatever the scopes.

Sources:

``table``
    A SQLite table (``resource_id -> owner, tenant``, optionally per resource type) or a
    static YAML map. Read on every lookup, so a change is seen at once.
``upstream``
    ``GET <url>`` with ``{type}``, ``{id}``, ``{tenant}`` percent-encoded into it, answering
    JSON ``{"owner": "...", "tenant": "..."}``; 404 means no such resource. Answers (also
    404s) are cached for ``cache_seconds`` in a bounded LRU. A timeout, a connection
    failure, another status or a malformed body raises `OwnerLookupError`: fail closed.
``header``
    The upstream's response names the owner in a header. Known only after the upstream
    answered, so it can guard only safe methods (GET, HEAD, OPTIONS): the gateway decides
    again on the response and replaces a denied one. Writes need ``table`` or ``upstream``.

Contract: ``lookup`` returns the owner, or None when the source has no record of the
resource; it raises `OwnerLookupError` when it cannot tell (callers deny).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote, urlsplit

import sqlalchemy as sa
import yaml

from portcullis.policy.config import (
    HeaderOwnerSourceConfig,
    OwnerEntry,
    TableOwnerSourceConfig,
    UpstreamOwnerSourceConfig,
)
from portcullis.storage.engine import StorageConfig, make_engine, sqlite_file_url
from portcullis.upstream_client import Pool, PoolConfig, UpstreamError

MAX_ID_BYTES = 512
MAX_ANSWER_BYTES = 16 * 1024
MAX_MAP_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Owner:
    """Who owns a resource, and the tenant it belongs to (None: the source does not say)."""

    owner: str
    tenant: str | None = None


class OwnerLookupError(Exception):
    """The owner source could not answer; the request must be denied."""


class OwnerSource(Protocol):
    """Where a route's resource owners come from."""

    #: True when the owner is known only from the upstream's response (``header``).
    deferred: ClassVar[bool]

    async def lookup(self, resource_type: str, resource_id: str, tenant: str | None) -> Owner | None:
        """The owner of the resource; None if unknown; `OwnerLookupError` if unanswerable."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def _valid(s: object, limit: int = 256) -> bool:
    return isinstance(s, str) and 0 < len(s) <= limit and s.isprintable()


class StaticOwnerSource:
    """Owners from a fixed map (``entries`` or a YAML ``file``)."""

    deferred: ClassVar[bool] = False

    def __init__(self, entries: dict[str, Owner]) -> None:
        self._entries = dict(entries)

    @staticmethod
    def from_yaml(path: Path) -> StaticOwnerSource:
        """Read ``{resource_id: {owner, tenant}}``; ValueError naming the entry on bad input."""
        raw = path.read_bytes()
        if len(raw) > MAX_MAP_FILE_BYTES:
            raise ValueError(f"{path}: larger than {MAX_MAP_FILE_BYTES} bytes")
        doc = yaml.safe_load(raw) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of resource id -> {{owner, tenant}}")
        entries: dict[str, Owner] = {}
        for key, value in doc.items():
            try:
                e = OwnerEntry.model_validate(value)
            except ValueError as exc:
                raise ValueError(f"{path}: entry {key!r}: {exc}") from None
            entries[str(key)] = Owner(e.owner, e.tenant)
        return StaticOwnerSource(entries)

    async def lookup(self, resource_type: str, resource_id: str, tenant: str | None) -> Owner | None:
        return self._entries.get(resource_id)

    async def close(self) -> None:
        return None


class SqlOwnerSource:
    """Owners from a database table (SQLite or PostgreSQL), read (SQLAlchemy Core) in a
    worker thread on each lookup. PostgreSQL gets the storage engine's settings: a pool,
    connect and statement timeouts, so a slow database fails the lookup (closed) instead
    of holding the request."""

    deferred: ClassVar[bool] = False

    def __init__(self, cfg: TableOwnerSourceConfig, url: str | sa.URL) -> None:
        u = sa.make_url(url)
        if u.get_backend_name() == "sqlite":
            # Plain: the file is the operator's; no pragmas of ours (WAL) are left on it.
            self._engine = sa.create_engine(u)
        else:
            self._engine = make_engine(u, StorageConfig(connect_timeout_seconds=2, statement_timeout_seconds=2,
                                                        pool_timeout_seconds=2), application_name="portcullis-owners")
        md = sa.MetaData()
        cols = [sa.Column(cfg.id_column, sa.Text), sa.Column(cfg.owner_column, sa.Text)]
        if cfg.tenant_column:
            cols.append(sa.Column(cfg.tenant_column, sa.Text))
        if cfg.type_column:
            cols.append(sa.Column(cfg.type_column, sa.Text))
        self._table = sa.Table(cfg.table, md, *cols)
        self._cfg = cfg

    def _query(self, resource_type: str, resource_id: str) -> Owner | None:
        t, cfg = self._table, self._cfg
        sel = [t.c[cfg.owner_column]] + ([t.c[cfg.tenant_column]] if cfg.tenant_column else [])
        q = sa.select(*sel).where(t.c[cfg.id_column] == resource_id).limit(2)
        if cfg.type_column:
            q = q.where(t.c[cfg.type_column] == resource_type)
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(q).all()
        except sa.exc.SQLAlchemyError as exc:
            raise OwnerLookupError(f"owner table unavailable: {type(exc).__name__}") from None
        if not rows:
            return None
        if len(rows) > 1:  # ambiguous ownership: refuse rather than pick one
            raise OwnerLookupError("owner table has several rows for this resource")
        owner = rows[0][0]
        tenant = rows[0][1] if cfg.tenant_column else None
        if not _valid(owner) or (tenant is not None and not _valid(tenant)):
            raise OwnerLookupError("owner table row is malformed")
        return Owner(owner, tenant)

    async def lookup(self, resource_type: str, resource_id: str, tenant: str | None) -> Owner | None:
        if len(resource_id.encode()) > MAX_ID_BYTES:
            return None
        return await asyncio.to_thread(self._query, resource_type, resource_id)

    async def close(self) -> None:
        self._engine.dispose()


@dataclass(slots=True)
class _Cached:
    owner: Owner | None
    until: float


class UpstreamOwnerSource:
    """Owners from an HTTP service; `open()` inside the event loop before use."""

    deferred: ClassVar[bool] = False

    def __init__(self, cfg: UpstreamOwnerSourceConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._clock = clock
        u = urlsplit(cfg.url)
        assert u.hostname is not None
        self._host = u.netloc.encode()
        self._target = (u.path or "/") + ("?" + u.query if u.query else "")
        self._pool_cfg = PoolConfig(u.hostname, u.port or (443 if u.scheme == "https" else 80),
                                    ssl.create_default_context() if u.scheme == "https" else None,
                                    16, 30.0, cfg.timeout_seconds)
        self._pool: Pool | None = None
        self._cache: OrderedDict[tuple[str, str, str | None], _Cached] = OrderedDict()
        self.calls = 0

    def open(self) -> None:
        self._pool = Pool(self._pool_cfg)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def target(self, resource_type: str, resource_id: str, tenant: str | None) -> bytes:
        """The request target with every placeholder percent-encoded (no '/' survives)."""
        t = self._target
        for k, v in (("{type}", resource_type), ("{id}", resource_id), ("{tenant}", tenant or "")):
            t = t.replace(k, quote(v, safe=""))
        return t.encode("ascii")

    async def lookup(self, resource_type: str, resource_id: str, tenant: str | None) -> Owner | None:
        if len(resource_id.encode()) > MAX_ID_BYTES:
            return None
        for v in (resource_id, tenant or "x"):
            # Encoded, these cannot change the path; but servers that decode %2F before
            # routing exist, so an id that would traverse is refused outright.
            if v in (".", "..") or "/" in v or "\\" in v or not v.isprintable():
                raise OwnerLookupError("resource id not allowed in an owner lookup")
        key = (resource_type, resource_id, tenant)
        now = self._clock()
        hit = self._cache.get(key)
        if hit is not None and now < hit.until:
            self._cache.move_to_end(key)
            return hit.owner
        owner = await self._ask(self.target(resource_type, resource_id, tenant))
        if self.cfg.cache_size and self.cfg.cache_seconds:
            self._cache[key] = _Cached(owner, now + self.cfg.cache_seconds)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cfg.cache_size:
                self._cache.popitem(last=False)
        return owner

    def forget(self) -> None:
        """Drop cached answers (an operator said ownership changed)."""
        self._cache.clear()

    async def _ask(self, target: bytes) -> Owner | None:
        if self._pool is None:
            raise OwnerLookupError("owner source not opened")
        self.calls += 1
        headers = [(b"host", self._host), (b"accept", b"application/json")]
        resp = None
        try:
            async with asyncio.timeout(self.cfg.timeout_seconds):
                resp = await self._pool.request("GET", target, headers, None,
                                                read_timeout=self.cfg.timeout_seconds,
                                                total_timeout=self.cfg.timeout_seconds)
                body = await resp.read(MAX_ANSWER_BYTES)
        except (UpstreamError, TimeoutError):
            if resp is not None:
                resp.release()  # closes a half-read connection
            raise OwnerLookupError("owner source unavailable") from None
        if body is None:
            raise OwnerLookupError("owner answer too large")
        if resp.status == 404:
            return None
        if resp.status != 200:
            raise OwnerLookupError(f"owner source answered {resp.status}")
        try:
            doc: Any = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict) or not _valid(doc.get("owner")):
            raise OwnerLookupError("owner answer is malformed")
        tenant = doc.get("tenant")
        if tenant is not None and not _valid(tenant):
            raise OwnerLookupError("owner answer is malformed")
        return Owner(doc["owner"], tenant)


class HeaderOwnerSource:
    """Owners from the upstream's response headers (safe methods only; see module doc)."""

    deferred: ClassVar[bool] = True

    def __init__(self, cfg: HeaderOwnerSourceConfig) -> None:
        self._owner = cfg.owner_header.lower().encode()
        self._tenant = cfg.tenant_header.lower().encode() if cfg.tenant_header else None

    async def lookup(self, resource_type: str, resource_id: str, tenant: str | None) -> Owner | None:
        """Unknown before the response: always None (use `from_headers` on the response)."""
        return None

    def from_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> Owner | None:
        """The owner the response names; None if absent. A repeated or malformed header
        raises `OwnerLookupError` (an upstream must not be ambiguous about ownership)."""
        owners: list[bytes] = []
        tenants: list[bytes] = []
        for k, v in headers:
            name = k.lower()
            if name == self._owner:
                owners.append(v)
            elif self._tenant is not None and name == self._tenant:
                tenants.append(v)
        if not owners:
            return None
        if len(owners) > 1 or len(tenants) > 1:
            raise OwnerLookupError("owner header repeated")
        try:
            owner = owners[0].decode("ascii").strip()
            tenant = tenants[0].decode("ascii").strip() if tenants else None
        except UnicodeDecodeError:
            raise OwnerLookupError("owner header is not ASCII") from None
        if not _valid(owner) or (tenant is not None and not _valid(tenant)):
            raise OwnerLookupError("owner header is malformed")
        return Owner(owner, tenant)

    async def close(self) -> None:
        return None


AnyOwnerSource = StaticOwnerSource | SqlOwnerSource | UpstreamOwnerSource | HeaderOwnerSource


def build_owner_source(
    cfg: TableOwnerSourceConfig | UpstreamOwnerSourceConfig | HeaderOwnerSourceConfig, base_dir: Path,
) -> AnyOwnerSource:
    """The source a config describes; relative files are taken from ``base_dir``.
    An upstream source must be `open()`-ed inside the event loop."""
    if isinstance(cfg, UpstreamOwnerSourceConfig):
        return UpstreamOwnerSource(cfg)
    if isinstance(cfg, HeaderOwnerSourceConfig):
        return HeaderOwnerSource(cfg)
    if cfg.entries is not None:
        return StaticOwnerSource({k: Owner(e.owner, e.tenant) for k, e in cfg.entries.items()})
    if cfg.file is not None:
        p = Path(cfg.file)
        return StaticOwnerSource.from_yaml(p if p.is_absolute() else base_dir / p)
    if cfg.url is not None:
        return SqlOwnerSource(cfg, cfg.url)
    assert cfg.sqlite is not None
    p = Path(cfg.sqlite)
    return SqlOwnerSource(cfg, sqlite_file_url(p if p.is_absolute() else base_dir / p))
