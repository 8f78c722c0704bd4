"""Owner sources (BOLA) against real backends: a SQLite table, a YAML map, a real local
HTTP service, response headers; and BOLA probes across users and tenants through the engine."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import ValidationError

from portcullis.policy.config import (
    HeaderOwnerSourceConfig,
    PolicyConfig,
    TableOwnerSourceConfig,
    UpstreamOwnerSourceConfig,
)
from portcullis.policy.owners import (
    HeaderOwnerSource,
    Owner,
    OwnerLookupError,
    SqlOwnerSource,
    StaticOwnerSource,
    UpstreamOwnerSource,
    build_owner_source,
)

from .helpers import WEDNESDAY_10, engine, principal

OWNERS = {"p1": ("alice", "acme"), "p2": ("bob", "acme"), "g1": ("gina", "globex")}


class OwnerService:
    """A real HTTP owner service: ``/owners/<type>/<id>``; ids starting ``slow`` stall,
    ``bad`` answers garbage, ``boom`` a 500. Records every raw path it saw."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = scope["raw_path"].decode()
        self.paths.append(raw)
        rid = scope["path"].rsplit("/", 1)[-1]
        status, body = 404, b'{"error": "not found"}'
        if rid.startswith("slow"):
            await asyncio.sleep(2)
        elif rid == "bad":
            status, body = 200, b'{"owner": 42}'
        elif rid == "boom":
            status, body = 500, b"oops"
        elif rid in OWNERS and scope["path"].startswith("/owners/Project/"):
            owner, tenant = OWNERS[rid]
            status, body = 200, json.dumps({"owner": owner, "tenant": tenant}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def owner_service() -> AsyncIterator[tuple[OwnerService, int]]:
    app = OwnerService()
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.01)
    yield app, port
    server.should_exit = True
    await asyncio.wait_for(task, 5)


def upstream_source(port: int, **kw: Any) -> UpstreamOwnerSource:
    cfg = UpstreamOwnerSourceConfig(kind="upstream", url=f"http://127.0.0.1:{port}/owners/{{type}}/{{id}}", **kw)
    src = UpstreamOwnerSource(cfg)
    src.open()
    return src


async def test_upstream_source_answers_and_caches(owner_service: tuple[OwnerService, int]) -> None:
    _, port = owner_service
    src = upstream_source(port, cache_seconds=60)
    try:
        assert await src.lookup("Project", "p1", "acme") == Owner("alice", "acme")
        assert await src.lookup("Project", "p1", "acme") == Owner("alice", "acme")
        assert await src.lookup("Project", "nope", "acme") is None  # 404: no such resource
        assert await src.lookup("Project", "nope", "acme") is None  # negative answers cached too
        assert src.calls == 2
    finally:
        await src.close()


async def test_upstream_source_encodes_ids(owner_service: tuple[OwnerService, int]) -> None:
    app, port = owner_service
    src = upstream_source(port, cache_seconds=0)
    try:
        # Reserved characters stay inside one encoded segment.
        assert await src.lookup("Project", "p1?x=1#", "acme") is None
        assert app.paths[-1] == "/owners/Project/p1%3Fx%3D1%23"
        # Ids that could traverse on a server decoding %2F are refused before any request.
        seen = len(app.paths)
        for rid in ("../Project/p1", "..", "a\\b", "p1\n"):
            with pytest.raises(OwnerLookupError):
                await src.lookup("Project", rid, "acme")
        assert len(app.paths) == seen
    finally:
        await src.close()


@pytest.mark.parametrize("rid", ["bad", "boom", "slow1"])
async def test_upstream_source_fails_closed(owner_service: tuple[OwnerService, int], rid: str) -> None:
    _, port = owner_service
    src = upstream_source(port, timeout_seconds=0.3)
    try:
        with pytest.raises(OwnerLookupError):
            await src.lookup("Project", rid, "acme")
    finally:
        await src.close()


