"""Real nginx (examples/nginx/forward-auth.conf) in front of the demo upstream, Portcullis deciding.

nginx comes from Debian (`nginx-light`; `.ci/run` installs it); without it this module skips.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from portcullis.demo.upstream import ASGIApp, DemoApi, Receive, Scope, Send, UpstreamThread
from portcullis.keysadmin import create_key
from tests.integration.harness import Client, GatewayThread, Response, find_audit_event, free_port, write_config

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "nginx" / "forward-auth.conf"
NGINX = shutil.which("nginx") or (
    "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed: this test runs real nginx (Debian: apt-get install "
                          "nginx-light; .ci/run installs it when missing)")


@dataclass
class Recorder:
    """The demo upstream, remembering the headers of every request it got."""

    app: ASGIApp
    seen: list[dict[str, str]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self.seen.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                             | {":path": scope["path"]})
        await self.app(scope, receive, send)


@dataclass
class Env:
    nginx: Client
    keys: dict[str, str]
    recorder: Recorder
    gateway: GatewayThread
    error_log: Path


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {log.read_text() if log.exists() else '(no log)'}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("nginx did not start listening")


def nginx_conf(prefix: Path, nginx_port: int, decision_port: int, upstream_port: int) -> str:
    """The shipped example, pointed at the test's ports, run in the foreground under `prefix`."""
    text = EXAMPLE.read_text()
    for old, new in (("127.0.0.1:8080", f"127.0.0.1:{nginx_port}"), ("127.0.0.1:9181", f"127.0.0.1:{decision_port}"),
                     ("127.0.0.1:8000", f"127.0.0.1:{upstream_port}")):
        assert old in text, old
        text = text.replace(old, new)
    temp = "".join(f"    {d}_temp_path {prefix}/{d};\n" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", "http {\n" + temp, 1)
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"daemon off;\n{user}pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n" + text


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    assert NGINX is not None
    recorder = Recorder(DemoApi())
    upstream = UpstreamThread(recorder)
    upstream.start()
    data_dir = tmp_path_factory.mktemp("fa-gw")
    port, decision_port, nginx_port = free_port(), free_port(), free_port()
    t = "/v1/tenants/{tenant}"
    doc: dict[str, Any] = {
        "data_dir": ".",
        "server": {"listen": {"host": "127.0.0.1", "port": port}, "metrics": None},
        "forward_auth": {"listen": {"host": "127.0.0.1", "port": decision_port}},
        "upstreams": {"demo-api": {"url": upstream.url}},
        "routes": [
            {"name": "health", "methods": ["GET"], "path": "/v1/health", "upstream": "demo-api", "public": True},
            {"name": "list-projects", "methods": ["GET"], "path": f"{t}/projects", "upstream": "demo-api",
             "auth": ["api_key"], "scopes": ["projects:read"], "tenant_param": "tenant"},
            {"name": "create-project", "methods": ["POST"], "path": f"{t}/projects", "upstream": "demo-api",
             "auth": ["api_key"], "scopes": ["projects:write"], "tenant_param": "tenant"},
        ],
    }
    loaded = write_config(data_dir, doc)
    keys = {}
    for name, tenant, scopes, rl in (("reader", "acme", ["projects:read"], None),
                                     ("writer", "acme", ["projects:read", "projects:write"], None),
                                     ("limited", "acme", ["projects:read"], (2, 60.0, 2))):
        _, keys[name] = create_key(loaded.data_dir, name=name, tenant=tenant, scopes=scopes, roles=["viewer"],
                                   expires_at=None, rate_limit=rl)
    gateway = GatewayThread(loaded)
    gateway.start()
    prefix = tmp_path_factory.mktemp("nginx")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, nginx_port, decision_port, upstream.port))
    error_log = prefix / "error.log"
    proc = subprocess.Popen([NGINX, "-p", str(prefix), "-c", str(conf), "-e", str(error_log)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_port(nginx_port, proc, error_log)
        yield Env(Client(nginx_port), keys, recorder, gateway, error_log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        gateway.stop()
        upstream.stop()


def _get(env: Env, path: str, key: str | None = None, headers: dict[str, str] | None = None,
         method: str = "GET", body: bytes | None = None) -> Response:
    h = dict(headers or {})
    if key is not None:
        h["Authorization"] = f"Bearer {env.keys[key]}"
    return env.nginx.request(method, path, h, body)


def _last_seen(env: Env, path: str) -> dict[str, str]:
    for seen in reversed(env.recorder.seen):
        if seen[":path"] == path:
            return seen
    raise AssertionError(f"the upstream never saw {path}")


def test_api_key_allowed_and_upstream_sees_the_principal(env: Env) -> None:
    r = _get(env, "/v1/tenants/acme/projects", "reader")
    assert r.status == 200, r.body
    assert r.json()["tenant"] == "acme"
    seen = _last_seen(env, "/v1/tenants/acme/projects")
    assert seen["x-portcullis-subject"] == "key:reader"
    assert seen["x-portcullis-tenant"] == "acme"
    assert seen["x-portcullis-scopes"] == "projects:read"
    assert seen["x-portcullis-roles"] == "viewer"
    assert seen["x-portcullis-credential-kind"] == "api_key"
    rid = seen["x-portcullis-request-id"]
    assert "x-portcullis-client-id" not in seen  # empty: nginx drops it
    # The decision is audited like a request through the gateway, with the convention.
    ev = find_audit_event(env.gateway, rid)
    assert (ev.decision, ev.status, ev.route, ev.method) == ("allow", 200, "list-projects", "GET")
    assert ev.path == "/v1/tenants/acme/projects"
    assert ev.subject == "key:reader"
    assert ev.client_ip == "127.0.0.1"
    assert ev.extra["forward_auth"] == "nginx"


def test_public_route_passes_without_credential(env: Env) -> None:
    r = _get(env, "/v1/health")
    assert r.status == 200
    assert _last_seen(env, "/v1/health").get("x-portcullis-subject") is None


def test_no_key_is_401_with_the_problem_and_challenge(env: Env) -> None:
    before = len(env.recorder.seen)
    r = _get(env, "/v1/tenants/acme/projects")
    assert r.status == 401
    assert r.headers["content-type"].startswith("application/problem+json")
    doc = r.json()
    assert doc["type"] == "https://portcullis.dev/problems/unauthenticated"
    assert doc["status"] == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert [k for k, _ in r.header_list].count("www-authenticate") == 1
    assert len(env.recorder.seen) == before  # the upstream never saw it
    ev = find_audit_event(env.gateway, doc["request_id"])
    assert (ev.decision, ev.reason, ev.status) == ("deny", "auth.missing", 401)
    assert ev.extra["forward_auth"] == "nginx"


def test_wrong_key_is_401(env: Env) -> None:
    r = env.nginx.request("GET", "/v1/tenants/acme/projects",
                          {"Authorization": "Bearer pcl_live_notakeynotakeynotakeynotakeynotakey00"})
    assert r.status == 401
    assert r.json()["type"].endswith("/invalid-credential")


def test_wrong_tenant_is_403(env: Env) -> None:
    before = len(env.recorder.seen)
    r = _get(env, "/v1/tenants/globex/projects", "reader")
    assert r.status == 403
    doc = r.json()
    assert doc["type"] == "https://portcullis.dev/problems/tenant-mismatch"
    assert len(env.recorder.seen) == before
    ev = find_audit_event(env.gateway, doc["request_id"])
    assert (ev.reason, ev.status, ev.tenant) == ("authz.tenant_mismatch", 403, "acme")


def test_missing_scope_is_403(env: Env) -> None:
    r = _get(env, "/v1/tenants/acme/projects", "reader", method="POST", body=b'{"name":"x"}',
             headers={"Content-Type": "application/json"})
    assert r.status == 403
    assert r.json()["type"].endswith("/insufficient-scope")


def test_post_with_body_allowed(env: Env) -> None:
    r = _get(env, "/v1/tenants/acme/projects", "writer", method="POST", body=b'{"name":"Through nginx"}',
             headers={"Content-Type": "application/json"})
    assert r.status == 201, r.body
    assert r.json()["name"] == "Through nginx"


def test_rate_limit_is_429_with_retry_after(env: Env) -> None:
    statuses = [_get(env, "/v1/tenants/acme/projects", "limited").status for _ in range(3)]
    assert statuses == [200, 200, 429]
    r = _get(env, "/v1/tenants/acme/projects", "limited")
    assert r.status == 429
    assert int(r.headers["retry-after"]) >= 1
    doc = r.json()
    assert doc["type"] == "https://portcullis.dev/problems/rate-limited"
    ev = find_audit_event(env.gateway, doc["request_id"])
    assert (ev.reason, ev.status) == ("limit.rate", 429)  # the real status, not nginx's 403


def test_unknown_route_is_404(env: Env) -> None:
    r = _get(env, "/v1/nowhere", "reader")
    assert r.status == 404
    assert r.json()["type"].endswith("/not-found")


def test_smuggled_principal_headers_do_not_reach_the_upstream(env: Env) -> None:
    r = _get(env, "/v1/tenants/acme/projects", "reader", headers={
        "X-Portcullis-Subject": "key:admin", "X-Portcullis-Tenant": "globex",
        "X-Portcullis-Scopes": "projects:write admin", "X-Portcullis-Client-Id": "root-client",
        "X-Portcullis-Roles": "tenant-admin"})
    assert r.status == 200
    seen = _last_seen(env, "/v1/tenants/acme/projects")
    assert seen["x-portcullis-subject"] == "key:reader"
    assert seen["x-portcullis-tenant"] == "acme"
    assert seen["x-portcullis-scopes"] == "projects:read"
    assert seen["x-portcullis-roles"] == "viewer"
    assert "x-portcullis-client-id" not in seen


def test_smuggled_original_uri_is_ignored(env: Env) -> None:
    # The client claims to be asking for its own tenant; nginx overwrites the claim.
    r = _get(env, "/v1/tenants/globex/projects", "reader", headers={
        "X-Original-URI": "/v1/tenants/acme/projects", "X-Original-Method": "GET", "X-Original-Host": "elsewhere"})
    assert r.status == 403
    assert r.json()["type"].endswith("/tenant-mismatch")
    # Nor do they reach the upstream on an allowed request.
    assert _get(env, "/v1/tenants/acme/projects", "reader", headers={"X-Original-URI": "/admin"}).status == 200
    assert "x-original-uri" not in _last_seen(env, "/v1/tenants/acme/projects")


def test_smuggled_client_address_is_ignored(env: Env) -> None:
    r = _get(env, "/v1/tenants/acme/projects", "reader", headers={"X-Real-IP": "203.0.113.9",
                                                                  "X-Forwarded-For": "203.0.113.9"})
    assert r.status == 200
    rid = _last_seen(env, "/v1/tenants/acme/projects")["x-portcullis-request-id"]
    assert find_audit_event(env.gateway, rid).client_ip == "127.0.0.1"


def test_ambiguous_path_is_refused_by_normalize(env: Env) -> None:
    # nginx itself normalises '..' in the path, but $request_uri keeps what the client sent.
    r = _get(env, "/v1/tenants/acme/projects/%2e%2e/x", "reader")
    assert r.status == 400
    assert json.loads(r.body)["type"].endswith("/bad-request")


def test_nginx_saw_only_statuses_it_understands(env: Env) -> None:
    # The nginx error log holds no "auth request unexpected status": every denial was 401/403.
    text = env.error_log.read_text() if env.error_log.exists() else ""
    assert "unexpected status" not in text
