"""Traffic control end to end: a real gateway (uvicorn) in front of the real echo
upstream, whose ``/slow/<s>`` answers after a real delay.

- one noisy tenant flooding a slow upstream cannot starve another tenant;
- adaptive concurrency lowers an upstream's limit when it slows and sheds with 503 +
  Retry-After, then recovers when it is fast again;
- concurrency slots are given back after upstream errors, timeouts, streamed
  responses and clients that hang up mid-stream;
- quotas answer with RateLimit headers and survive a restart;
- abuse control turns a bad-credential flood away before authentication.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from portcullis.demo.upstream import UpstreamThread
from portcullis.keysadmin import create_key
from portcullis.traffic.concurrency import ConcurrencyLimiter
from tests.integration.harness import Client, GatewayThread, Response, find_audit_event, free_port, write_config


@dataclass
class Env:
    port: int
    keys: dict[str, str]
    gw: GatewayThread
    limiter: ConcurrencyLimiter

    def as_(self, name: str, **headers: str) -> Client:
        return Client(self.port, {"X-API-Key": self.keys[name], **headers})

    def settled(self, upstream: str, timeout: float = 10.0) -> bool:
        """True once nothing is in flight to `upstream` (slots are released off-thread)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.limiter.in_flight.get(upstream, 0) == 0:
                return True
            time.sleep(0.01)
        return False


def route(name: str, path: str, upstream: str, upstream_path: str, **kw: Any) -> dict[str, Any]:
    return {"name": name, "path": path, "methods": ["GET"], "upstream": upstream, "auth": ["api_key"],
            "scopes": ["s"], "upstream_path": upstream_path, **kw}


def traffic_config(echo_url: str, port: int) -> dict[str, Any]:
    return {
        "data_dir": ".",
        "server": {"listen": {"port": port}, "metrics": None},
        # The tests speak for other addresses through X-Forwarded-For from 127.0.0.1.
        "normalize": {"trusted_proxies": ["127.0.0.1"]},
        "upstreams": {
            "shared": {"url": echo_url},
            "adaptive": {"url": echo_url},
            "plain": {"url": echo_url},
            "dead": {"url": f"http://127.0.0.1:{free_port()}", "retries": 0, "connect_timeout": 1},
        },
        "rate_limits": {
            "per-client": {"requests": 1000, "per_seconds": 60, "burst": 500, "key": "client"},
        },
        "traffic": {
            "concurrency": {
                "upstreams": {
                    "shared": {"max_concurrency": 6, "tenant_share": 0.5},
                    "adaptive": {"max_concurrency": 40, "adaptive": {
                        "sample_window_seconds": 0.1, "min_rtt_window_seconds": 600, "min_limit": 2}},
                    "plain": {"max_concurrency": 50},
                    "dead": {"max_concurrency": 50},
                },
            },
            "quotas": {"timezone": "Europe/Berlin", "tenants": {"quota-t": {"day": 3, "month": 100}}},
            "abuse": {"threshold": 5, "window_seconds": 60, "block_seconds": 30, "exempt": ["127.0.0.0/8"]},
        },
        "routes": [
            route("shared", "/s/{x}", "shared", "/slow/{x}"),
            route("adaptive", "/a/{x}", "adaptive", "/slow/{x}"),
            route("slow", "/p/slow/{x}", "plain", "/slow/{x}", timeout_seconds=0.3),
            route("big", "/p/big/{n}", "plain", "/big/{n}"),
            route("echo", "/p/echo", "plain", "/echo/x", rate_limit="per-client"),
            route("dead", "/p/dead", "dead", "/x"),
        ],
    }


@pytest.fixture(scope="module")
def env(echo: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("traffic")
    port = free_port()
    loaded = write_config(data_dir, traffic_config(echo.url, port))
    keys = {}
    for name, tenant in (("a", "tenant-a"), ("b", "tenant-b"), ("q", "quota-t")):
        _, keys[name] = create_key(loaded.data_dir, name=name, tenant=tenant, scopes=["s"], roles=[])
    gw = GatewayThread(loaded)
    gw.start()
    assert gw.gw.traffic is not None and gw.gw.traffic.concurrency is not None
    yield Env(port, keys, gw, gw.gw.traffic.concurrency.limiter)
    gw.stop()


def parallel(n: int, call: Callable[[], Response]) -> list[Response]:
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: call(), range(n)))


def test_one_noisy_tenant_cannot_starve_the_others(env: Env) -> None:
    noisy, quiet = env.as_("a"), env.as_("b")
    flood: list[Response] = []
    flooding = threading.Thread(target=lambda: flood.extend(parallel(16, lambda: noisy.request("GET", "/s/0.8"))))
    flooding.start()
    deadline = time.monotonic() + 5
    while env.limiter.in_flight.get("shared", 0) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    # Tenant A holds its share of the slow upstream; B still gets through, concurrently.
    quiet_answers = parallel(3, lambda: quiet.request("GET", "/s/0.05"))
    assert [r.status for r in quiet_answers] == [200, 200, 200]
    flooding.join(10)
    statuses = sorted(r.status for r in flood)
    assert statuses.count(200) == 3 and statuses.count(503) == 13
    shed = next(r for r in flood if r.status == 503)
    assert shed.headers["retry-after"] == "1"
    assert shed.headers["content-type"] == "application/problem+json"
    assert find_audit_event(env.gw, shed.headers["x-request-id"]).reason == "limit.concurrency_tenant_share"
    assert env.settled("shared")


