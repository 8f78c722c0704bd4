"""`portcullis serve --workers N` as a real process tree: with `redis:` two workers share
one port and both serve (each worker's own metrics listener counts what it answered),
one limit is shared by both, SIGTERM stops every worker and the supervisor exits 0;
without `redis:` the supervisor refuses to start with a clear message and exit 1."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from portcullis.demo.upstream import UpstreamThread
from tests.integration.harness import free_port
from tests.integration.redis_harness import shared_redis_url, unique_prefix
from tests.integration.test_scale_out import ENV, ROOT, Node, create_key, node_doc, redis_cleanup, write_yaml

pytestmark = pytest.mark.services


def two_free_ports() -> int:
    """A port p with p+1 free too (worker i's metrics listen on metrics.port + i)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no two adjacent free ports")


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def served(metrics_port: int) -> int:
    """Requests this worker answered, from its own `portcullis_requests` counters."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return int(sum(float(m) for m in re.findall(r"^portcullis_requests_total\{[^}]*\} (\S+)$", text, re.M)))


def test_two_workers_share_the_port_and_stop_cleanly(tmp_path: Path, echo: UpstreamThread) -> None:
    url = shared_redis_url()
    prefix = unique_prefix()
    port, mport = free_port(), two_free_ports()
    doc = node_doc(port, echo.url, redis={"url": url, "key_prefix": prefix},
                   rate_limits={"shared": {"requests": 100, "per_seconds": 3600, "burst": 100, "key": "tenant"}})
    doc["server"]["metrics"] = {"host": "127.0.0.1", "port": mport}
    config = write_yaml(tmp_path / "gw.yaml", doc)
    key, _ = create_key(config, "workers")
    node = Node(config, port, "--workers", "2")
    try:
        node.wait_ready()
        workers = children(node.proc.pid)
        assert len(workers) == 2, workers
        # Wait until both workers listen (the second may still be starting).
        deadline = time.monotonic() + 20
        while True:
            try:
                for i in range(2):
                    served(mport + i)
                break
            except OSError:
                assert time.monotonic() < deadline, node.output()[-3000:]
                time.sleep(0.1)
        statuses: dict[int, int] = {}
        for _ in range(300):  # a new connection each time: the kernel spreads them over the workers
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:
                conn.request("GET", "/echo/w", headers={"Authorization": f"Bearer {key}"})
                r = conn.getresponse()
                r.read()
                statuses[r.status] = statuses.get(r.status, 0) + 1
            finally:
                conn.close()
        per_worker = [served(mport + i) for i in range(2)]
        assert all(n > 0 for n in per_worker), per_worker  # both workers answered
        assert sum(per_worker) >= 300
        # One limit of 100 shared by both workers through Redis (not 100 per worker).
        assert statuses == {200: 100, 429: 200}, statuses

        node.proc.send_signal(15)
        assert node.proc.wait(30) == 0, node.output()[-3000:]
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"worker {pid} still running"
    finally:
        node.stop()
        redis_cleanup(url, prefix)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def test_workers_without_redis_refuse_to_start(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "gw.yaml", node_doc(free_port(), "http://127.0.0.1:9"))
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "portcullis", "serve", "--config", str(config), "--workers", "2"],
                       capture_output=True, text=True, timeout=60, env=ENV, cwd=ROOT)
    assert r.returncode == 1
    assert "--workers > 1 needs `redis:` in the config" in r.stderr, r.stderr
    assert time.monotonic() - start < 30
    assert not (tmp_path / "data" / "audit.db").exists()  # refused before anything was opened
