"""A lean, pooled HTTP/1.1 client for talking to upstreams.

Why not aiohttp or httpx (DESIGN.md's candidates)? Measured on this project's
benchmark machine (docs/benchmarks.md): an aiohttp `ClientSession` request costs
~165 µs of CPU on the event loop, more than half of a one-core gateway's budget,
and httpx costs more. A reverse proxy needs only a small part of a client: one origin
per pool, keep-alive reuse, request bodies as bytes or a stream, response bodies
streamed with back-pressure. Parsing — the part that must be exactly right — is done
by llhttp through `httptools` (Node.js's parser, strict about framing: duplicate or
conflicting Content-Length, bad chunking and obs-fold are errors). What is written
here is only connection management and framing of what we send (RFC 9112 §6).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import httptools

Headers = list[tuple[bytes, bytes]]
# Pause reading from the upstream while this much response body is waiting for the
# client: a slow client must not make the gateway buffer a large response.
HIGH_WATER = 256 * 1024
MAX_RESPONSE_HEAD = 64 * 1024
MAX_RESPONSE_HEADERS = 200


class UpstreamError(Exception):
    """The upstream could not be reached or broke the protocol."""


class ConnectError(UpstreamError):
    """No connection could be made (nothing was sent)."""


class StaleConnectionError(UpstreamError):
    """A reused keep-alive connection died before any response byte arrived."""


class ProtocolError(UpstreamError):
    """The upstream's answer was not valid HTTP/1.1, or was cut short."""


class UpstreamTimeoutError(UpstreamError):
    """A connect, read or total deadline passed."""


@dataclass(slots=True)
class PoolConfig:
    host: str
    port: int
    tls: ssl.SSLContext | None
    max_connections: int
    keepalive_seconds: float
    connect_timeout: float


class _Conn(asyncio.Protocol):
    """One connection and the response currently being read from it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused_writing = False
        # Response state
        self.status = 0
        self.headers: Headers = []
        self._head_bytes = 0
        self._framed = False  # Content-Length or chunked; otherwise the body ends at EOF
        self._head_request = False
        self.headers_done: asyncio.Future[None] | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: UpstreamError | None = None
        self.any_byte = False
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.any_byte = True
        parser = self._parser
        if parser is None:  # bytes nobody asked for: the connection is unusable
            self._fail(ProtocolError("unexpected data from upstream"))
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"invalid response: {exc}"))
        except ProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._parser is None or self.complete:
            return
        hd = self.headers_done
        if hd is not None and hd.done() and not self._framed:
            self._finish()  # RFC 9112 §6.3 item 8: a close-delimited body ends at EOF
        elif not self.any_byte:
            self._fail(StaleConnectionError("connection closed before a response"))
        else:
            self._fail(ProtocolError("connection closed mid-response"))

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        w = self._writable
        if w is not None and not w.done():
            w.set_result(None)

    # httptools callbacks
    def on_status(self, status: bytes) -> None:
        self.headers = []
        self._head_bytes = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_RESPONSE_HEAD or len(self.headers) >= MAX_RESPONSE_HEADERS:
            raise ProtocolError("response head too large")
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            return  # informational: the final response follows (RFC 9110 §15.2)
        self.status = status
        self._framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers) or status in (
            204, 304)
        self.keep_alive = self._parser.should_keep_alive()
        hd = self.headers_done
        if hd is not None and not hd.done():
            hd.set_result(None)
        if self._head_request:
            # A response to HEAD has no body whatever its Content-Length says
            # (RFC 9110 §9.3.2); llhttp cannot be told so, hence no reuse.
            self.keep_alive = False
            self._finish()

    def on_body(self, body: bytes) -> None:
        if not body or self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self._reading_paused and self.transport is not None:
            self.transport.pause_reading()
            self._reading_paused = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.status == 0:  # end of an informational response
            return
        self.keep_alive = self.keep_alive and self._parser is not None and self._parser.should_keep_alive()
        self._finish()

    # internals
    def _finish(self) -> None:
        self.complete = True
        hd = self.headers_done
        if hd is not None and not hd.done():
            hd.set_result(None)
        self._wake()

    def _fail(self, exc: UpstreamError) -> None:
        if self.error is None:
            self.error = exc
        self.keep_alive = False
        hd = self.headers_done
        if hd is not None and not hd.done():
            hd.set_exception(exc)
            hd.exception()  # mark retrieved: the request may already have given up
        self._wake()
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def begin(self, head_request: bool) -> None:
        """Reset the response state for a new request on this connection."""
        self._parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers = []
        self._head_bytes = 0
        self._framed = False
        self._head_request = head_request
        self.headers_done = self.loop.create_future()
        self.chunks.clear()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error = None
        self.any_byte = False

    async def drain(self) -> None:
        if self._paused_writing and not self.closed:
            self._writable = self.loop.create_future()
            await self._writable

    async def next_chunk(self) -> bytes | None:
        """The next body chunk, or None at the end; raises the connection's error."""
        while True:
            if self.chunks:
                chunk = self.chunks.popleft()
                self.buffered -= len(chunk)
                if self._reading_paused and self.buffered <= HIGH_WATER // 2 and self.transport is not None:
                    self.transport.resume_reading()
                    self._reading_paused = False
                return chunk
            if self.error is not None:
                raise self.error
            if self.complete:
                return None
            self._waiter = self.loop.create_future()
            await self._waiter
            self._waiter = None

    def time_out(self) -> None:
        """The response head did not arrive in time: fail the request, drop the connection."""
        self._fail(UpstreamTimeoutError("read timeout"))

    def detach(self) -> None:
        """Between requests: no parser, so unsolicited bytes mark the connection bad."""
        self._parser = None

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None and not self.chunks


