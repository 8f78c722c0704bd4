"""The authorization server's stage and request parsing: bounds, methods, errors."""

from __future__ import annotations

import json
from typing import Any

import pytest

from portcullis.exchange import Exchange
from portcullis.netutil import TrustedProxies
from portcullis.oauth.http import (
    MAX_FORM_BYTES,
    AsRequest,
    AsResponse,
    AsRoutes,
    AuthServerStage,
    BadRequest,
    json_response,
    parse_params,
)


def _exchange(method: str, path: str, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
              query: bytes = b"", chunk: int = 0) -> Exchange:
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
    msgs = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive() -> dict[str, Any]:
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    ex = Exchange(scope={"type": "http", "scheme": "http"}, receive=receive, method=method,
                  raw_path=path.encode(), query=query, headers=headers or [(b"host", b"gw")],
                  request_id="rid", client_ip="127.0.0.1")
    ex.path = path
    return ex


async def _body(ex: Exchange) -> bytes:
    assert ex.upstream is not None and ex.upstream.body is not None
    return b"".join([c async for c in ex.upstream.body])


def _stage(seen: list[AsRequest]) -> AuthServerStage:
    routes = AsRoutes()

    async def echo(req: AsRequest) -> AsResponse:
        seen.append(req)
        req.audit["client_id"] = "c1"
        return json_response({"form": req.form, "query": req.query})

    routes.add("POST", "/oauth2/echo", echo)
    routes.add("GET", "/oauth2/echo", echo)
    return AuthServerStage(routes, "http://127.0.0.1:8080/", TrustedProxies([]))


async def test_other_paths_pass_through() -> None:
    ex = _exchange("GET", "/v1/health")
    assert await _stage([]).on_request(ex) is None
    assert ex.upstream is None


async def test_form_post_answered_with_no_store_and_audit_facts() -> None:
    seen: list[AsRequest] = []
    ex = _exchange("POST", "/oauth2/echo", b"a=1&b=x%20y", [(b"content-type", b"application/x-www-form-urlencoded")],
                   chunk=3)
    assert await _stage(seen).on_request(ex) is None
    assert ex.upstream is not None and ex.upstream.status == 200
    assert (b"cache-control", b"no-store") in ex.upstream.headers
    assert json.loads(await _body(ex))["form"] == {"a": ["1"], "b": ["x y"]}
    assert ex.facts["oauth"] == {"client_id": "c1"}
    assert seen[0].issuer == "http://127.0.0.1:8080"  # trailing slash dropped
    assert ex.bytes_in == len(b"a=1&b=x%20y")


async def test_wrong_method_is_405_with_allow() -> None:
    problem = await _stage([]).on_request(_exchange("DELETE", "/oauth2/echo"))
    assert problem is not None and problem.status == 405
    assert (b"allow", b"GET, POST") in problem.headers


async def test_oversized_body_is_413_without_calling_the_handler() -> None:
    seen: list[AsRequest] = []
    ex = _exchange("POST", "/oauth2/echo", b"a=" + b"x" * MAX_FORM_BYTES, chunk=4096)
    problem = await _stage(seen).on_request(ex)
    assert problem is not None and problem.status == 413
    assert seen == []


async def test_malformed_query_is_an_oauth_invalid_request() -> None:
    ex = _exchange("GET", "/oauth2/echo", query=b"a=%ZZ&&=")
    assert await _stage([]).on_request(ex) is None
    assert ex.upstream is not None and ex.upstream.status == 400
    assert json.loads(await _body(ex))["error"] == "invalid_request"
    assert ex.reason == "oauth.malformed" and ex.decision == "deny"


async def test_head_uses_get_without_a_body() -> None:
    ex = _exchange("HEAD", "/oauth2/echo")
    assert await _stage([]).on_request(ex) is None
    assert ex.upstream is not None and ex.upstream.status == 200
    assert await _body(ex) == b""


def test_parse_params_bounds_and_strictness() -> None:
    assert parse_params("a=1&a=2") == {"a": ["1", "2"]}
    with pytest.raises(BadRequest):
        parse_params("&".join(f"k{i}=v" for i in range(100)))
    with pytest.raises(BadRequest):
        parse_params("a=%FF")  # not UTF-8
    with pytest.raises(BadRequest):
        parse_params("novalue&&")


def test_repeated_parameter_refused() -> None:
    req = AsRequest(method="POST", path="/oauth2/echo", query={},
                    headers={"content-type": "application/x-www-form-urlencoded"}, body=b"scope=a&scope=b",
                    client_ip="127.0.0.1", scheme="http", host="gw",
                    issuer="http://gw", request_id="r")
    with pytest.raises(BadRequest):
        req.param("scope")
    assert req.param("missing") is None


def test_routes_refuse_foreign_prefixes_and_duplicates() -> None:
    routes = AsRoutes()

    async def h(req: AsRequest) -> AsResponse:
        return AsResponse(200)

    with pytest.raises(ValueError, match="outside"):
        routes.add("GET", "/v1/login", h)
    routes.add("GET", "/account/login", h)
    with pytest.raises(ValueError, match="twice"):
        routes.add("GET", "/account/login", h)
