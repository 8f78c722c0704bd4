"""The gateway as a real process: SIGTERM drains and flushes; SIGKILL loses no
acknowledged audit event; the CLI's exit codes and messages."""

from __future__ import annotations

import http.client
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from portcullis.demo.upstream import UpstreamThread
from portcullis.gateway import open_audit_store
from tests.integration.harness import Client, free_port

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "portcullis", *args], capture_output=True, text=True,
                          timeout=60, env=env, check=check)


def write(tmp: Path, upstream: str, port: int, metrics_port: int | None = None) -> Path:
    metrics = f"{{host: 127.0.0.1, port: {metrics_port}}}" if metrics_port else "null"
    cfg = tmp / "gw.yaml"
    cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {port}}}, metrics: {metrics}, shutdown_grace_seconds: 5}}
upstreams: {{echo: {{url: "{upstream}"}}}}
routes:
  - {{name: echo, path: "/echo/{{x}}", methods: [GET], upstream: echo, auth: [api_key], scopes: [s]}}
  - {{name: slow, path: "/slow/{{s}}", methods: [GET], upstream: echo, auth: [api_key], scopes: [s]}}
""")
    return cfg


def start(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "portcullis", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=1):
                pass
        except urllib.error.HTTPError:
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(proc.stderr.read().decode() if proc.stderr else "did not start")


def make_key(cfg: Path) -> str:
    out = cli("keys", "create", "--config", str(cfg), "--name", f"k{time.monotonic_ns()}", "--tenant", "t",
              "--scope", "s", "--json", check=True).stdout
    m = re.search(r'"key": "(pcl_[^"]+)"', out)
    assert m, out
    return m.group(1)


def test_sigterm_finishes_in_flight_and_flushes(tmp_path: Path, echo: UpstreamThread) -> None:
    port = free_port()
    cfg = write(tmp_path, echo.url, port)
    key = make_key(cfg)
    proc = start(cfg, port)
    results: list[int] = []

    def slow() -> None:
        results.append(Client(port, {"X-API-Key": key}).request("GET", "/slow/1.5").status)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):  # no longer accepting
        Client(port, {"X-API-Key": key}).request("GET", "/echo/late")
    t.join(10)
    assert results == [200]  # the in-flight request finished
    assert proc.wait(15) == 0
    store = open_audit_store(tmp_path / "data")
    try:
        assert any(e.path == "/slow/1.5" and e.status == 200 for e in store.iter_events())
    finally:
        store.close()
    assert cli("audit", "verify", "--config", str(cfg)).returncode == 0


def test_sigkill_under_load_keeps_acknowledged_events(tmp_path: Path, echo: UpstreamThread) -> None:
    port, mport = free_port(), free_port()
    cfg = write(tmp_path, echo.url, port, mport)
    key = make_key(cfg)
    proc = start(cfg, port)
    stop = threading.Event()

    def load() -> None:
        c = Client(port, {"X-API-Key": key})
        while not stop.is_set():
            try:
                c.request("GET", "/echo/load")
            except (OSError, http.client.HTTPException):  # the kill cuts requests short
                return

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    durable = 0.0
    deadline = time.monotonic() + 20
    while durable < 300 and time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=2) as r:
            m = re.search(rb"^portcullis_audit_durable_events (\S+)$", r.read(), re.M)
        durable = float(m.group(1)) if m else 0.0
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no flush, no goodbye
    proc.wait(10)
    stop.set()
    for w in workers:
        w.join(10)
    assert durable >= 300
    store = open_audit_store(tmp_path / "data")
    try:
        requests = sum(1 for e in store.iter_events() if e.kind == "request")
    finally:
        store.close()
    # Everything the writer had acknowledged (reported durable) before the kill is there.
    assert requests >= durable
    res = cli("audit", "verify", "--config", str(cfg))
    assert res.returncode == 0, res.stderr


def test_check_command(tmp_path: Path) -> None:
    good = write(tmp_path, "http://127.0.0.1:1", 8080)
    res = cli("check", str(good))
    assert res.returncode == 0 and "ok (2 routes" in res.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("upstream: echo, auth", "upstream: billing, auth", 1)
                   .replace("metrics: null", "metrics: null, colour: red"))
    res = cli("check", str(bad))
    assert res.returncode == 1
    assert "routes[0].upstream: unknown upstream 'billing'" in res.stderr
    assert "server.colour: unknown key" in res.stderr
    assert "Traceback" not in res.stderr
    res = cli("check", str(tmp_path / "missing.yaml"))
    assert res.returncode == 1 and "cannot read" in res.stderr


def test_version() -> None:
    from portcullis import __version__

    assert cli("--version").stdout.strip() == f"portcullis {__version__}"


def test_keys_commands_and_bad_arguments(tmp_path: Path) -> None:
    cfg = write(tmp_path, "http://127.0.0.1:1", 8080)
    out = cli("keys", "create", "--config", str(cfg), "--name", "ci", "--tenant", "acme", "--scope",
              "a:read,b:write", "--expires-in", "30d", "--rate-limit", "60/1m:10", check=True).stdout
    kid = re.search(r"key id:\s+(\S+)", out)
    assert kid
    listing = cli("keys", "list", "--config", str(cfg), "--json", check=True).stdout
    assert '"status": "active"' in listing and "pcl_" not in listing  # the key itself is never listed
    assert cli("keys", "revoke", "--config", str(cfg), kid.group(1)).returncode == 0
    assert '"status": "revoked"' in cli("keys", "list", "--config", str(cfg), "--json").stdout
    again = cli("keys", "revoke", "--config", str(cfg), kid.group(1))
    assert again.returncode == 1 and "no active key" in again.stderr
    dup = cli("keys", "create", "--config", str(cfg), "--name", "ci", "--tenant", "acme", "--scope", "a")
    assert dup.returncode == 1 and "already exists" in dup.stderr
    for args in (["--expires-in", "soon"], ["--rate-limit", "lots"], ["--tenant", "a b"]):
        res = cli("keys", "create", "--config", str(cfg), "--name", "x", "--tenant", "acme", "--scope", "a",
                  *args)
        assert res.returncode == 2, (args, res.stderr)
        assert "Traceback" not in res.stderr
    both = cli("keys", "list", "--config", str(cfg), "--data-dir", str(tmp_path))
    assert both.returncode == 2 and "exactly one" in both.stderr


def test_audit_verify_detects_tampering_via_cli(tmp_path: Path) -> None:
    cfg = write(tmp_path, "http://127.0.0.1:1", 8080)
    for i in range(3):
        cli("keys", "create", "--config", str(cfg), "--name", f"k{i}", "--tenant", "t", "--scope", "s",
            check=True)
    assert cli("audit", "verify", "--config", str(cfg)).returncode == 0
    tail = cli("audit", "tail", "--config", str(cfg), "-n", "2").stdout
    assert tail.count("admin.key_created") == 2
    with sqlite3.connect(tmp_path / "data" / "audit.db") as db:
        db.execute("UPDATE events SET tenant = 'evil' WHERE seq = 2")
    res = cli("audit", "verify", "--config", str(cfg))
    assert res.returncode == 1
    assert "TAMPERED" in res.stderr and "2" in res.stderr


def test_read_only_key_commands_never_create_a_store(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-data-dir"
    empty.mkdir()
    for args in (["keys", "list"], ["keys", "revoke", "Abcdefgh"], ["tokens", "revoked"],
                 ["tokens", "revoke", "--sub", "x"]):
        res = cli(*args, "--data-dir", str(empty))
        assert res.returncode == 1, (args, res.stderr)
        assert "no key store here" in res.stderr
    assert list(empty.iterdir()) == []  # nothing half-written