async def test_upstream_unreachable_fails_closed() -> None:
    src = upstream_source(_free_port(), timeout_seconds=0.5)
    try:
        with pytest.raises(OwnerLookupError):
            await src.lookup("Project", "p1", "acme")
    finally:
        await src.close()


async def test_upstream_cache_is_bounded(owner_service: tuple[OwnerService, int]) -> None:
    _, port = owner_service
    src = upstream_source(port, cache_size=2)
    try:
        for rid in ("p1", "p2", "g1", "x"):
            await src.lookup("Project", rid, None)
        assert len(src._cache) == 2
    finally:
        await src.close()


async def test_sqlite_source(tmp_path: Path) -> None:
    db = tmp_path / "owners.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table resource_owners (resource_id text, owner text, tenant text)")
        conn.executemany("insert into resource_owners values (?, ?, ?)",
                         [(k, v[0], v[1]) for k, v in OWNERS.items()] + [("dup", "a", "acme"), ("dup", "b", "acme")])
    cfg = TableOwnerSourceConfig(kind="table", sqlite=db.name)
    src = build_owner_source(cfg, tmp_path)
    assert isinstance(src, SqlOwnerSource)
    assert await src.lookup("Project", "g1", None) == Owner("gina", "globex")
    assert await src.lookup("Project", "zzz", None) is None
    with pytest.raises(OwnerLookupError, match="several rows"):  # ambiguous ownership refuses
        await src.lookup("Project", "dup", None)
    # A change is seen at once (no cache).
    with sqlite3.connect(db) as conn:
        conn.execute("update resource_owners set owner = 'mallory' where resource_id = 'p1'")
    assert await src.lookup("Project", "p1", None) == Owner("mallory", "acme")
    await src.close()
    missing = build_owner_source(TableOwnerSourceConfig(kind="table", sqlite="absent.db", table="nothere"), tmp_path)
    with pytest.raises(OwnerLookupError):
        await missing.lookup("Project", "p1", None)


async def test_yaml_and_inline_sources(tmp_path: Path) -> None:
    (tmp_path / "owners.yaml").write_text("p1: {owner: alice, tenant: acme}\n")
    src = build_owner_source(TableOwnerSourceConfig(kind="table", file="owners.yaml"), tmp_path)
    assert isinstance(src, StaticOwnerSource)
    assert await src.lookup("Project", "p1", None) == Owner("alice", "acme")
    (tmp_path / "bad.yaml").write_text("p1: {owner: alice, role: admin}\n")
    with pytest.raises(ValueError, match="entry 'p1'"):
        build_owner_source(TableOwnerSourceConfig(kind="table", file="bad.yaml"), tmp_path)


def test_header_source() -> None:
    src = HeaderOwnerSource(HeaderOwnerSourceConfig(kind="header"))
    assert src.deferred
    named = [(b"X-Resource-Owner", b"alice"), (b"x-resource-tenant", b"acme")]
    assert src.from_headers(named) == Owner("alice", "acme")
    assert src.from_headers([(b"content-type", b"x")]) is None
    for bad in ([(b"x-resource-owner", b"a"), (b"x-resource-owner", b"b")], [(b"x-resource-owner", b"\xff")],
                [(b"x-resource-owner", b"a\x01")]):
        with pytest.raises(OwnerLookupError):
            src.from_headers(bad)


def test_header_source_cannot_guard_writes(tmp_path: Path) -> None:
    from portcullis.policy.mapping import check_routes

    from .helpers import ROUTES, cfg

    c = cfg(owner_sources={"projects": {"kind": "header"}})
    errs = check_routes(c, ROUTES)
    assert any("resources.project.owner" in e and "PUT" in e for e in errs), errs