class Response:
    """A response whose head has arrived; iterate `body()` once, then `release()`."""

    __slots__ = ("_conn", "_deadline", "_pool", "_read_timeout", "_released", "headers", "status")

    def __init__(self, pool: Pool, conn: _Conn, read_timeout: float, deadline: float) -> None:
        self._pool = pool
        self._conn = conn
        self._read_timeout = read_timeout
        self._deadline = deadline
        self._released = False
        self.status = conn.status
        self.headers = conn.headers

    @property
    def content_length(self) -> int | None:
        for k, v in self.headers:
            if k == b"content-length":
                return int(v)
        return None

    async def body(self) -> AsyncIterator[bytes]:
        conn = self._conn
        loop = conn.loop
        while True:
            if conn.chunks or conn.complete or conn.error is not None:
                chunk = await conn.next_chunk()
            else:
                remaining = self._deadline - loop.time()
                if remaining <= 0:
                    raise UpstreamTimeoutError("total timeout")
                try:
                    async with asyncio.timeout(min(self._read_timeout, remaining)):
                        chunk = await conn.next_chunk()
                except TimeoutError:
                    raise UpstreamTimeoutError("read timeout") from None
            if chunk is None:
                return
            yield chunk

    async def read(self, limit: int) -> bytes | None:
        """The whole body, released afterwards; None (connection closed) when it exceeds
        `limit` bytes. Upstream errors propagate as from `body()`."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in self.body():
            size += len(chunk)
            if size > limit:
                self.release()
                return None
            chunks.append(chunk)
        self.release()
        return b"".join(chunks)

    def release(self) -> None:
        """Return the connection to the pool if the response was read whole, else close it."""
        if self._released:
            return
        self._released = True
        self._pool.put_back(self._conn)


class Pool:
    """Keep-alive connections to one origin, at most `max_connections` at a time."""

    def __init__(self, cfg: PoolConfig) -> None:
        self.cfg = cfg
        self._idle: list[_Conn] = []
        self._slots = asyncio.Semaphore(cfg.max_connections)
        self._closed = False

    async def _acquire(self, deadline: float) -> _Conn:
        if self._slots.locked():
            # Every connection is busy: wait for one, but not past the request's deadline,
            # so nothing is sent for a request the client has already been told timed out.
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise UpstreamTimeoutError("no free upstream connection in time") from None
        else:
            await self._slots.acquire()
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and now - conn.idle_since < self.cfg.keepalive_seconds:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.cfg.connect_timeout):
                _, proto = await loop.create_connection(
                    lambda: _Conn(loop), self.cfg.host, self.cfg.port, ssl=self.cfg.tls,
                    server_hostname=self.cfg.host if self.cfg.tls else None,
                )
        except TimeoutError:
            self._slots.release()
            raise ConnectError("connect timeout") from None
        except OSError as exc:
            self._slots.release()
            raise ConnectError(type(exc).__name__) from None
        except BaseException:
            self._slots.release()
            raise
        return proto

    def put_back(self, conn: _Conn) -> None:
        if conn.reusable() and not self._closed:
            conn.detach()
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        elif conn.transport is not None:
            conn.transport.abort() if not conn.complete else conn.transport.close()
        self._slots.release()

    async def request(self, method: str, target: bytes, headers: Headers, body: bytes | AsyncIterator[bytes] | None,
                      *, read_timeout: float, total_timeout: float, content_length: int | None = None) -> Response:
        """Send one request and wait for the response head.

        `headers` must not carry framing fields: they are set here from `body` (RFC 9112
        §6): Content-Length for bytes, or for a stream whose `content_length` is known
        (the ASGI server has already enforced the client's framing), chunked otherwise.
        A StaleConnectionError means the request may not have been processed; the
        caller decides on a retry.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + total_timeout
        conn = await self._acquire(deadline)
        if loop.time() >= deadline:
            # The wait for a connection used the whole budget: send nothing.
            self.put_back(conn)
            raise UpstreamTimeoutError("no free upstream connection in time")
        conn.used += 1
        conn.begin(head_request=method == "HEAD")
        transport = conn.transport
        assert transport is not None
        head = [method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
        for k, v in headers:
            head += (k, b": ", v, b"\r\n")
        try:
            if body is None:
                head.append(b"\r\n")
                transport.write(b"".join(head))
            elif isinstance(body, bytes):
                head += (b"content-length: ", str(len(body)).encode(), b"\r\n\r\n")
                transport.write(b"".join(head) + body)
            elif content_length is not None:
                head += (b"content-length: ", str(content_length).encode(), b"\r\n\r\n")
                transport.write(b"".join(head))
                async for chunk in body:
                    if conn.closed:
                        break
                    transport.write(chunk)
                    await conn.drain()
            else:
                head.append(b"transfer-encoding: chunked\r\n\r\n")
                transport.write(b"".join(head))
                async for chunk in body:
                    if conn.closed:
                        break
                    if chunk:
                        transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                        await conn.drain()
                transport.write(b"0\r\n\r\n")
            hd = conn.headers_done
            assert hd is not None
            if not hd.done():
                # One timer handle instead of asyncio.timeout(): this runs per request.
                timer = loop.call_at(min(loop.time() + read_timeout, deadline), conn.time_out)
                try:
                    await hd
                finally:
                    timer.cancel()
            hd.result()
        except BaseException:
            conn.keep_alive = False
            self.put_back(conn)
            raise
        return Response(self, conn, read_timeout, deadline)

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            if conn.transport is not None:
                conn.transport.close()
        self._idle.clear()
