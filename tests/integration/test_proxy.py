"""End to end through the real gateway: what reaches the upstream and what comes back."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portcullis.demo.upstream import UpstreamThread
from portcullis.keysadmin import create_key, revoke_key
from tests.integration.echo import EchoApp, FlakyServer
from tests.integration.harness import Client, GatewayThread, free_port, raw_request, write_config


@dataclass
class Proxied:
    client: Client
    key: str
    key_id: str
    data_dir: Path
    gw: GatewayThread
    flaky: FlakyServer


class FlakyThread:
    def __init__(self, drops: int) -> None:
        self.port = free_port()
        self.flaky = FlakyServer(drops)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.flaky.start(self.port), self.loop).result(5)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxied]:
    echo = UpstreamThread(EchoApp())
    echo.start()
    flaky = FlakyThread(drops=1)
    flaky.start()
    dead_port = free_port()  # nothing listens here
    data_dir = tmp_path_factory.mktemp("proxy")
    port = free_port()

    def route(name: str, path: str, upstream: str, methods: list[str] | None = None, **kw: Any) -> dict[str, Any]:
        return {"name": name, "path": path, "methods": methods or ["GET"], "upstream": upstream,
                "auth": ["api_key"], "scopes": ["s"], **kw}

    doc = {
        "data_dir": ".",
        "server": {"listen": {"port": port}, "metrics": None},
        "normalize": {"max_body_bytes": 1_000_000, "trusted_proxies": ["127.0.0.2"]},
        "upstreams": {
            "echo": {"url": echo.url, "max_response_bytes": 2_000_000},
            "dead": {"url": f"http://127.0.0.1:{dead_port}", "retries": 2, "connect_timeout": 1},
            "flaky": {"url": f"http://127.0.0.1:{flaky.port}", "retries": 1},
        },
        "routes": [
            route("echo", "/echo/{x}", "echo", ["GET", "POST", "PUT"]),
            route("slow", "/slow/{s}", "echo", timeout_seconds=0.5),
            route("big", "/big/{n}", "echo"),
            route("rewrite", "/r/{x}", "echo", upstream_path="/echo/inner/{x}"),
            route("dead", "/dead", "dead"),
            route("flaky", "/flaky", "flaky", ["GET", "POST"]),
            {"name": "public-echo", "path": "/pub", "methods": ["GET"], "upstream": "echo", "public": True,
             "upstream_path": "/echo/pub"},
        ],
    }
    loaded = write_config(data_dir, doc)
    rec, key = create_key(loaded.data_dir, name="k", tenant="t", scopes=["s"], roles=[])
    gw = GatewayThread(loaded)
    gw.start()
    yield Proxied(Client(port, {"X-API-Key": key}), key, rec.key_id, loaded.data_dir, gw, flaky.flaky)
    gw.stop()
    echo.stop()
    flaky.stop()


def seen(resp_json: dict[str, Any]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in resp_json["headers"]:
        out.setdefault(k, []).append(v)
    return out


def test_forwarded_headers_and_credentials_stripped(proxied: Proxied) -> None:
    r = proxied.client.request("GET", "/echo/a?q=1&x=%20y", {
        "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Connection": "X-Secret-Hop",
        "X-Secret-Hop": "1", "Keep-Alive": "timeout=5", "X-Portcullis-Tenant": "forged", "X-Request-Id": "mine",
    })
    assert r.status == 200
    doc = r.json()
    h = seen(doc)
    # The peer (127.0.0.1) is not a trusted proxy: the spoofed XFF and proto are discarded.
    assert h["x-forwarded-for"] == ["127.0.0.1"]
    assert h["x-forwarded-proto"] == ["http"]
    assert h["x-forwarded-host"] == [f"127.0.0.1:{proxied.client.port}"]
    assert "x-secret-hop" not in h and "keep-alive" not in h
    assert "x-portcullis-tenant" not in h
    assert "x-api-key" not in h and "authorization" not in h  # never forwarded upstream
    assert h["x-request-id"] == [r.headers["x-request-id"]] != ["mine"]  # untrusted peer's id replaced
    assert doc["raw_path"] == "/echo/a" and doc["query"] == "q=1&x=%20y"


def test_trusted_proxy_chain(proxied: Proxied) -> None:
    # Connect from 127.0.0.2, which the config trusts: XFF is believed and extended.
    with socket.create_connection(("127.0.0.1", proxied.client.port), source_address=("127.0.0.2", 0)) as s:
        s.sendall((f"GET /echo/b HTTP/1.1\r\nHost: gw\r\nX-API-Key: {proxied.key}\r\n"
                   "X-Forwarded-For: 203.0.113.7\r\nX-Request-Id: edge-123\r\nConnection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 200")
    assert b'"x-forwarded-for", "203.0.113.7, 127.0.0.2"' in data
    assert b"x-request-id: edge-123" in data.lower()


def test_request_body_streamed_and_counted(proxied: Proxied) -> None:
    body = b"z" * 600_000  # above the buffering threshold: streamed
    r = proxied.client.request("POST", "/echo/up", {"Content-Type": "application/octet-stream"}, body)
    assert r.status == 200
    assert r.json()["body_bytes"] == 600_000


def test_response_streamed_and_server_headers_hidden(proxied: Proxied) -> None:
    r = proxied.client.request("GET", "/big/1500000")
    assert r.status == 200
    assert len(r.body) == 1_500_000
    assert "server" not in r.headers or r.headers["server"] != "secret-upstream/1.0"
    assert "x-powered-by" not in r.headers and "x-hop" not in r.headers


def test_response_over_limit_is_cut(proxied: Proxied) -> None:
    raw = raw_request(proxied.client.port, (f"GET /big/3000000 HTTP/1.1\r\nHost: x\r\nX-API-Key: {proxied.key}\r\n"
                                           "Connection: close\r\n\r\n").encode(), timeout=10)
    assert raw.startswith(b"HTTP/1.1 200")
    assert len(raw) < 3_000_000  # cut off before the whole oversized answer went through


def test_upstream_timeout_is_504(proxied: Proxied) -> None:
    r = proxied.client.request("GET", "/slow/3")
    assert r.status == 504
    assert r.json()["type"].endswith("/gateway-timeout")


def test_upstream_down_is_502_without_internals(proxied: Proxied) -> None:
    r = proxied.client.request("GET", "/dead")
    assert r.status == 502
    assert r.json()["type"].endswith("/bad-gateway")
    assert b"127.0.0.1" not in r.body and b"Connect" not in r.body


def test_retry_only_for_idempotent(proxied: Proxied) -> None:
    before = proxied.flaky.seen
    assert proxied.client.request("GET", "/flaky").status == 200  # first attempt dropped, retried
    assert proxied.flaky.seen == before + 2
    proxied.flaky.drops = proxied.flaky.seen + 1  # drop the next connection again
    r = proxied.client.request("POST", "/flaky", {"Content-Type": "application/json"}, b"{}")
    assert r.status == 502  # POST is not retried


def test_path_rewrite_encodes_params(proxied: Proxied) -> None:
    r = proxied.client.request("GET", "/r/a%20b")
    assert r.json()["raw_path"] == "/echo/inner/a%20b"


def test_public_route_forwards_without_credential(proxied: Proxied) -> None:
    r = Client(proxied.client.port).request("GET", "/pub")
    assert r.status == 200
    # A credential sent to a public route is not passed on either.
    r = Client(proxied.client.port, {"X-API-Key": proxied.key, "Authorization": "Bearer x"}).request("GET", "/pub")
    h = seen(r.json())
    assert "x-api-key" not in h and "authorization" not in h


def test_revocation_is_honoured_within_a_second(proxied: Proxied) -> None:
    rec, key = create_key(proxied.data_dir, name="short-lived", tenant="t", scopes=["s"], roles=[])
    c = Client(proxied.client.port, {"X-API-Key": key})
    deadline = time.monotonic() + 2
    while c.request("GET", "/echo/x").status != 200:  # the new key appears after one poll
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert revoke_key(proxied.data_dir, rec.key_id)
    revoked_at = time.monotonic()
    while True:
        r = c.request("GET", "/echo/x")
        if r.status == 401:
            break
        time.sleep(0.02)
    assert time.monotonic() - revoked_at < 1.0
    assert r.json()["type"].endswith("/invalid-credential")