def test_adaptive_concurrency_sheds_when_the_upstream_slows_and_recovers(env: Env) -> None:
    client = env.as_("b")
    ctl = env.limiter.controllers["adaptive"]

    def hammer(path: str, threads: int, seconds: float) -> list[int]:
        out: list[int] = []
        stop = time.monotonic() + seconds

        def worker() -> None:
            while time.monotonic() < stop:
                r = client.request("GET", path)
                out.append(r.status)
                if r.status == 503:
                    assert r.headers["retry-after"].isdigit()
                    time.sleep(0.02)

        ts = [threading.Thread(target=worker) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(15)
        return out

    fast = hammer("/a/0.005", 4, 0.6)
    assert set(fast) == {200}
    assert ctl.current == 40 and ctl.min_rtt is not None and ctl.min_rtt < 0.1
    slow = hammer("/a/0.3", 24, 2.5)
    assert ctl.current < 24, ctl.current  # shrunk well below the configured 40
    assert slow.count(503) > 0 and slow.count(200) > 0
    assert env.settled("adaptive")
    hammer("/a/0.005", 4, 1.5)
    deadline = time.monotonic() + 5
    while ctl.current < 40 and time.monotonic() < deadline:
        hammer("/a/0.005", 4, 0.3)
    assert ctl.current == 40  # recovered


def test_slots_are_released_after_errors_timeouts_and_streams(env: Env) -> None:
    client = env.as_("b")
    assert client.request("GET", "/p/dead").status == 502
    assert env.settled("dead")
    assert client.request("GET", "/p/slow/2").status == 504
    assert client.request("GET", "/p/big/3000000").status == 200
    answers = parallel(10, lambda: client.request("GET", "/p/big/200000"))
    assert {r.status for r in answers} == {200}
    assert env.settled("plain")
    assert env.limiter.tenant_in_flight("tenant-b") == 0


def test_slot_released_when_the_client_hangs_up_mid_stream(env: Env) -> None:
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(f"GET /p/big/50000000 HTTP/1.1\r\nhost: gw\r\nx-api-key: {env.keys['b']}\r\n\r\n".encode())
        got = b""
        while len(got) < 200_000:
            chunk = s.recv(65536)
            assert chunk
            got += chunk
        assert env.limiter.in_flight.get("plain", 0) == 1  # still streaming: the slot is held
    assert env.settled("plain", timeout=20)


def test_quota_headers_refusal_and_audit(env: Env) -> None:
    client = env.as_("q")
    first = client.request("GET", "/p/echo")
    assert first.status == 200
    policy = first.headers["ratelimit-policy"]
    assert '"per-client";q=1000;w=60' in policy and '"quota-tenant-day";q=3;w=' in policy
    assert '"quota-tenant-month";q=100;w=' in policy
    assert first.headers["ratelimit"].startswith('"quota-tenant-day";r=2;t=')
    assert [client.request("GET", "/p/echo").status for _ in range(3)] == [200, 200, 429]
    refused = client.request("GET", "/p/echo")
    assert refused.status == 429 and refused.json()["type"].endswith("/rate-limited")
    retry = int(refused.headers["retry-after"])
    assert 1 <= retry <= 25 * 3600  # until the next midnight in Berlin
    assert refused.headers["ratelimit"] == f'"quota-tenant-day";r=0;t={retry}'
    ev = find_audit_event(env.gw, refused.headers["x-request-id"])
    assert (ev.reason, ev.extra["rate_limit"]) == ("limit.quota", "quota-tenant-day")
    # Another tenant has no quota configured.
    assert env.as_("b").request("GET", "/p/echo").status == 200


def test_bad_credential_flood_is_turned_away_before_authentication(env: Env) -> None:
    attacker = Client(env.port, {"X-Forwarded-For": "198.51.100.7"})
    statuses = [attacker.request("GET", "/p/echo", {"X-API-Key": f"pcl_bogus{i}"}).status for i in range(8)]
    assert statuses[:6] == [401] * 6 and statuses[6:] == [429, 429]
    blocked = attacker.request("GET", "/p/echo", {"X-API-Key": env.keys["b"]})  # even a good key
    assert blocked.status == 429
    assert 25 <= int(blocked.headers["retry-after"]) <= 30
    ev = find_audit_event(env.gw, blocked.headers["x-request-id"])
    assert ev.reason == "abuse.blocked" and ev.credential_id == ""  # refused before authentication
    # Another address, and the exempt loopback, are not affected.
    assert Client(env.port, {"X-Forwarded-For": "198.51.100.8", "X-API-Key": env.keys["b"]}).request(
        "GET", "/p/echo").status == 200
    assert env.as_("b").request("GET", "/p/echo").status == 200


def test_quota_counts_survive_a_restart(echo: UpstreamThread, tmp_path: Path) -> None:
    port = free_port()
    doc = traffic_config(echo.url, port)
    doc["traffic"] = {"quotas": {"timezone": "UTC", "per_tenant": {"day": 3}}}
    loaded = write_config(tmp_path, doc)
    _, key = create_key(loaded.data_dir, name="k", tenant="t1", scopes=["s"], roles=[])
    client = Client(port, {"X-API-Key": key})
    gw = GatewayThread(loaded)
    gw.start()
    try:
        assert [client.request("GET", "/p/echo").status for _ in range(2)] == [200, 200]
    finally:
        gw.stop()
    assert (tmp_path / "traffic.db").exists()
    gw = GatewayThread(loaded)
    gw.start()
    try:
        assert [client.request("GET", "/p/echo").status for _ in range(2)] == [200, 429]
    finally:
        gw.stop()
