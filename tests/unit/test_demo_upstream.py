"""The demo upstream over real HTTP: every route and error, tenant isolation, the forwarded-header echo,
and the serving thread's lifecycle."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest

from portcullis.demo.upstream import (
    DEMO_TENANTS,
    MAX_BODY_BYTES,
    DemoApi,
    Message,
    UpstreamThread,
    build_server,
)

FIXED_NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)


class Reply:
    """A read HTTP response."""

    def __init__(self, resp: http.client.HTTPResponse) -> None:
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.getheaders()}
        self.raw = resp.read()

    def json(self) -> Any:
        assert self.headers["content-type"] == "application/json"
        return json.loads(self.raw)


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamThread]:
    server = UpstreamThread(DemoApi(clock=lambda: FIXED_NOW))
    server.start()
    yield server
    server.stop()


def request(
    server: UpstreamThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        return Reply(conn.getresponse())
    finally:
        conn.close()


def post_json(server: UpstreamThread, tenant: str, payload: object) -> Reply:
    return request(
        server,
        "POST",
        f"/v1/tenants/{tenant}/projects",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json"},
    )


def assert_common_headers(reply: Reply) -> None:
    assert reply.headers["x-demo-upstream"] == "1"
    if reply.status != 204:
        assert reply.headers["content-type"] == "application/json"
        assert int(reply.headers["content-length"]) == len(reply.raw)
        assert "transfer-encoding" not in reply.headers


# ------------------------------------------------------------------------------------------ reads


def test_health(upstream: UpstreamThread) -> None:
    reply = request(upstream, "GET", "/v1/health")
    assert reply.status == 200
    assert reply.json() == {"status": "ok"}
    assert_common_headers(reply)


def test_bench_is_fixed_small_json(upstream: UpstreamThread) -> None:
    first = request(upstream, "GET", "/bench")
    second = request(upstream, "GET", "/bench")
    assert first.status == 200
    assert first.raw == second.raw
    assert 150 <= len(first.raw) <= 250
    assert isinstance(first.json(), dict)
    assert_common_headers(first)


def test_list_projects_seeded_for_both_tenants(upstream: UpstreamThread) -> None:
    for tenant in DEMO_TENANTS:
        reply = request(upstream, "GET", f"/v1/tenants/{tenant}/projects")
        assert reply.status == 200
        assert_common_headers(reply)
        doc = reply.json()
        assert doc["tenant"] == tenant
        assert len(doc["projects"]) >= 2
        for project in doc["projects"]:
            assert set(project) == {"id", "name", "description", "created_at"}
            assert project["id"].startswith("prj_")
            assert len(project["id"]) == 12
            int(project["id"][4:], 16)


def test_seed_is_deterministic() -> None:
    a, b = DemoApi(), DemoApi()
    assert a.tenants == b.tenants == DEMO_TENANTS
    for tenant in DEMO_TENANTS:
        assert a.project_ids(tenant) == b.project_ids(tenant)
        assert a.user_ids(tenant) == b.user_ids(tenant)
    assert not set(a.project_ids("acme")) & set(a.project_ids("globex"))


def test_get_project_and_tenant_isolation(upstream: UpstreamThread) -> None:
    acme_ids = [p["id"] for p in request(upstream, "GET", "/v1/tenants/acme/projects").json()["projects"]]
    globex_ids = [p["id"] for p in request(upstream, "GET", "/v1/tenants/globex/projects").json()["projects"]]
    assert not set(acme_ids) & set(globex_ids)

    reply = request(upstream, "GET", f"/v1/tenants/acme/projects/{acme_ids[0]}")
    assert reply.status == 200
    assert reply.json()["id"] == acme_ids[0]
    assert_common_headers(reply)

    cross = request(upstream, "GET", f"/v1/tenants/globex/projects/{acme_ids[0]}")
    assert cross.status == 404
    assert cross.json()["error"] == "not_found"
    assert_common_headers(cross)
    # nor can another tenant delete it
    assert request(upstream, "DELETE", f"/v1/tenants/globex/projects/{acme_ids[0]}").status == 404
    assert request(upstream, "GET", f"/v1/tenants/acme/projects/{acme_ids[0]}").status == 200


def test_get_missing_project_is_404(upstream: UpstreamThread) -> None:
    reply = request(upstream, "GET", "/v1/tenants/acme/projects/prj_deadbeef")
    assert reply.status == 404
    assert_common_headers(reply)


def test_invoices_carry_sensitive_fields(upstream: UpstreamThread) -> None:
    for tenant in DEMO_TENANTS:
        reply = request(upstream, "GET", f"/v1/tenants/{tenant}/invoices")
        assert reply.status == 200
        assert_common_headers(reply)
        doc = reply.json()
        assert doc["tenant"] == tenant
        assert doc["invoices"]
        for invoice in doc["invoices"]:
            assert set(invoice) == {
                "id",
                "amount_cents",
                "currency",
                "status",
                "customer_email",
                "card_last4",
                "tax_id",
                "billing_address",
            }
            assert isinstance(invoice["amount_cents"], int)
            assert len(invoice["card_last4"]) == 4


def test_non_ascii_is_utf8_with_byte_length(upstream: UpstreamThread) -> None:
    reply = request(upstream, "GET", "/v1/tenants/globex/invoices")
    assert "ß".encode() in reply.raw
    assert int(reply.headers["content-length"]) == len(reply.raw)


def test_users(upstream: UpstreamThread) -> None:
    api = DemoApi()
    for tenant in DEMO_TENANTS:
        for user_id in api.user_ids(tenant):
            reply = request(upstream, "GET", f"/v1/tenants/{tenant}/users/{user_id}")
            assert reply.status == 200
            assert_common_headers(reply)
            user = reply.json()
            assert user["id"] == user_id
            assert set(user) == {"id", "email", "name", "role"}
            assert user["email"].endswith(f"@{tenant}.example")
    roles = {
        request(upstream, "GET", f"/v1/tenants/acme/users/{u}").json()["role"] for u in api.user_ids("acme")
    }
    assert roles == {"tenant-admin", "member"}
    acme_user = api.user_ids("acme")[0]
    assert request(upstream, "GET", f"/v1/tenants/globex/users/{acme_user}").status == 404
    assert request(upstream, "GET", "/v1/tenants/acme/users/usr_00000000").status == 404


# ------------------------------------------------------------------------------------ forwarding


def test_projects_echo_forwarded_headers(upstream: UpstreamThread) -> None:
    headers = {
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.example.com",
        "X-Request-Id": "req-123",
    }
    reply = request(upstream, "GET", "/v1/tenants/acme/projects", headers=headers)
    assert reply.json()["seen_by_upstream"] == {
        "x-forwarded-for": "203.0.113.7",
        "x-forwarded-proto": "https",
        "x-forwarded-host": "api.example.com",
        "x-request-id": "req-123",
    }


def test_projects_echo_is_null_when_absent(upstream: UpstreamThread) -> None:
    reply = request(upstream, "GET", "/v1/tenants/acme/projects", headers={"X-Request-Id": "only-this"})
    assert reply.json()["seen_by_upstream"] == {
        "x-forwarded-for": None,
        "x-forwarded-proto": None,
        "x-forwarded-host": None,
        "x-request-id": "only-this",
    }


def test_repeated_forwarded_for_is_joined(upstream: UpstreamThread) -> None:
    conn = http.client.HTTPConnection(upstream.host, upstream.port, timeout=5)
    try:
        conn.putrequest("GET", "/v1/tenants/acme/projects")
        conn.putheader("X-Forwarded-For", "198.51.100.1")
        conn.putheader("X-Forwarded-For", "10.0.0.1")
        conn.endheaders()
        doc = Reply(conn.getresponse()).json()
    finally:
        conn.close()
    assert doc["seen_by_upstream"]["x-forwarded-for"] == "198.51.100.1, 10.0.0.1"


# -------------------------------------------------------------------------------- create / delete


def test_create_get_list_delete_project(upstream: UpstreamThread) -> None:
    reply = post_json(upstream, "acme", {"name": "New thing", "description": "made in a test"})
    assert reply.status == 201
    assert_common_headers(reply)
    project = reply.json()
    assert project["name"] == "New thing"
    assert project["description"] == "made in a test"
    assert project["created_at"] == "2025-06-01T12:00:00Z"
    assert project["id"].startswith("prj_")
    assert len(project["id"]) == 12
    int(project["id"][4:], 16)
    path = f"/v1/tenants/acme/projects/{project['id']}"
    assert reply.headers["location"] == path

    assert request(upstream, "GET", path).json() == project
    listed = request(upstream, "GET", "/v1/tenants/acme/projects").json()["projects"]
    assert listed[-1] == project
    assert request(upstream, "GET", f"/v1/tenants/globex/projects/{project['id']}").status == 404

    deleted = request(upstream, "DELETE", path)
    assert deleted.status == 204
    assert deleted.raw == b""
    assert deleted.headers["x-demo-upstream"] == "1"
    assert "content-length" not in deleted.headers
    assert "transfer-encoding" not in deleted.headers
    assert request(upstream, "GET", path).status == 404
    again = request(upstream, "DELETE", path)
    assert again.status == 404
    assert_common_headers(again)


def test_created_ids_are_unique(upstream: UpstreamThread) -> None:
    ids = {
        post_json(upstream, tenant, {"name": "x"}).json()["id"] for tenant in DEMO_TENANTS for _ in range(3)
    }
    assert len(ids) == 6


def test_description_is_optional(upstream: UpstreamThread) -> None:
    reply = post_json(upstream, "globex", {"name": "n" * 200})
    assert reply.status == 201
    assert reply.json()["description"] == ""
    assert post_json(upstream, "globex", {"name": "n", "description": None}).status == 201
    assert post_json(upstream, "globex", {"name": "n", "description": "d" * 2000}).status == 201


def test_content_type_with_utf8_charset_is_accepted(upstream: UpstreamThread) -> None:
    reply = request(
        upstream,
        "POST",
        "/v1/tenants/acme/projects",
        b'{"name": "charset"}',
        {"Content-Type": "Application/JSON; charset=UTF-8"},
    )
    assert reply.status == 201


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="malformed"),
        pytest.param(b"", id="empty"),
        pytest.param(b'["name"]', id="array"),
        pytest.param(b'"name"', id="string"),
        pytest.param(b"{}", id="missing-name"),
        pytest.param(b'{"name": ""}', id="empty-name"),
        pytest.param(b'{"name": "   "}', id="blank-name"),
        pytest.param(json.dumps({"name": "n" * 201}).encode(), id="long-name"),
        pytest.param(b'{"name": 42}', id="number-name"),
        pytest.param(b'{"name": null}', id="null-name"),
        pytest.param(b'{"name": "ok", "description": 7}', id="number-description"),
        pytest.param(json.dumps({"name": "ok", "description": "d" * 2001}).encode(), id="long-description"),
        pytest.param(b'{"name": "ok", "owner": "mallory"}', id="unknown-field"),
        pytest.param(b'{"name": "a", "name": "b"}', id="duplicate-key"),
        pytest.param(b'{"name": "ok", "description": NaN}', id="nan"),
        pytest.param(b'{"name": "\\ud800"}', id="lone-surrogate"),
        pytest.param(b'{"name": "\xff"}', id="invalid-utf8"),
        pytest.param(b"[" * 30_000 + b"]" * 30_000, id="deep-nesting"),
    ],
)
def test_create_rejects_bad_bodies(upstream: UpstreamThread, body: bytes) -> None:
    before = request(upstream, "GET", "/v1/tenants/acme/projects").json()["projects"]
    reply = request(upstream, "POST", "/v1/tenants/acme/projects", body, {"Content-Type": "application/json"})
    assert reply.status == 400
    assert_common_headers(reply)
    doc = reply.json()
    assert doc["error"] == "invalid_request"
    assert isinstance(doc["message"], str)
    assert request(upstream, "GET", "/v1/tenants/acme/projects").json()["projects"] == before


def test_unknown_field_is_named(upstream: UpstreamThread) -> None:
    reply = post_json(upstream, "acme", {"name": "ok", "owner": "mallory"})
    assert "owner" in reply.json()["message"]


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/json-patch+json",
        "application/json; charset=latin-1",
    ],
)
def test_create_requires_json_content_type(upstream: UpstreamThread, content_type: str | None) -> None:
    headers = {} if content_type is None else {"Content-Type": content_type}
    reply = request(upstream, "POST", "/v1/tenants/acme/projects", b'{"name": "x"}', headers)
    assert reply.status == 415
    assert reply.json()["error"] == "unsupported_media_type"
    assert_common_headers(reply)


def test_create_body_limit(upstream: UpstreamThread) -> None:
    padding = "d" * (MAX_BODY_BYTES + 1)
    body = json.dumps({"name": "big", "description": padding}).encode()
    reply = request(upstream, "POST", "/v1/tenants/acme/projects", body, {"Content-Type": "application/json"})
    assert reply.status == 413
    assert reply.json()["error"] == "payload_too_large"
    assert_common_headers(reply)


def test_create_body_limit_when_chunked(upstream: UpstreamThread) -> None:
    """Without content-length the limit is enforced while reading."""
    chunks = [b'{"name": "big", "description": "'] + [b"d" * 8192] * 9 + [b'"}']
    conn = http.client.HTTPConnection(upstream.host, upstream.port, timeout=5)
    try:
        conn.request(
            "POST",
            "/v1/tenants/acme/projects",
            body=iter(chunks),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        reply = Reply(conn.getresponse())
    finally:
        conn.close()
    assert reply.status == 413


def test_body_at_limit_is_read(upstream: UpstreamThread) -> None:
    """A body of exactly the limit is read (and then fails field validation, not the size check)."""
    prefix, suffix = b'{"name": "x", "description": "', b'"}'
    body = prefix + b"d" * (MAX_BODY_BYTES - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY_BYTES
    reply = request(upstream, "POST", "/v1/tenants/acme/projects", body, {"Content-Type": "application/json"})
    assert reply.status == 400
    assert "description" in reply.json()["message"]


# --------------------------------------------------------------------------------- routing errors


@pytest.mark.parametrize(
    "path",
    [
        "/v1/tenants/initech/projects",
        "/v1/tenants/initech/projects/prj_ac000001",
        "/v1/tenants/initech/invoices",
        "/v1/tenants/initech/users/usr_ac000001",
    ],
)
def test_unknown_tenant_is_404(upstream: UpstreamThread, path: str) -> None:
    reply = request(upstream, "GET", path)
    assert reply.status == 404
    assert reply.json()["error"] == "not_found"
    assert_common_headers(reply)


def test_unknown_tenant_post_is_404(upstream: UpstreamThread) -> None:
    assert post_json(upstream, "initech", {"name": "x"}).status == 404


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/v1",
        "/v1/health/",
        "/v2/health",
        "/v1/tenants",
        "/v1/tenants/acme",
        "/v1/tenants/acme/",
        "/v1/tenants/acme/projects/",
        "/v1/tenants//projects",
        "/v1/tenants/acme/projects/prj_ac000001/extra",
        "/v1/tenants/acme/users",
        "/v1/tenants/acme/secrets",
        "/bench/",
    ],
)
def test_unknown_path_is_404(upstream: UpstreamThread, path: str) -> None:
    reply = request(upstream, "GET", path)
    assert reply.status == 404
    assert reply.json() == {"error": "not_found", "message": "no such route"}
    assert_common_headers(reply)


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/v1/health", "GET"),
        ("DELETE", "/bench", "GET"),
        ("PUT", "/v1/tenants/acme/projects", "GET, POST"),
        ("DELETE", "/v1/tenants/acme/projects", "GET, POST"),
        ("PATCH", "/v1/tenants/acme/projects/prj_ac000001", "GET, DELETE"),
        ("POST", "/v1/tenants/acme/projects/prj_ac000001", "GET, DELETE"),
        ("POST", "/v1/tenants/acme/invoices", "GET"),
        ("DELETE", "/v1/tenants/acme/users/usr_ac000001", "GET"),
        ("HEAD", "/v1/health", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(upstream: UpstreamThread, method: str, path: str, allow: str) -> None:
    reply = request(upstream, method, path)
    assert reply.status == 405
    assert reply.headers["allow"] == allow
    assert reply.headers["x-demo-upstream"] == "1"
    if method != "HEAD":
        assert reply.json()["error"] == "method_not_allowed"
        assert_common_headers(reply)
    # nothing was deleted by the refused DELETE
    assert request(upstream, "GET", "/v1/tenants/acme/projects/prj_ac000001").status == 200


def test_keep_alive_serves_several_requests(upstream: UpstreamThread) -> None:
    conn = http.client.HTTPConnection(upstream.host, upstream.port, timeout=5)
    try:
        statuses = []
        for path in ("/v1/health", "/bench", "/nope", "/v1/tenants/acme/invoices"):
            conn.request("GET", path)
            statuses.append(Reply(conn.getresponse()).status)
        assert statuses == [200, 200, 404, 200]  # one connection, four answers
    finally:
        conn.close()


# --------------------------------------------------------------------------------- app internals


async def test_lifespan_is_completed() -> None:
    inbox: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    outbox: list[Message] = []

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(message: Message) -> None:
        outbox.append(message)

    await DemoApi()({"type": "lifespan"}, receive, send)
    assert outbox == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_client_gone_mid_body_sends_nothing() -> None:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/tenants/acme/projects",
        "headers": [(b"content-type", b"application/json")],
    }
    await DemoApi()(scope, receive, send)
    assert sent == []


async def test_handler_error_becomes_json_500(monkeypatch: pytest.MonkeyPatch) -> None:
    api = DemoApi()

    def boom() -> datetime:
        raise ValueError("clock broke")

    monkeypatch.setattr(api, "_clock", boom)
    sent: list[Message] = []
    body = [{"type": "http.request", "body": b'{"name": "x"}', "more_body": False}]

    async def receive() -> Message:
        return body.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/tenants/acme/projects",
        "headers": [(b"content-type", b"application/json")],
    }
    await api(scope, receive, send)
    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["error"] == "internal_error"


# ---------------------------------------------------------------------------------------- serving


def test_build_server_config() -> None:
    server = build_server(DemoApi(), "127.0.0.1", 8123)
    config = server.config
    assert (config.host, config.port) == ("127.0.0.1", 8123)
    assert config.http == "httptools"
    assert config.lifespan == "off"
    assert config.access_log is False
    assert config.loop in ("uvloop", "asyncio")
    assert config.proxy_headers is False
    assert server.started is False


def test_port_zero_picks_a_port_before_start() -> None:
    server = UpstreamThread()
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert not server.is_alive()
    server.stop()  # a no-op before start


def test_stop_ends_the_thread_and_closes_the_port() -> None:
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    server = UpstreamThread()
    server.start()
    # uvicorn installs signal handlers only from the main thread; the server runs in another one
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    name = f"portcullis-demo-upstream:{server.port}"
    assert server.is_alive()
    assert any(t.name == name for t in threading.enumerate())
    assert request(server, "GET", "/v1/health").status == 200
    server.stop()
    assert not server.is_alive()
    assert not any(t.name == name for t in threading.enumerate())
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((server.host, server.port), timeout=2).close()
    server.stop()  # idempotent


def test_start_twice_raises() -> None:
    with UpstreamThread() as server:
        with pytest.raises(RuntimeError):
            server.start()
        assert server.is_alive()
    assert not server.is_alive()


def test_context_manager_serves_a_fresh_app() -> None:
    with UpstreamThread() as server:
        created = post_json(server, "acme", {"name": "only here"}).json()
        assert request(server, "GET", f"/v1/tenants/acme/projects/{created['id']}").status == 200
    with UpstreamThread() as other:
        assert request(other, "GET", f"/v1/tenants/acme/projects/{created['id']}").status == 404


def test_start_on_a_busy_port_raises_oserror() -> None:
    with UpstreamThread() as first:
        second = UpstreamThread(port=first.port)
        with pytest.raises(OSError):
            second.start()
        assert not second.is_alive()


def test_explicit_port() -> None:
    port = UpstreamThread().port
    with UpstreamThread(port=port) as server:
        assert server.port == port
        assert request(server, "GET", "/v1/health").status == 200
