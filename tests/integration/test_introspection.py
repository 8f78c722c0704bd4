"""Opaque access tokens through the real gateway, checked at a real (local) RFC 7662
introspection endpoint that authenticates the gateway with HTTP Basic."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from portcullis.config import ConfigError, parse_config
from portcullis.demo.upstream import UpstreamThread
from tests.integration.echo import Receive, Send
from tests.integration.harness import Client, GatewayThread, find_audit_event, free_port, write_config

SECRET = "s3cr3t/with:odd&chars"


@dataclass
class IntrospectionApp:
    """Knows a few opaque tokens; answers 401 to a client with wrong credentials."""

    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: int = 0
    expected_auth: bytes = b""

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        self.calls += 1
        auth = dict(scope["headers"]).get(b"authorization", b"")
        if auth != self.expected_auth or scope["method"] != "POST":
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b'{"error":"invalid_client"}'})
            return
        token = parse_qs(body.decode()).get("token", [""])[0]
        doc = self.tokens.get(token, {"active": False})
        data = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": data})


@dataclass
class Env:
    port: int
    app: IntrospectionApp
    gateway: GatewayThread

    def call(self, token: str, path: str = "/v1/tenants/acme/projects") -> Any:
        return Client(self.port, {"Authorization": f"Bearer {token}"}).request("GET", path)


@pytest.fixture(scope="module")
def ienv(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    app = IntrospectionApp()
    app.expected_auth = b"Basic " + base64.b64encode(b"gateway:" + SECRET.replace("/", "%2F").replace(
        ":", "%3A").replace("&", "%26").encode())
    endpoint = UpstreamThread(app)
    endpoint.start()
    now = int(time.time())
    app.tokens.update({
        "good-token": {"active": True, "sub": "u1", "tenant": "acme", "scope": "projects:read", "exp": now + 300,
                       "iss": "https://as.example", "aud": "api", "client_id": "c1"},
        "old-token": {"active": True, "sub": "u1", "tenant": "acme", "scope": "projects:read", "exp": now - 300,
                      "iss": "https://as.example", "aud": "api"},
        "other-aud": {"active": True, "sub": "u1", "tenant": "acme", "scope": "projects:read", "exp": now + 300,
                      "iss": "https://as.example", "aud": "elsewhere"},
        "bound-token": {"active": True, "sub": "u1", "tenant": "acme", "scope": "projects:read", "exp": now + 300,
                        "iss": "https://as.example", "aud": "api",
                        "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}},
        "string-active": {"active": "true", "sub": "u1", "tenant": "acme", "iss": "https://as.example", "aud": "api"},
    })
    data_dir = tmp_path_factory.mktemp("introspect")
    secret_file = data_dir / "introspection-secret"
    secret_file.write_text(SECRET + "\n")
    port = free_port()
    doc = {
        "data_dir": ".",
        "server": {"listen": {"port": port}, "metrics": None},
        "upstreams": {"api": {"url": upstream.url}},
        "introspection": {"endpoint": endpoint.url + "/introspect", "client_id": "gateway",
                          "client_secret_file": str(secret_file), "issuer": "https://as.example",
                          "audience": "api"},
        "routes": [{"name": "projects", "path": "/v1/tenants/{tenant}/projects", "methods": ["GET"],
                    "upstream": "api", "auth": ["introspection"], "scopes": ["projects:read"],
                    "tenant_param": "tenant"}],
    }
    gw = GatewayThread(write_config(data_dir, doc))
    gw.start()
    yield Env(port, app, gw)
    gw.stop()
    endpoint.stop()


def test_active_token_is_admitted_and_cached(ienv: Env) -> None:
    before = ienv.app.calls
    r = ienv.call("good-token")
    assert r.status == 200, r.body
    ev = find_audit_event(ienv.gateway, r.headers["x-request-id"])
    assert (ev.subject, ev.tenant, ev.credential_kind, ev.client_id) == ("u1", "acme", "opaque", "c1")
    assert ienv.call("good-token").status == 200
    assert ienv.app.calls == before + 1  # the second answer came from the cache
    assert ienv.call("good-token", "/v1/tenants/globex/projects").status == 403  # tenant binding still applies


@pytest.mark.parametrize(("token", "reason"), [
    ("unknown-token", "introspection.inactive"),
    ("string-active", "introspection.inactive"),   # "true" is not the boolean true
    ("old-token", "introspection.expired"),
    ("other-aud", "introspection.bad_audience"),
    ("bound-token", "auth.dpop_required"),
    ("x" * 5000, "introspection.malformed"),
])
def test_refused_opaque_tokens(ienv: Env, token: str, reason: str) -> None:
    r = ienv.call(token)
    assert r.status == 401
    assert find_audit_event(ienv.gateway, r.headers["x-request-id"]).reason == reason


def test_inactive_answers_are_cached_briefly(ienv: Env) -> None:
    ienv.call("flood-1")
    before = ienv.app.calls
    for _ in range(5):
        assert ienv.call("flood-1").status == 401
    assert ienv.app.calls == before


def test_endpoint_refusing_the_gateway_fails_closed_with_503(ienv: Env) -> None:
    saved = ienv.app.expected_auth
    ienv.app.expected_auth = b"Basic nope"
    try:
        r = ienv.call("fresh-token-1")
        assert r.status == 503
        assert r.headers["retry-after"] == "5"
        assert find_audit_event(ienv.gateway, r.headers["x-request-id"]).reason == "introspection.unavailable"
    finally:
        ienv.app.expected_auth = saved


def test_config_refuses_plain_http_and_inline_secrets(tmp_path: Path) -> None:
    base = """
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes: [{name: r, path: /r, methods: [GET], upstream: api, auth: [introspection]}]
"""
    for section, message in (
        ("introspection: {endpoint: 'http://as.example/i', client_id: g, client_secret_env: X}", "https"),
        ("introspection: {endpoint: 'https://as.example/i', client_id: g}", "exactly one of"),
        ("introspection: {endpoint: 'https:///i', client_id: g, client_secret_env: X}", "needs a host"),
        ("introspection: {endpoint: 'https://as.example/i', client_id: g, client_secret: x}", "unknown key"),
        ("", "needs a top-level 'introspection:'"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(base + section + "\n")
        assert any(message in e for e in info.value.errors), info.value.errors
