"""A real gateway with the authorization server mounted, in front of the demo upstream.

`as_env` gives the port, the issuer URL and the live `AuthContext` (to seed tenants,
clients and users the way the CLI does). Tests drive it over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.service import AuthContext
from tests.integration.harness import Client, GatewayThread, free_port, write_config


@dataclass
class AsEnv:
    port: int
    issuer: str
    data_dir: Path
    gateway: GatewayThread
    ctx: AuthContext

    @property
    def client(self) -> Client:
        return Client(self.port)


@pytest.fixture(scope="module")
def as_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsEnv]:
    data_dir = tmp_path_factory.mktemp("as")
    port, mport = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    doc = demo_config(upstream.url, port, mport)
    doc["auth_server"] = {"issuer": issuer}
    loaded = write_config(data_dir, doc)
    gw = GatewayThread(loaded)
    gw.start()
    auth = gw.gw.auth_server
    assert auth is not None
    auth.ctx.clients.create_tenant("acme")
    auth.ctx.clients.create_tenant("globex")
    yield AsEnv(port, issuer, loaded.data_dir, gw, auth.ctx)
    gw.stop()
