"""Test upstreams: an echo app that shows what the gateway forwarded, plus slow,
big and flaky behaviours selected by path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class EchoApp:
    """``/echo/...`` echoes method, path, query, headers and body length;
    ``/slow/<seconds>`` sleeps then answers; ``/big/<bytes>`` streams that many bytes."""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        size = 0
        more = True
        while more:
            msg = await receive()
            size += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        if path.startswith("/slow/"):
            await asyncio.sleep(float(path.rsplit("/", 1)[1]))
        if path.startswith("/big/"):
            total = int(path.rsplit("/", 1)[1])
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream"),
                                    (b"server", b"secret-upstream/1.0"), (b"x-powered-by", b"php"),
                                    (b"connection", b"x-hop"), (b"x-hop", b"1")]})
            chunk = b"x" * 65536
            sent = 0
            while sent < total:
                n = min(len(chunk), total - sent)
                await send({"type": "http.response.body", "body": chunk[:n], "more_body": True})
                sent += n
            await send({"type": "http.response.body", "body": b""})
            return
        doc = {
            "method": scope["method"],
            "raw_path": scope.get("raw_path", b"").decode("latin-1"),
            "query": scope.get("query_string", b"").decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "body_bytes": size,
        }
        body = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class FlakyServer:
    """A raw TCP upstream that drops the first `drops` connections without answering,
    then answers 200: lets tests see retries happen only where they are safe."""

    def __init__(self, drops: int) -> None:
        self.drops = drops
        self.seen = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                if length:
                    await reader.readexactly(length)
                if self.seen <= self.drops:
                    writer.close()
                    return
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def start(self, port: int) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