async def test_bola_probes_across_users_and_tenants(tmp_path: Path,
                                                    owner_service: tuple[OwnerService, int]) -> None:
    """alice/bob (acme) and gina (globex), all editors with the right scope, probe each
    other's projects through the real owner service."""
    _, port = owner_service
    eng = engine(tmp_path, {"ops.cedar": '@id("editors")\npermit (principal in Role::"editor", action, resource);\n'},
                 library=["tenant_isolation", "owner_only_writes"])
    src = upstream_source(port)
    people = {"alice": principal("alice", "acme"), "bob": principal("bob", "acme"),
              "gina": principal("gina", "globex")}
    try:
        outcomes: dict[tuple[str, str, str, str], bool] = {}
        for who, p in people.items():
            for rid in OWNERS:
                for path_tenant in ("acme", "globex"):
                    for method in ("GET", "PUT"):
                        owner = await src.lookup("Project", rid, path_tenant)
                        inp = eng.build_input(p, route="project", method=method, now=WEDNESDAY_10,
                                              path_params={"tenant": path_tenant, "id": rid},
                                              client_ip="10.0.0.1", owner=owner)
                        outcomes[(who, rid, path_tenant, method)] = eng.decide(inp).allowed
    finally:
        await src.close()
    allowed = {k for k, v in outcomes.items() if v}
    assert allowed == {
        ("alice", "p1", "acme", "GET"), ("alice", "p1", "acme", "PUT"), ("alice", "p2", "acme", "GET"),
        ("bob", "p1", "acme", "GET"), ("bob", "p2", "acme", "GET"), ("bob", "p2", "acme", "PUT"),
        ("gina", "g1", "globex", "GET"), ("gina", "g1", "globex", "PUT"),
    }


def test_policy_config_builds_every_kind(tmp_path: Path) -> None:
    c = PolicyConfig.model_validate({"owner_sources": {
        "a": {"kind": "table", "entries": {"x": {"owner": "o"}}},
        "b": {"kind": "upstream", "url": "https://owners.example/{type}/{id}?t={tenant}"},
        "c": {"kind": "header", "owner_header": "X-Owner"}}})
    kinds = {n: type(build_owner_source(s, tmp_path)).__name__ for n, s in c.owner_sources.items()}
    assert kinds == {"a": "StaticOwnerSource", "b": "UpstreamOwnerSource", "c": "HeaderOwnerSource"}


async def test_table_source_in_postgresql() -> None:
    """`url:` reads the owner table from the platform's own database (the real PostgreSQL
    server, a throwaway schema); ambiguous rows refuse; an unreachable database fails closed."""
    import sqlalchemy as sa

    from tests.unit.storage.backends import PG_URL, PgDatabase, pg_reachable

    why = pg_reachable()
    if why is not None:
        pytest.skip(why)
    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
    db = PgDatabase(admin)
    schema = db.schema()
    try:
        eng = schema.engine()
        with eng.begin() as conn:
            conn.exec_driver_sql("create table resource_owners (resource_id text, owner text, tenant text)")
            for k, (owner, tenant) in [*OWNERS.items(), ("dup", ("a", "acme")), ("dup", ("b", "acme"))]:
                conn.exec_driver_sql("insert into resource_owners values (%s, %s, %s)", (k, owner, tenant))
        eng.dispose()
        src = build_owner_source(TableOwnerSourceConfig(kind="table", url=schema.url), Path("."))
        assert isinstance(src, SqlOwnerSource)
        try:
            assert await src.lookup("Project", "g1", None) == Owner("gina", "globex")
            assert await src.lookup("Project", "zzz", None) is None
            with pytest.raises(OwnerLookupError, match="several rows"):
                await src.lookup("Project", "dup", None)
        finally:
            await src.close()
        down = build_owner_source(TableOwnerSourceConfig(kind="table", url="postgresql://nobody@127.0.0.1:1/none"),
                                  Path("."))
        with pytest.raises(OwnerLookupError, match="unavailable"):
            await down.lookup("Project", "p1", None)
        await down.close()
    finally:
        db.drop(schema)
        admin.dispose()


def test_table_source_url_is_checked() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        TableOwnerSourceConfig(kind="table", url="postgresql://u@h/db", sqlite="x.db")
    with pytest.raises(ValidationError, match="unsupported database"):
        TableOwnerSourceConfig(kind="table", url="mysql://u@h/db")
