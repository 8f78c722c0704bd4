"""proxy: forward to the upstream (DESIGN.md, request path step 8).

Pooled keep-alive connections (aiohttp), connect/read/total timeouts, bodies streamed
with size bounds, retries only for idempotent methods (RFC 9110 §9.2.2) and only when
the request body could be replayed, hop-by-hop headers removed (RFC 9110 §7.6.1),
``X-Forwarded-For/Proto/Host`` set, and upstream failures mapped to 502/504 problems
that reveal nothing about the upstream.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import ClassVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, field_validator
from yarl import URL

from portcullis.exchange import Exchange, Headers, UpstreamResponse
from portcullis.netutil import TrustedProxies
from portcullis.problems import Problem

log = logging.getLogger("portcullis.proxy")

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, plus the
# fields the gateway itself sets or consumes.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
    b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
_REQUEST_DROP = HOP_BY_HOP | {
    b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
    b"forwarded", b"x-request-id", b"x-real-ip",
}
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key"})
# Response fields not passed back: hop-by-hop ones, `date` (the gateway's server sets its
# own; two would be invalid) and fields that only tell an attacker what runs upstream.
_RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server", b"x-powered-by"}
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Bodies up to this size are read whole before forwarding, which makes them replayable
# for retries; larger or chunked bodies are streamed.
BUFFER_LIMIT = 256 * 1024


class UpstreamConfig(BaseModel):
    """One upstream service."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str
    connect_timeout: float = Field(default=2.0, gt=0, le=60)
    read_timeout: float = Field(default=30.0, gt=0, le=600)
    total_timeout: float = Field(default=60.0, gt=0, le=3600)
    retries: int = Field(default=1, ge=0, le=5)
    pool_size: int = Field(default=100, ge=1, le=10_000)
    keepalive_seconds: float = Field(default=30.0, gt=0, le=3600)
    max_response_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    preserve_host: bool = False
    forward_credentials: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        u = URL(v)
        if u.scheme not in ("http", "https") or not u.host:
            raise ValueError("must be an absolute http:// or https:// URL")
        if u.query_string or u.fragment or u.user or u.password:
            raise ValueError("must not carry a query, fragment or credentials")
        return v.rstrip("/")


class BodyTooLargeError(Exception):
    """The client's body exceeded the bound while streaming."""


class ClientDisconnectedError(Exception):
    """The client went away before its body was read."""


