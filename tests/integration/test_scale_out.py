"""Scale-out evidence (issue 6): real gateway processes sharing real PostgreSQL and Redis.

- Two nodes, each with its OWN data directory (as on two machines) holding identical
  copies of `secrets/`, both bound to one PostgreSQL schema (`storage.url`) and one Redis
  key prefix: a limit of N per minute shared by both admits N (+ what refills meanwhile)
  within 1 %; an API key and a token revocation made with the CLI against one node's
  config are honoured by the other within a second; a key created with the CLI works on
  both nodes; the one audit chain both nodes write verifies.
- Redis dies under a running node (a THROWAWAY redis-server): `limits: open` keeps
  serving under local limits and logs the alert, `limits: closed` answers 503
  `limit.backend_unavailable`, DPoP proofs are refused (the replay cache fails closed);
  all recover when Redis returns, without a restart.
- PostgreSQL dies under a running node (a THROWAWAY cluster): every request a client saw
  answered has exactly one audit event once the database is back, and
  `portcullis audit verify` passes.

The shared servers are never stopped; the module skips, saying why, when they are not
reachable. Every process started here is stopped in a `finally`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from joserfc.jwk import ECKey

from portcullis.credentials.rfc9449 import jwk_thumbprint
from portcullis.demo.upstream import UpstreamThread
from portcullis.gateway import open_audit_store
from tests.integration.harness import free_port
from tests.integration.issuer import IssuerApp
from tests.integration.redis_harness import ThrowawayRedis, shared_redis_url, unique_prefix
from tests.integration.test_dpop_gateway import proof
from tests.integration.test_postgres_audit_fault import PG_BIN, ThrowawayPostgres
from tests.unit.storage.backends import PG_URL, PgDatabase, PgSchema, pg_reachable

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
AUD = "https://api.example"

pytestmark = pytest.mark.services


# -- processes -------------------------------------------------------------------------


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`portcullis ARGS` as an operator runs it (a separate process)."""
    r = subprocess.run([sys.executable, "-m", "portcullis", *args], capture_output=True, text=True,
                       timeout=60, env=ENV, cwd=ROOT)
    if check and r.returncode != 0:
        raise AssertionError(f"portcullis {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def create_key(config: Path, name: str, scope: str = "projects:read", tenant: str = "acme") -> tuple[str, str]:
    """(key, key id) from `portcullis keys create --json`."""
    out = cli("keys", "create", "--config", str(config), "--name", name, "--tenant", tenant, "--scope", scope,
              "--json").stdout
    doc = json.loads(out)
    return doc["key"], doc["key_id"]


class Node:
    """`python -m portcullis serve --config F [args]` with its output in a log file."""

    def __init__(self, config: Path, port: int, *args: str) -> None:
        self.config = config
        self.port = port
        self.log_path = config.parent / f"{config.stem}-{port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "portcullis", "serve", "--config", str(config), *args],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)

    def wait_ready(self, timeout: float = 30.0) -> Node:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__ready__", timeout=1):
                    return self
            except urllib.error.HTTPError:
                return self  # answered (404): serving
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"node did not start in {timeout}s:\n{self.output()[-4000:]}")

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, then SIGKILL if it does not stop in time; the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(*nodes: Node) -> Iterator[None]:
    try:
        for n in nodes:
            n.wait_ready()
        yield
    finally:
        for n in nodes:
            n.stop()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
    """Seconds until `cond()` held; AssertionError after `timeout`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not reached within {timeout}s")
        time.sleep(step)
    return time.monotonic() - start


def write_yaml(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def node_doc(port: int, upstream: str, *, storage: str | None = None, redis: dict[str, Any] | None = None,
             issuer: str | None = None, **extra: Any) -> dict[str, Any]:
    """A gateway config: `/echo/{x}` behind an API key or a JWT (scope projects:read),
    limited by `rate_limit` when `extra` defines one."""
    auth = ["api_key", *(["jwt"] if issuer else [])]
    route: dict[str, Any] = {"name": "echo", "path": "/echo/{x}", "methods": ["GET"], "upstream": "echo",
                             "auth": auth, "scopes": ["projects:read"]}
    if "rate_limits" in extra:
        route["rate_limit"] = next(iter(extra["rate_limits"]))
    doc: dict[str, Any] = {
        "data_dir": "./data",
        "server": {"listen": {"host": "127.0.0.1", "port": port}, "metrics": None, "shutdown_grace_seconds": 5},
        "upstreams": {"echo": {"url": upstream}},
        "routes": [route],
        **extra,
    }
    if storage is not None:
        doc["storage"] = {"url": storage, "connect_timeout_seconds": 2, "statement_timeout_seconds": 5}
    if redis is not None:
        doc["redis"] = redis
    if issuer is not None:
        doc["jwt"] = {"issuers": [{"issuer": issuer, "discovery": True, "audience": AUD}]}
    return doc


def redis_cleanup(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# -- shared fixtures -------------------------------------------------------------------


@pytest.fixture(scope="module")
def issuer() -> Iterator[IssuerApp]:
    app = IssuerApp()
    t = UpstreamThread(app)
    app.issuer = t.url
    t.start()
    yield app
    t.stop()


@pytest.fixture(scope="module")
def pg_schema() -> Iterator[PgSchema]:
    why = pg_reachable()
    if why is not None:
        pytest.skip(why)
    admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"),
                             connect_args={"connect_timeout": 2})
    db = PgDatabase(admin)
    schema = db.schema()
    try:
        yield schema
    finally:
        db.drop(schema)
        admin.dispose()


@pytest.fixture(scope="module")
def shared_redis() -> Iterator[tuple[str, str]]:
    url = shared_redis_url()
    prefix = unique_prefix()
    try:
        yield url, prefix
    finally:
        redis_cleanup(url, prefix)


# -- 1. two nodes, shared PostgreSQL and Redis -------------------------------------------

LIMIT = 1000  # per minute, burst LIMIT: all of it available at once
QUOTA = 10**9  # per tenant and month
ABUSE_BURST = 40  # 401s per second from one source before it is blocked


@dataclass
class Cluster:
    a: Node
    b: Node
    config_a: Path
    config_b: Path
    key: str
    key_id: str


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, pg_schema: PgSchema, shared_redis: tuple[str, str],
            echo: UpstreamThread, issuer: IssuerApp) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    url, prefix = shared_redis
    redis = {"url": url, "key_prefix": prefix, "on_failure": {"limits": "closed"}}
    limits = {"rate_limits": {"shared": {"requests": LIMIT, "per_seconds": 60, "burst": LIMIT, "key": "tenant"}},
              # A quota no test reaches: its counts go to Redis and to the shared ledger.
              "traffic": {"quotas": {"per_tenant": {"month": QUOTA}, "flush_seconds": 0.2},
                          # Abuse control only a burst of bad keys reaches (every test is 127.0.0.1).
                          "abuse": {"statuses": [401], "threshold": ABUSE_BURST, "window_seconds": 1,
                                    "block_seconds": 2, "max_block_seconds": 4}}}
    ports = free_port(), free_port()
    config_a = write_yaml(root / "a" / "gw.yaml", node_doc(ports[0], echo.url, storage=pg_schema.url,
                                                          redis=redis, issuer=issuer.issuer, **limits))
    config_b = write_yaml(root / "b" / "gw.yaml", node_doc(ports[1], echo.url, storage=pg_schema.url,
                                                          redis=redis, issuer=issuer.issuer, **limits))
    # The operator's order (docs/scale-out.md): migrate once, initialise the secrets on
    # the first node, copy `secrets/` to every other node, then start them all.
    cli("db", "upgrade", "--config", str(config_a))
    key, key_id = create_key(config_a, "shared-load")
    a = Node(config_a, ports[0])
    a.wait_ready()
    try:
        shutil.copytree(root / "a" / "data" / "secrets", root / "b" / "data" / "secrets")
        cli("db", "upgrade", "--config", str(config_b))  # binds b's data directory; nothing to migrate
        b = Node(config_b, ports[1])
        with running(b):
            yield Cluster(a, b, config_a, config_b, key, key_id)
    finally:
        a.stop()


def test_key_created_with_the_cli_works_on_both_nodes(cluster: Cluster) -> None:
    key, _ = create_key(cluster.config_b, "made-on-b")
    auth = {"Authorization": f"Bearer {key}"}
    for node in (cluster.a, cluster.b):
        wait_for(lambda n=node: get(n.port, "/echo/x", auth).status == 200, 2.0)  # type: ignore[misc]
    assert get(cluster.a.port, "/echo/x", {"Authorization": "Bearer pcl_nope_nope"}).status == 401


def test_shared_limit_admits_n_within_one_percent_across_both_nodes(cluster: Cluster) -> None:
    auth = {"Authorization": f"Bearer {cluster.key}"}
    attempts_per_thread = 2 * LIMIT // 16 + 40
    results: list[tuple[int, int, int, float, float]] = []  # node, admitted, refused, first, last
    lock = threading.Lock()
    errors: list[str] = []
    go = threading.Event()

    def hammer(port: int) -> None:
        admitted = refused = 0
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        go.wait()
        first = time.time()
        try:
            for _ in range(attempts_per_thread):
                conn.request("GET", "/echo/load", headers=auth)
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    admitted += 1
                elif r.status == 429:
                    refused += 1
                else:
                    errors.append(f"{port}: {r.status}")
        finally:
            conn.close()
        with lock:
            results.append((port, admitted, refused, first, time.time()))

    threads = [threading.Thread(target=hammer, args=(n.port,)) for _ in range(8) for n in (cluster.a, cluster.b)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    assert not errors, errors[:5]
    admitted = sum(r[1] for r in results)
    attempts = sum(r[1] + r[2] for r in results)
    per_node = {port: sum(r[1] for r in results if r[0] == port) for port in (cluster.a.port, cluster.b.port)}
    assert all(v > 0.2 * LIMIT for v in per_node.values()), per_node  # both nodes really admitted
    # GCRA: the burst, plus one request per 60/N s that passed while the clients ran.
    elapsed = max(r[4] for r in results) - min(r[3] for r in results)
    expected = LIMIT + elapsed * LIMIT / 60
    assert attempts > 1.5 * expected, "not saturated"
    print(f"admitted {admitted} of {attempts} in {elapsed:.2f}s, expected {expected:.1f}, per node {per_node}")
    assert abs(admitted - expected) <= 0.01 * LIMIT, f"admitted {admitted}, expected {expected:.1f}"


def test_quota_counts_reach_the_shared_ledger_and_survive_losing_redis(cluster: Cluster, pg_schema: PgSchema,
                                                                     shared_redis: tuple[str, str]) -> None:
    """Both nodes count a tenant's quota in Redis and write it behind to PostgreSQL; when
    Redis loses the counter (a restart, an eviction), it resumes from there, not from 0."""
    import redis

    from portcullis.traffic.ledger import quota_ledger

    key, _ = create_key(cluster.config_a, "quota-ledger", tenant="ledgered")
    auth = {"Authorization": f"Bearer {key}"}
    for node in (cluster.a, cluster.b, cluster.a, cluster.b, cluster.a):
        wait_for(lambda n=node: get(n.port, "/echo/q", auth).status == 200, 2.0)  # type: ignore[misc]
    url, prefix = shared_redis
    client = redis.Redis.from_url(url)
    engine = sa.create_engine(pg_schema.url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        counters = list(client.scan_iter(match=f"{prefix}q:*:tenant:ledgered", count=1000))
        assert len(counters) == 1, counters
        assert int(client.get(counters[0]) or 0) == 5

        def ledgered() -> int:
            with engine.connect() as conn:
                return int(conn.execute(sa.select(quota_ledger.c.used).where(
                    quota_ledger.c.key == "tenant:ledgered")).scalar() or 0)

        wait_for(lambda: ledgered() == 5, 3.0)
        client.delete(counters[0])  # Redis forgets the month so far
        assert get(cluster.b.port, "/echo/q", auth).status == 200
        assert int(client.get(counters[0]) or 0) == 6  # resumed, not restarted at 1
        wait_for(lambda: ledgered() == 6, 3.0)
    finally:
        client.close()
        engine.dispose()


def test_token_revoked_with_one_nodes_config_is_refused_by_the_other_within_a_second(
        cluster: Cluster, issuer: IssuerApp) -> None:
    token = issuer.mint(AUD, sub="user-to-revoke", tenant="other-tenant")
    auth = {"Authorization": f"Bearer {token}"}
    assert get(cluster.a.port, "/echo/t", auth).status == 200
    assert get(cluster.b.port, "/echo/t", auth).status == 200
    cli("tokens", "revoke", "--sub", "user-to-revoke", "--reason", "scale-out test", "--config", str(cluster.config_a))
    # The CLI exits after the commit: from then on, node b's poll interval (0.25 s) is all
    # that may remain (the CLI's own start-up time is not part of the guarantee).
    committed = time.monotonic()
    wait_for(lambda: get(cluster.b.port, "/echo/t", auth).status == 401, 5.0)
    latency = time.monotonic() - committed
    assert latency < 1.0, f"node b refused {latency:.2f}s after the revocation was committed"
    assert get(cluster.a.port, "/echo/t", auth).status == 401
    other = issuer.mint(AUD, sub="someone-else", tenant="other-tenant")
    assert get(cluster.b.port, "/echo/t", {"Authorization": f"Bearer {other}"}).status == 200


def test_api_key_revoked_on_one_node_is_refused_by_the_other_within_a_second(cluster: Cluster) -> None:
    key, key_id = create_key(cluster.config_a, "to-revoke", tenant="revoke-tenant")
    auth = {"Authorization": f"Bearer {key}"}
    wait_for(lambda: get(cluster.b.port, "/echo/k", auth).status == 200, 2.0)
    start = time.monotonic()
    r = cli("keys", "revoke", key_id, "--config", str(cluster.config_b))
    committed = time.monotonic()
    wait_for(lambda: get(cluster.a.port, "/echo/k", auth).status == 401, 5.0)
    after_commit = time.monotonic() - committed
    assert after_commit < 1.0, f"node a refused {after_commit:.2f}s after the CLI returned ({r.stdout})"
    assert committed - start < 30


def test_both_nodes_wrote_one_verifiable_audit_chain(cluster: Cluster) -> None:
    assert get(cluster.a.port, "/echo/audit", {"Authorization": f"Bearer {cluster.key}"}).status in (200, 429)
    wait_for(lambda: "ok:" in cli("audit", "verify", "--config", str(cluster.config_b), check=False).stdout, 10.0,
             step=0.2)
    out = cli("audit", "verify", "--config", str(cluster.config_a)).stdout
    m = re.search(r"ok: (\d+) events", out)
    assert m and int(m.group(1)) > LIMIT, out


def test_abuse_block_earned_across_both_nodes_is_enforced_by_both(cluster: Cluster) -> None:
    """Refusals from one source count together whichever node answered them, and the
    block is enforced by both (the last test on the cluster: it blocks 127.0.0.1)."""
    bad = {"Authorization": "Bearer pcl_nope_nope"}
    statuses = [get(node.port, "/echo/x", bad).status for _ in range(ABUSE_BURST // 2)
                for node in (cluster.a, cluster.b)]
    assert statuses == [401] * ABUSE_BURST  # each node alone saw half the threshold
    assert get(cluster.a.port, "/echo/x", bad).status == 401  # one past it: earns the block
    for node in (cluster.b, cluster.a):
        wait_for(lambda n=node: get(n.port, "/echo/x", bad).status == 429, 1.0)  # type: ignore[misc]
        answer = get(node.port, "/echo/x", {"Authorization": f"Bearer {cluster.key}"})
        assert answer.status == 429 and b"Too many refused requests" in answer.body  # even with a good key
        assert 1 <= int(answer.headers["retry-after"]) <= 4
    time.sleep(4.5)  # leave the cluster unblocked (escalated blocks last at most 4 s)


# -- 2. Redis stops under a running node -------------------------------------------------


def test_redis_outage_follows_the_configured_behaviour(tmp_path: Path, echo: UpstreamThread,
                                                      issuer: IssuerApp) -> None:
    server = ThrowawayRedis(tmp_path)
    server.start()
    nodes: list[Node] = []
    try:
        configs = {}
        keys: dict[int, str] = {}
        for mode in ("open", "closed"):
            port = free_port()
            redis = {"url": server.url, "key_prefix": "fault:", "connect_timeout_ms": 50, "timeout_ms": 50,
                     "on_failure": {"limits": mode, "probe_interval_ms": 100}}
            doc = node_doc(port, echo.url, redis=redis, issuer=issuer.issuer, dpop={},
                           rate_limits={"r": {"requests": 100000, "per_seconds": 60, "burst": 1000,
                                              "key": "tenant"}})
            configs[mode] = write_yaml(tmp_path / mode / "gw.yaml", doc)
            keys[port], _ = create_key(configs[mode], f"k-{mode}")
            nodes.append(Node(configs[mode], port))
        open_node, closed_node = nodes
        for n in nodes:
            n.wait_ready()
        dkey = ECKey.generate_key("P-256")
        token = issuer.mint(AUD, cnf={"jkt": jwk_thumbprint(dkey.as_dict(private=False))})

        def dpop_call(n: Node) -> Answer:
            url = f"http://127.0.0.1:{n.port}/echo/d"
            return get(n.port, "/echo/d", {"Authorization": f"DPoP {token}", "DPoP": proof(dkey, "GET", url, token)})

        def key_call(n: Node) -> Answer:
            return get(n.port, "/echo/k", {"Authorization": f"Bearer {keys[n.port]}"})

        for n in nodes:
            assert key_call(n).status == 200
            assert dpop_call(n).status == 200

        server.stop()  # Redis dies mid-run
        down = time.monotonic()
        for _ in range(20):
            assert key_call(open_node).status == 200  # served, under local limits
        r = key_call(closed_node)
        assert r.status == 503, r.body
        assert r.json()["type"].endswith("service-unavailable")
        assert "retry-after" in r.headers
        refused_id = r.headers["x-request-id"]
        dpop_refused = []
        for n in nodes:
            r = dpop_call(n)
            # The replay check cannot be made: refused (fail closed), retryable.
            assert r.status == 503, (r.status, r.body)
            assert r.headers.get("retry-after") == "1"
            dpop_refused.append(r.headers["x-request-id"])
        assert time.monotonic() - down < 5, "decisions waited on the dead server"
        wait_for(lambda: "ALERT limits backend unavailable" in open_node.output(), 5.0)
        assert "ALERT replay backend unavailable" in open_node.output()

        server.start()  # same port: the clients reconnect by themselves
        for n in nodes:
            wait_for(lambda n=n: key_call(n).status == 200, 5.0, step=0.05)  # type: ignore[misc]
            wait_for(lambda n=n: dpop_call(n).status == 200, 5.0, step=0.05)  # type: ignore[misc]
        for n in nodes:
            assert n.stop() == 0
        # The reason code is for the audit log only (never sent to the client).
        assert audit_reason(tmp_path / "closed" / "data", refused_id) == "limit.backend_unavailable"
        for mode, rid in zip(("open", "closed"), dpop_refused, strict=True):
            assert audit_reason(tmp_path / mode / "data", rid) == "dpop.replay_unavailable"
    finally:
        for n in nodes:
            n.stop()
        server.stop()


def audit_reason(data_dir: Path, request_id: str) -> str:
    store = open_audit_store(data_dir, writable=False)
    try:
        for ev in store.iter_events():
            if ev.request_id == request_id:
                return ev.reason
    finally:
        store.close()
    raise AssertionError(f"no audit event for {request_id}")


# -- 3. PostgreSQL stops under a running node -------------------------------------------


def test_postgres_outage_loses_no_acknowledged_audit_event(tmp_path: Path, echo: UpstreamThread) -> None:
    if not all(p.exists() for p in PG_BIN):
        pytest.skip("initdb/pg_ctl not installed: cannot start a throwaway PostgreSQL")
    pg = ThrowawayPostgres()
    node: Node | None = None
    try:
        pg.start()
        port = free_port()
        config = write_yaml(tmp_path / "gw.yaml", node_doc(port, echo.url, storage=pg.url))
        cli("db", "upgrade", "--config", str(config))
        key, _ = create_key(config, "pg-fault")
        node = Node(config, port)
        node.wait_ready()
        answered: list[str] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()
        failures: list[str] = []

        def client() -> None:
            auth = {"Authorization": f"Bearer {key}"}
            while not stop.is_set():
                try:
                    r = get(port, "/echo/pg", auth, timeout=10)
                except OSError as exc:  # not answered: not acknowledged, nothing to check
                    failures.append(type(exc).__name__)
                    continue
                with lock:
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    answered.append(r.headers["x-request-id"])

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)
            before = len(answered)
            pg.stop()  # like a crash
            time.sleep(2.0)
            during = len(answered) - before
            pg.start()
            time.sleep(1.0)
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert during > 50, f"the node stopped serving while the database was down ({statuses})"
        assert statuses.get(200, 0) > 0.95 * len(answered), statuses
        assert not failures, failures[:5]

        want = set(answered)

        def audited() -> list[str]:
            engine = sa.create_engine(pg.url.replace("postgresql://", "postgresql+psycopg://"))
            try:
                with engine.connect() as conn:
                    return [r[0] for r in conn.exec_driver_sql("SELECT request_id FROM events WHERE kind = 'request'")]
            finally:
                engine.dispose()

        # The spool drains by itself once the database is back.
        wait_for(lambda: want <= set(audited()), 30.0, step=0.25)
        assert node.stop() == 0
        node = None
        ids = audited()
        counts: dict[str, int] = {}
        for rid in ids:
            counts[rid] = counts.get(rid, 0) + 1
        assert all(counts.get(rid) == 1 for rid in want), [rid for rid in want if counts.get(rid) != 1][:5]
        assert not list((tmp_path / "data" / "audit-spool").glob("*/*.batch"))
        out = cli("audit", "verify", "--config", str(config)).stdout
        assert out.startswith("ok:"), out
        print(f"{len(want)} answered ({statuses}), {during} while PostgreSQL was down; all audited once")
    finally:
        if node is not None:
            node.stop()
        pg.destroy()
