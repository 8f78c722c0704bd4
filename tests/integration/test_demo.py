"""`portcullis demo` as a newcomer runs it (DEMO.md): the credentials file, a working
key, restart with the same keys, --reset, --upstream, and a clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from portcullis.demo.upstream import UpstreamThread
from portcullis.signing_client import signed_headers
from tests.integration.echo import EchoApp
from tests.integration.harness import Client, free_port

ROOT = Path(__file__).resolve().parents[2]


_started: list[subprocess.Popen[str]] = []


def start_demo(*args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "portcullis", "demo", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    _started.append(proc)
    return proc


def stop_leftover_demos() -> None:
    """Kill demos a failing test left running (they would hold their ports)."""
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def wait_ready(proc: subprocess.Popen[str], port: int) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            if Client(port).request("GET", "/v1/health").status == 200:
                return ""
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise AssertionError("demo did not come up")


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


@pytest.fixture
def echo() -> Iterator[UpstreamThread]:
    t = UpstreamThread(EchoApp())
    t.start()
    yield t
    t.stop()


def keys_by_name(creds: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k["name"]: k for k in creds["api_keys"]}


def test_demo_credentials_restart_reset(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "demo"
    out_file = tmp_path / "creds.json"
    proc = start_demo("--port", str(port), "--data-dir", str(data), "--credentials-out", str(out_file))
    wait_ready(proc, port)
    creds = json.loads(out_file.read_text())
    assert creds["gateway_url"] == f"http://127.0.0.1:{port}"
    assert creds["tenants"] == ["acme", "globex"]
    keys = keys_by_name(creds)
    assert set(keys) >= {"acme-reader", "acme-writer", "globex-reader", "acme-bench"}
    assert keys["acme-reader"]["rate_limit"] == {"requests": 60, "per_seconds": 60, "burst": 10}
    assert keys["acme-bench"]["rate_limit"] == {"requests": 100000000, "per_seconds": 60, "burst": 100000}
    assert keys["acme-writer"]["scopes"] == ["projects:read", "projects:write", "billing:read"]
    assert (out_file.stat().st_mode & 0o777) == 0o600
    reader = Client(port, {"Authorization": f"Bearer {keys['acme-reader']['key']}"})
    r = reader.request("GET", "/v1/tenants/acme/projects")
    assert r.status == 200 and len(r.json()["projects"]) >= 1
    assert reader.request("GET", "/v1/tenants/globex/projects").status == 403
    globex = Client(port, {"X-API-Key": keys["globex-reader"]["key"]})
    assert globex.request("GET", "/v1/tenants/globex/projects").json()["tenant"] == "globex"
    # partner-analytics (DEMO.md): its API key works only on RFC 9421-signed requests.
    clients = {c["name"]: c for c in creds["clients"]}
    assert set(clients) == {"acme-backend", "acme-spa", "partner-analytics"}
    partner = clients["partner-analytics"]
    assert partner["signing"]["alg"] == "ed25519"
    url = f"http://127.0.0.1:{port}/v1/tenants/acme/invoices"
    unsigned = Client(port, {"X-API-Key": partner["api_key"]}).request("GET", "/v1/tenants/acme/invoices")
    assert unsigned.status == 401
    assert "accept-signature" in unsigned.headers
    headers = signed_headers("GET", url, private_key_pem=partner["signing"]["private_key_pem"],
                             key_id=partner["signing"]["key_id"], body=None,
                             extra_headers={"X-API-Key": partner["api_key"]})
    assert Client(port, headers).request("GET", "/v1/tenants/acme/invoices").status == 200
    code, printed = stop(proc)
    assert code == 0
    assert "curl" in printed and keys["acme-reader"]["key"] in printed  # the quickstart
    assert "sign --credentials" in printed

    # Restart without --reset: the same keys still work.
    proc = start_demo("--port", str(port), "--data-dir", str(data))
    wait_ready(proc, port)
    again = json.loads((data / "credentials.json").read_text())
    assert keys_by_name(again)["acme-reader"]["key"] == keys["acme-reader"]["key"]
    assert reader.request("GET", "/v1/tenants/acme/projects").status == 200
    assert stop(proc)[0] == 0

    # --reset: fresh keys; the old ones are gone with the old data.
    proc = start_demo("--port", str(port), "--data-dir", str(data), "--reset")
    wait_ready(proc, port)
    fresh = keys_by_name(json.loads((data / "credentials.json").read_text()))
    assert fresh["acme-reader"]["key"] != keys["acme-reader"]["key"]
    assert reader.request("GET", "/v1/tenants/acme/projects").status == 401
    assert stop(proc)[0] == 0
    res = subprocess.run([sys.executable, "-m", "portcullis", "audit", "verify", "--data-dir", str(data)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 0, res.stderr


def test_demo_with_own_upstream_keeps_policies(tmp_path: Path, echo: UpstreamThread) -> None:
    port = free_port()
    proc = start_demo("--port", str(port), "--data-dir", str(tmp_path / "d"), "--upstream", echo.url)
    try:
        wait_ready(proc, port)
        keys = keys_by_name(json.loads((tmp_path / "d" / "credentials.json").read_text()))
        c = Client(port, {"X-API-Key": keys["acme-reader"]["key"]})
        r = c.request("GET", "/v1/tenants/acme/projects")
        assert r.status == 200
        assert r.json()["raw_path"] == "/v1/tenants/acme/projects"  # answered by our echo upstream
        assert c.request("GET", "/v1/tenants/globex/projects").status == 403  # policy unchanged
    finally:
        assert stop(proc)[0] == 0


def test_demo_refuses_a_foreign_data_dir(tmp_path: Path) -> None:
    foreign = tmp_path / "important"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("do not delete")
    res = subprocess.run([sys.executable, "-m", "portcullis", "demo", "--data-dir", str(foreign), "--reset",
                          "--port", str(free_port())], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert res.returncode == 1
    assert "not a demo data directory" in res.stderr
    assert (foreign / "thesis.txt").exists()
