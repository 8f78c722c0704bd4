"""The hand-written upstream client against scripted raw-socket upstreams: framing,
keep-alive, timeouts, and hostile or broken responses (llhttp must refuse them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from portcullis.upstream_client import (
    ConnectError,
    Pool,
    PoolConfig,
    ProtocolError,
    StaleConnectionError,
    UpstreamTimeoutError,
)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def pool(port: int, size: int = 4, keepalive: float = 30.0) -> Pool:
    return Pool(PoolConfig("127.0.0.1", port, None, size, keepalive, 1.0))


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    body = b""
    lower = head.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(n)
    elif b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return head, body


def answer(raw: bytes, keep: bool = True) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await read_request(reader)
                writer.write(raw)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    return handler


async def fetch(p: Pool, method: str = "GET", body: bytes | AsyncIterator[bytes] | None = None,
                read_timeout: float = 2.0, total: float = 5.0) -> tuple[int, bytes]:
    r = await p.request(method, b"/x", [(b"host", b"u")], body, read_timeout=read_timeout, total_timeout=total)
    data = b"".join([c async for c in r.body()])
    r.release()
    return r.status, data


async def test_content_length_and_keep_alive_reuse() -> None:
    conns = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal conns
        conns += 1
        await answer(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")(reader, writer)

    server, port = await serve(handler)
    p = pool(port)
    for _ in range(5):
        assert await fetch(p) == (200, b"hello")
    assert conns == 1  # one connection, reused
    await p.close()
    server.close()


async def test_chunked_response() -> None:
    server, port = await serve(answer(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                      b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"))
    p = pool(port)
    assert await fetch(p) == (200, b"abcde")
    await p.close()
    server.close()


async def test_close_delimited_body_ends_at_eof_and_is_not_reused() -> None:
    server, port = await serve(answer(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-eof", keep=False))
    p = pool(port)
    assert await fetch(p) == (200, b"until-eof")
    assert await fetch(p) == (200, b"until-eof")  # a fresh connection each time
    await p.close()
    server.close()


async def test_informational_responses_are_skipped() -> None:
    server, port = await serve(answer(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                                      b"HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"))
    p = pool(port)
    assert await fetch(p) == (201, b"ok")
    await p.close()
    server.close()


async def test_head_response_has_no_body_whatever_content_length_says() -> None:
    server, port = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"))
    p = pool(port)
    assert await fetch(p, "HEAD") == (200, b"")
    await p.close()
    server.close()


async def test_request_body_bytes_and_stream_framing() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(reader)
                seen.append(head.split(b"\r\n\r\n")[0].lower() + b"|" + body)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except asyncio.IncompleteReadError:
            writer.close()

    async def stream() -> AsyncIterator[bytes]:
        for part in (b"ab", b"", b"cd"):
            yield part

    server, port = await serve(handler)
    p = pool(port)
    await fetch(p, "POST", b"payload")
    await fetch(p, "POST", stream())
    assert b"content-length: 7" in seen[0] and seen[0].endswith(b"|payload")
    assert b"transfer-encoding: chunked" in seen[1] and seen[1].endswith(b"|abcd")
    await p.close()
    server.close()


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",      # conflicting lengths
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",  # CL + TE
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nabc\r\n",     # bad chunk size
    b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",                             # no colon
    b"HTTP/1.1 2000 OK\r\n\r\n",                                                # bad status
    b"SMTP ready\r\n\r\n",                                                      # not HTTP at all
    b"HTTP/1.1 200 OK\r\nx: " + b"a" * 70_000 + b"\r\n\r\n",                    # oversized head
    b"HTTP/1.1 200 OK\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(300)) + b"\r\n",  # too many headers
])
async def test_hostile_or_broken_responses_are_protocol_errors(raw: bytes) -> None:
    server, port = await serve(answer(raw))
    p = pool(port)
    with pytest.raises(ProtocolError):
        await fetch(p)
    await p.close()
    server.close()


async def test_truncated_body_is_an_error() -> None:
    server, port = await serve(answer(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", keep=False))
    p = pool(port)
    with pytest.raises(ProtocolError):
        await fetch(p)
    await p.close()
    server.close()


async def test_read_timeout_then_the_connection_is_not_reused() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(1.0)
        writer.close()

    server, port = await serve(slow)
    p = pool(port)
    with pytest.raises(UpstreamTimeoutError):
        await fetch(p, read_timeout=0.1)
    assert not p._idle  # the timed-out connection was dropped
    await p.close()
    server.close()


async def test_connect_error() -> None:
    server, port = await serve(answer(b""))
    server.close()
    await server.wait_closed()
    p = pool(port)
    with pytest.raises(ConnectError):
        await fetch(p)


async def test_stale_keep_alive_connection_is_reported_stale() -> None:
    """The upstream closes an idle connection just as it is reused: no response byte."""
    requests = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await read_request(reader)
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await read_request(reader)  # the second request on this connection: hang up silently
        writer.transport.abort()

    server, port = await serve(handler)
    p = pool(port)
    assert await fetch(p) == (200, b"ok")
    with pytest.raises(StaleConnectionError):
        await fetch(p)
    await p.close()
    server.close()


async def test_pool_full_waits_only_until_the_deadline() -> None:
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(2)
        writer.close()

    server, port = await serve(hold)
    p = pool(port, size=1)
    first = asyncio.ensure_future(fetch(p, read_timeout=5, total=5))
    await asyncio.sleep(0.05)
    with pytest.raises(UpstreamTimeoutError, match="no free upstream connection"):
        await fetch(p, read_timeout=5, total=0.2)
    first.cancel()
    await p.close()
    server.close()


async def test_unsolicited_bytes_make_an_idle_connection_unusable() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")  # a response nobody asked for
        await writer.drain()
        await asyncio.sleep(1)

    server, port = await serve(handler)
    p = pool(port)
    assert await fetch(p) == (200, b"ok")
    await asyncio.sleep(0.2)
    # Answered on a fresh connection, never with the injected response.
    assert await fetch(p) == (200, b"ok")
    await p.close()
    server.close()
