"""A real gateway with the authorization server mounted, in front of the demo upstream.

`as_env` gives the port, the issuer URL and the live `AuthContext` (to seed tenants,
clients and users the way the CLI does). Tests drive it over real HTTP.

Which database: the authorization server's own SQLite file by default. With
``PORTCULLIS_TEST_OAUTH_PG=1`` in the environment, every gateway these suites start
(`as_env`, `make_flow_env`, `start_env`, the CLI tests' config) keeps its stores in a
fresh schema of the shared PostgreSQL instead (``storage.url``; the server is
``PORTCULLIS_TEST_PG``, see tests/unit/storage/backends.py), dropped afterwards.
test_on_postgres.py runs a representative set on PostgreSQL whatever the variable says.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.service import AuthContext
from tests.integration.harness import Client, GatewayThread, free_port, write_config
from tests.unit.storage.backends import PG_URL, PgDatabase, pg_reachable

#: Set (to anything but "" or "0") to run the oauth integration suites on PostgreSQL.
ON_PG_ENV = "PORTCULLIS_TEST_OAUTH_PG"


def postgres_requested() -> bool:
    return os.environ.get(ON_PG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def oauth_storage(on_postgres: bool | None = None) -> Iterator[dict[str, Any] | None]:
    """The gateway config's `storage:` section for one test environment: None (SQLite
    files in the data directory) unless `on_postgres` (default: `postgres_requested()`),
    then a fresh PostgreSQL schema, dropped when the block ends (after the gateway has
    stopped). Skips, saying why, when PostgreSQL is not reachable."""
    if on_postgres is None:
        on_postgres = postgres_requested()
    if not on_postgres:
        yield None
        return
    why = pg_reachable()
    if why is not None:
        pytest.skip(why)
    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"),
                             connect_args={"connect_timeout": 2})
    pg = PgDatabase(admin)
    schema = pg.schema()
    try:
        yield {"url": schema.url, "connect_timeout_seconds": 2}
    finally:
        pg.drop(schema)
        admin.dispose()


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


def make_as_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory, *,
                on_postgres: bool | None = None) -> Iterator[AsEnv]:
    """`as_env`'s body (on PostgreSQL when `on_postgres`, or as `oauth_storage` decides)."""
    with oauth_storage(on_postgres) as storage:
        data_dir = tmp_path_factory.mktemp("as")
        port, mport = free_port(), free_port()
        issuer = f"http://127.0.0.1:{port}"
        doc = demo_config(upstream.url, port, mport)
        doc["auth_server"] = {"issuer": issuer}
        if storage is not None:
            doc["storage"] = storage
        loaded = write_config(data_dir, doc)
        gw = GatewayThread(loaded)
        gw.start()
        try:
            auth = gw.gw.auth_server
            assert auth is not None
            auth.ctx.clients.create_tenant("acme")
            auth.ctx.clients.create_tenant("globex")
            yield AsEnv(port, issuer, loaded.data_dir, gw, auth.ctx)
        finally:
            gw.stop()


@pytest.fixture(scope="module")
def as_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AsEnv]:
    yield from make_as_env(upstream, tmp_path_factory)