class Upstream:
    """A pooled client for one upstream. Created inside the running event loop."""

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.base = cfg.url
        self.host_header = URL(cfg.url).raw_authority
        self.session: aiohttp.ClientSession | None = None
        self.timeout = aiohttp.ClientTimeout(
            total=cfg.total_timeout, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
        )

    def open(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.cfg.pool_size, limit_per_host=self.cfg.pool_size,
            keepalive_timeout=self.cfg.keepalive_seconds, ttl_dns_cache=300,
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, timeout=self.timeout,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()


class ProxyStage:
    """The terminal stage: sends the request upstream and sets `exchange.upstream`."""

    name: ClassVar[str] = "proxy"

    def __init__(self, upstreams: dict[str, Upstream], trusted: TrustedProxies, max_body_bytes: int) -> None:
        self._upstreams = upstreams
        self._trusted = trusted
        self._max_body = max_body_bytes

    def _forward_headers(self, ex: Exchange, up: Upstream, strip_credentials: bool) -> list[tuple[str, str]]:
        peer = ex.facts.get("peer", ex.client_ip)
        trusted_peer = self._trusted.is_trusted(peer)
        connection_named: set[bytes] = set()
        xff: list[str] = []
        proto: str | None = None
        for k, v in ex.headers:
            if k == b"connection":
                connection_named.update(t.strip().lower() for t in v.split(b","))
            elif k == b"x-forwarded-for" and trusted_peer:
                xff.append(v.decode("latin-1"))
            elif k == b"x-forwarded-proto" and trusted_peer and proto is None:
                proto = v.decode("latin-1")
        out: list[tuple[str, str]] = []
        for k, v in ex.headers:
            if k in _REQUEST_DROP or k in connection_named or k.startswith(b"x-portcullis-"):
                continue
            if strip_credentials and k in _CREDENTIAL_HEADERS:
                continue
            out.append((k.decode("latin-1"), v.decode("latin-1")))
        xff.append(peer)
        out.append(("X-Forwarded-For", ", ".join(xff)))
        out.append(("X-Forwarded-Proto", proto or ex.scope.get("scheme", "http")))
        if ex.host:
            out.append(("X-Forwarded-Host", ex.host))
        out.append(("X-Request-Id", ex.request_id))
        out.append(("Host", ex.host if up.cfg.preserve_host and ex.host else up.host_header))
        if (ct := ex.header(b"content-type")) is not None and not any(h[0] == "content-type" for h in out):
            out.append(("Content-Type", ct.decode("latin-1")))
        return out

    async def _read_whole(self, ex: Exchange) -> bytes:
        chunks: list[bytes] = []
        total = 0
        while True:
            msg = await ex.receive()
            if msg["type"] == "http.disconnect":
                raise ClientDisconnectedError
            body = msg.get("body", b"")
            total += len(body)
            if total > self._max_body:
                raise BodyTooLargeError
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        ex.bytes_in = total
        return b"".join(chunks)

    async def _stream(self, ex: Exchange) -> AsyncIterator[bytes]:
        total = 0
        while True:
            msg = await ex.receive()
            if msg["type"] == "http.disconnect":
                ex.facts["client_disconnected"] = True
                raise ClientDisconnectedError
            body = msg.get("body", b"")
            total += len(body)
            ex.bytes_in = total
            if total > self._max_body:
                ex.facts["body_too_large"] = True
                raise BodyTooLargeError
            if body:
                yield body
            if not msg.get("more_body", False):
                return

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        assert route is not None  # the route stage runs first
        cfg = route.config
        up = self._upstreams[cfg.upstream]
        session = up.session
        assert session is not None  # opened at start-up
        strip = not cfg.public and not up.cfg.forward_credentials
        headers = self._forward_headers(ex, up, strip)
        path = ex.raw_path.decode("ascii")
        if cfg.upstream_path is not None:
            path = _rewrite(cfg.upstream_path, ex.path_params)
        target = up.base + path + ("?" + ex.query.decode("ascii") if ex.query else "")
        url = URL(target, encoded=True)
        cl = ex.header(b"content-length")
        has_body = (cl is not None and cl != b"0") or ex.header(b"transfer-encoding") is not None
        data: bytes | AsyncIterator[bytes] | None = None
        try:
            if has_body:
                if cl is not None and int(cl) <= BUFFER_LIMIT:
                    data = await self._read_whole(ex)
                else:
                    data = self._stream(ex)
                    if cl is not None:
                        headers.append(("Content-Length", cl.decode("ascii")))
        except BodyTooLargeError:
            return Problem(413, "payload-too-large", "request.body_too_large", "The request body is too large.")
        except ClientDisconnectedError:
            return Problem(400, "bad-request", "client.disconnected", "The client went away.")
        replayable = not isinstance(data, AsyncIterator)
        attempts = 1 + (up.cfg.retries if ex.method in IDEMPOTENT and replayable else 0)
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_seconds) if cfg.timeout_seconds else None
        for attempt in range(attempts):
            try:
                resp = await session.request(
                    ex.method, url, headers=headers, data=data, allow_redirects=False,
                    timeout=timeout or up.timeout, compress=None,
                )
                break
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                if ex.facts.get("body_too_large"):
                    return Problem(413, "payload-too-large", "request.body_too_large",
                                   "The request body is too large.")
                if attempt + 1 < attempts:
                    ex.facts["retries"] = attempt + 1
                    continue
                log.warning("upstream %s unreachable: %s", up.name, type(exc).__name__)
                return Problem(502, "bad-gateway", "upstream.unreachable", "The upstream service is unavailable.")
            except TimeoutError:
                return Problem(504, "gateway-timeout", "upstream.timeout", "The upstream service timed out.")
            except aiohttp.ClientError as exc:
                if ex.facts.get("body_too_large"):
                    return Problem(413, "payload-too-large", "request.body_too_large",
                                   "The request body is too large.")
                if ex.facts.get("client_disconnected"):
                    return Problem(400, "bad-request", "client.disconnected", "The client went away.")
                log.warning("upstream %s error: %s", up.name, type(exc).__name__)
                return Problem(502, "bad-gateway", "upstream.protocol_error", "The upstream service failed.")
            except (BodyTooLargeError, ClientDisconnectedError) as exc:
                if isinstance(exc, BodyTooLargeError):
                    return Problem(413, "payload-too-large", "request.body_too_large",
                                   "The request body is too large.")
                return Problem(400, "bad-request", "client.disconnected", "The client went away.")
        declared = resp.content_length
        if declared is not None and declared > up.cfg.max_response_bytes:
            resp.close()
            return Problem(502, "bad-gateway", "upstream.response_too_large", "The upstream answer was too large.")
        raw = [(k.lower(), v) for k, v in resp.raw_headers]
        # RFC 9110 §7.6.1: fields named in the upstream's Connection header are hop-by-hop too.
        named = {t.strip() for k, v in raw if k == b"connection" for t in v.lower().split(b",")}
        out_headers: Headers = [(k, v) for k, v in raw if k not in _RESPONSE_DROP and k not in named]
        ex.upstream = UpstreamResponse(
            status=resp.status,
            headers=out_headers,
            body=None if ex.method == "HEAD" else _body(resp, up.cfg.max_response_bytes, ex),
            release=resp.release,
        )
        return None


async def _body(resp: aiohttp.ClientResponse, limit: int, ex: Exchange) -> AsyncIterator[bytes]:
    total = 0
    try:
        async for chunk in resp.content.iter_any():
            total += len(chunk)
            if total > limit:
                ex.facts["response_too_large"] = True
                resp.close()
                raise BodyTooLargeError
            yield chunk
    except (aiohttp.ClientError, TimeoutError):
        ex.facts["upstream_body_error"] = True
        resp.close()
        raise


def _rewrite(template: str, params: dict[str, str]) -> str:
    """Fill an `upstream_path` template; parameters are re-encoded as one segment each."""
    out = template
    for k, v in params.items():
        out = out.replace("{" + k + "}", quote(v, safe=""))
    return out
