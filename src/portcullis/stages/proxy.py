"""proxy: forward to the upstream (DESIGN.md, request path step 8).

Pooled keep-alive connections (`portcullis.upstream_client`), connect/read/total timeouts, bodies streamed
with size bounds, retries only for idempotent methods (RFC 9110 §9.2.2) and only when
the request body could be replayed, hop-by-hop headers removed (RFC 9110 §7.6.1),
``X-Forwarded-For/Proto/Host`` set, and upstream failures mapped to 502/504 problems
that reveal nothing about the upstream.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import AsyncIterator
from typing import ClassVar
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.exchange import Exchange, Headers, UpstreamResponse
from portcullis.netutil import TrustedProxies
from portcullis.problems import Problem
from portcullis.upstream_client import (
    ConnectError,
    Pool,
    PoolConfig,
    Response,
    StaleConnectionError,
    UpstreamError,
    UpstreamTimeoutError,
)

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
_CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"dpop"})
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
        try:
            u = urlsplit(v)
            port = u.port
        except ValueError:
            raise ValueError("must be an absolute http:// or https:// URL with a valid port") from None
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("must be an absolute http:// or https:// URL")
        if u.query or u.fragment or u.username or u.password:
            raise ValueError("must not carry a query, fragment or credentials")
        if port == 0:
            raise ValueError("port 0 is not a valid upstream port")
        return v.rstrip("/")


class BodyTooLargeError(Exception):
    """The client's body exceeded the bound while streaming."""


class ClientDisconnectedError(Exception):
    """The client went away before its body was read."""


async def read_body(ex: Exchange, limit: int) -> bytes:
    """The whole request body, at most `limit` bytes (BodyTooLargeError beyond)."""
    chunks: list[bytes] = []
    total = 0
    while True:
        msg = await ex.receive()
        if msg["type"] == "http.disconnect":
            raise ClientDisconnectedError
        body = msg.get("body", b"")
        total += len(body)
        if total > limit:
            raise BodyTooLargeError
        chunks.append(body)
        if not msg.get("more_body", False):
            break
    ex.bytes_in = total
    return b"".join(chunks)


class Upstream:
    """A pooled client for one upstream. `open()` runs inside the event loop."""

    def __init__(self, name: str, cfg: UpstreamConfig) -> None:
        self.name = name
        self.cfg = cfg
        u = urlsplit(cfg.url)
        assert u.hostname is not None  # validated by UpstreamConfig
        self.base_path = u.path.encode()
        default_port = 443 if u.scheme == "https" else 80
        self.host_header = (u.netloc.rsplit("@", 1)[-1]).encode()
        self.pool_config = PoolConfig(
            host=u.hostname, port=u.port or default_port,
            tls=ssl.create_default_context() if u.scheme == "https" else None,
            max_connections=cfg.pool_size, keepalive_seconds=cfg.keepalive_seconds,
            connect_timeout=cfg.connect_timeout,
        )
        self.pool: Pool | None = None

    def open(self) -> None:
        self.pool = Pool(self.pool_config)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()


