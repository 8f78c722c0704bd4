"""Fixtures: the real demo upstream and a real gateway in front of it, with keys."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import DemoApi, UpstreamThread
from portcullis.keysadmin import create_key, revoke_key
from tests.integration.echo import EchoApp
from tests.integration.harness import Client, GatewayThread, free_port, write_config


@dataclass
class Env:
    client: Client
    keys: dict[str, str]
    key_ids: dict[str, str]
    data_dir: Path
    gateway: GatewayThread
    metrics_port: int

    def as_(self, name: str) -> Client:
        return Client(self.client.port, {"Authorization": f"Bearer {self.keys[name]}"})


@pytest.fixture(scope="module")
def echo() -> Iterator[UpstreamThread]:
    """An upstream that answers with what it received (tests/integration/echo.py)."""
    t = UpstreamThread(EchoApp())
    t.start()
    yield t
    t.stop()


@pytest.fixture(scope="session")
def upstream() -> Iterator[UpstreamThread]:
    t = UpstreamThread(DemoApi())
    t.start()
    yield t
    t.stop()


KEYS = {
    "reader": ("acme", ["projects:read"], [], None, None),
    "writer": ("acme", ["projects:read", "projects:write", "billing:read"], [], None, None),
    "admin": ("acme", ["projects:read", "projects:write"], ["tenant-admin"], None, None),
    "globex": ("globex", ["projects:read"], [], None, None),
    "expired": ("acme", ["projects:read"], [], -10.0, None),
    "revoked": ("acme", ["projects:read"], [], None, None),
    "limited": ("acme", ["projects:read"], [], None, (3, 60.0, 3)),
}


@pytest.fixture(scope="module")
def env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    data_dir = tmp_path_factory.mktemp("gw")
    port, mport = free_port(), free_port()
    doc = demo_config(upstream.url, port, mport)
    doc["normalize"] = {"max_body_bytes": 65536, "trusted_proxies": ["10.9.9.9"]}
    doc["routes"].append({"name": "bench", "methods": ["GET"], "path": "/bench", "upstream": "demo-api",
                          "public": True})
    loaded = write_config(data_dir, doc)
    keys: dict[str, str] = {}
    ids: dict[str, str] = {}
    for name, (tenant, scopes, roles, exp, rl) in KEYS.items():
        rec, key = create_key(loaded.data_dir, name=name, tenant=tenant, scopes=scopes, roles=roles,
                              expires_at=time.time() + exp if exp is not None else None, rate_limit=rl)
        keys[name], ids[name] = key, rec.key_id
    revoke_key(loaded.data_dir, ids["revoked"])
    gw = GatewayThread(loaded)
    gw.start()
    yield Env(Client(port), keys, ids, loaded.data_dir, gw, mport)
    gw.stop()


@pytest.fixture(autouse=True)
def _no_leftover_demos() -> Iterator[None]:
    """Every test: a demo it started (tests.integration.test_demo.start_demo) is gone after it."""
    yield
    from tests.integration.test_demo import stop_leftover_demos

    stop_leftover_demos()