class ProxyStage:
    """The terminal stage: sends the request upstream and sets `exchange.upstream`."""

    name: ClassVar[str] = "proxy"

    def __init__(self, upstreams: dict[str, Upstream], trusted: TrustedProxies, max_body_bytes: int,
                 request_id_header: bytes = b"x-request-id", extra_drop: tuple[str, ...] = ()) -> None:
        self._upstreams = upstreams
        self._trusted = trusted
        self._max_body = max_body_bytes
        # The incoming request-id header (whatever its configured name) is replaced by
        # the id the gateway settled on, so an untrusted client cannot choose it upstream.
        self._rid = request_id_header
        # Plus gateway-only headers such as a proxy's client-certificate header.
        self._drop = _REQUEST_DROP | {request_id_header} | {h.encode() for h in extra_drop}

    def _forward_headers(self, ex: Exchange, up: Upstream, strip_credentials: bool) -> Headers:
        peer: str = ex.facts.get("peer", ex.client_ip)
        trusted_peer = self._trusted.is_trusted(peer)
        connection_named: set[bytes] = set()
        xff: list[bytes] = []
        proto: bytes | None = None
        for k, v in ex.headers:
            if k == b"connection":
                connection_named.update(t.strip().lower() for t in v.split(b","))
            elif k == b"x-forwarded-for" and trusted_peer:
                xff.append(v)
            elif k == b"x-forwarded-proto" and trusted_peer and proto is None:
                proto = v
        out: Headers = []
        for k, v in ex.headers:
            if k in self._drop or k in connection_named or k.startswith(b"x-portcullis-"):
                continue
            if strip_credentials and k in _CREDENTIAL_HEADERS:
                continue
            out.append((k, v))
        xff.append(peer.encode())
        out.append((b"x-forwarded-for", b", ".join(xff)))
        out.append((b"x-forwarded-proto", proto or ex.scope.get("scheme", "http").encode()))
        if ex.host:
            out.append((b"x-forwarded-host", ex.host.encode()))
        out.append((self._rid, ex.request_id.encode()))
        out.append((b"host", ex.host.encode() if up.cfg.preserve_host and ex.host else up.host_header))
        return out

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
        pool = up.pool
        assert pool is not None  # opened at start-up
        # Credentials are stripped on public routes too: the upstream never needs them.
        headers = self._forward_headers(ex, up, not up.cfg.forward_credentials)
        path = ex.raw_path
        if cfg.upstream_path is not None:
            path = _rewrite(cfg.upstream_path, ex.path_params).encode()
        target = up.base_path + path + (b"?" + ex.query if ex.query else b"")
        cl = ex.header(b"content-length")
        chunked = ex.header(b"transfer-encoding") is not None
        body: bytes | AsyncIterator[bytes] | None = None
        declared: int | None = None
        try:
            if "body" in ex.facts:  # already read (and verified) by the signature stage
                body = ex.facts["body"]
            elif chunked or (cl is not None and cl != b"0"):
                declared = int(cl) if cl is not None else None
                if declared is not None and declared <= BUFFER_LIMIT:
                    body = await read_body(ex, self._max_body)  # small: read whole, replayable
                else:
                    body = self._stream(ex)
        except BodyTooLargeError:
            return too_large_problem()
        except ClientDisconnectedError:
            return gone_problem()
        replayable = not isinstance(body, AsyncIterator)
        attempts = 1 + (up.cfg.retries if ex.method in IDEMPOTENT and replayable else 0)
        total = cfg.timeout_seconds or up.cfg.total_timeout
        resp: Response | None = None
        for attempt in range(attempts):
            try:
                resp = await pool.request(ex.method, target, headers, body, read_timeout=up.cfg.read_timeout,
                                          total_timeout=total,
                                          content_length=None if replayable else declared)
                break
            except (ConnectError, StaleConnectionError) as exc:
                if attempt + 1 < attempts:
                    ex.facts["retries"] = attempt + 1
                    continue
                log.warning("upstream %s unreachable: %s", up.name, exc)
                return Problem(502, "bad-gateway", "upstream.unreachable", "The upstream service is unavailable.")
            except UpstreamTimeoutError:
                return Problem(504, "gateway-timeout", "upstream.timeout", "The upstream service timed out.")
            except BodyTooLargeError:
                return too_large_problem()
            except ClientDisconnectedError:
                return gone_problem()
            except UpstreamError as exc:
                log.warning("upstream %s error: %s", up.name, exc)
                return Problem(502, "bad-gateway", "upstream.protocol_error", "The upstream service failed.")
        assert resp is not None
        length = resp.content_length
        if length is not None and length > up.cfg.max_response_bytes:
            resp.release()
            return Problem(502, "bad-gateway", "upstream.response_too_large", "The upstream answer was too large.")
        raw = resp.headers
        # RFC 9110 §7.6.1: fields named in the upstream's Connection header are hop-by-hop too.
        named = {t.strip() for k, v in raw if k == b"connection" for t in v.lower().split(b",")}
        ex.upstream = UpstreamResponse(
            status=resp.status,
            headers=[(k, v) for k, v in raw if k not in _RESPONSE_DROP and k not in named],
            body=None if ex.method == "HEAD" else _body(resp, up.cfg.max_response_bytes, ex),
            release=resp.release,
            content_length=length,
        )
        return None


def too_large_problem() -> Problem:
    """413 for a request body over `normalize.max_body_bytes` (declared or streamed)."""
    return Problem(413, "payload-too-large", "request.body_too_large", "The request body is too large.")


def gone_problem() -> Problem:
    """The client disconnected before its body was read."""
    return Problem(400, "bad-request", "client.disconnected", "The client went away.")


async def _body(resp: Response, limit: int, ex: Exchange) -> AsyncIterator[bytes]:
    total = 0
    try:
        async for chunk in resp.body():
            total += len(chunk)
            if total > limit:
                ex.facts["response_too_large"] = True
                raise BodyTooLargeError
            yield chunk
    except UpstreamError:
        ex.facts["upstream_body_error"] = True
        raise


def _rewrite(template: str, params: dict[str, str]) -> str:
    """Fill an `upstream_path` template; parameters are re-encoded as one segment each."""
    out = template
    for k, v in params.items():
        out = out.replace("{" + k + "}", quote(v, safe=""))
    return out
