"""Forward-auth: each convention's reconstruction, the refusals, and the decision app end to end
(in-process ASGI over a real gateway built from a config: real key store, audit log, limits)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from portcullis.audit.events import AuditEvent
from portcullis.config import ConfigError, parse_config
from portcullis.exchange import Principal
from portcullis.forward_auth import (
    ForwardAuthConfig,
    ForwardAuthStage,
    Original,
    header_value,
    principal_headers,
    reconstruct,
)
from portcullis.gateway import Gateway, build_gateway, open_audit_store
from portcullis.keysadmin import create_key
from portcullis.netutil import TrustedProxies
from portcullis.problems import Problem
from portcullis.server import make_server
from portcullis.stages.normalize import NormalizeConfig
from tests.support import exchange

PROXIES = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8"])
H = list[tuple[bytes, bytes]]


def rebuild(convention: Any, headers: H, method: str = "GET", path: bytes = b"/nginx",
            query: bytes = b"", peer: str = "127.0.0.1") -> Original | Problem:
    return reconstruct(convention, method, path, query, headers, peer=peer, proxies=PROXIES)


def refused(result: Original | Problem) -> str:
    assert isinstance(result, Problem), result
    assert result.status == 400
    return result.reason


# --- reconstruction, per convention ---------------------------------------------------------------

def test_nginx_reconstruction() -> None:
    o = rebuild("nginx", [(b"host", b"127.0.0.1:9181"), (b"x-original-uri", b"/v1/a/b?x=1&y=%20"),
                          (b"x-original-method", b"DELETE"), (b"x-original-host", b"api.example.com"),
                          (b"x-forwarded-proto", b"https"), (b"x-real-ip", b"198.51.100.7")])
    assert o == Original("DELETE", b"/v1/a/b", b"x=1&y=%20", b"api.example.com", "https", "198.51.100.7")


def test_nginx_defaults_method_to_the_subrequest_and_host_to_host() -> None:
    o = rebuild("nginx", [(b"host", b"api.example.com"), (b"x-original-uri", b"/p")], method="PUT")
    assert isinstance(o, Original)
    assert (o.method, o.host, o.scheme, o.client_ip) == ("PUT", b"api.example.com", "http", "127.0.0.1")


@pytest.mark.parametrize("convention", ["traefik", "caddy"])
def test_forwarded_reconstruction(convention: str) -> None:
    o = rebuild(convention, [(b"host", b"pdp:9181"), (b"x-forwarded-method", b"PATCH"),
                             (b"x-forwarded-uri", b"/v1/x?q=1"), (b"x-forwarded-host", b"api.example.com"),
                             (b"x-forwarded-proto", b"HTTPS"), (b"x-forwarded-for", b"203.0.113.5, 10.1.2.3")],
                path=f"/{convention}".encode())
    # 10.1.2.3 is a trusted proxy: the client is the first untrusted address from the right.
    assert o == Original("PATCH", b"/v1/x", b"q=1", b"api.example.com", "https", "203.0.113.5")


def test_envoy_reconstruction_takes_path_after_prefix_and_own_method() -> None:
    o = reconstruct("envoy", "POST", b"/envoy/v1/tenants/acme/projects", b"page=2",
                    [(b"host", b"api.example.com"), (b"x-forwarded-for", b"192.0.2.1")], peer="127.0.0.1",
                    proxies=PROXIES, envoy_prefix=b"/envoy")
    assert o == Original("POST", b"/v1/tenants/acme/projects", b"page=2", b"api.example.com", "http", "192.0.2.1")


def test_client_spoofed_xff_left_of_the_proxy_entry_is_ignored() -> None:
    o = rebuild("traefik", [(b"x-forwarded-method", b"GET"), (b"x-forwarded-uri", b"/"), (b"host", b"h"),
                            (b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-for", b"198.51.100.1")],
                path=b"/traefik")
    assert isinstance(o, Original)
    assert o.client_ip == "198.51.100.1"


def test_absolute_form_uri_with_the_same_host_is_accepted() -> None:
    o = rebuild("nginx", [(b"host", b"api.example.com"), (b"x-original-uri", b"http://API.example.com/a?b")])
    assert isinstance(o, Original)
    assert (o.raw_path, o.query) == (b"/a", b"b")


# --- refusals -------------------------------------------------------------------------------------

def test_missing_original_uri() -> None:
    assert refused(rebuild("nginx", [(b"host", b"h")])) == "forward_auth.missing_uri"
    assert refused(rebuild("traefik", [(b"host", b"h"), (b"x-forwarded-method", b"GET")])) \
        == "forward_auth.missing_uri"


def test_traefik_needs_the_method() -> None:
    assert refused(rebuild("caddy", [(b"host", b"h"), (b"x-forwarded-uri", b"/")])) == "forward_auth.missing_method"


def test_absolute_form_uri_naming_another_host() -> None:
    r = rebuild("nginx", [(b"host", b"api.example.com"), (b"x-original-uri", b"https://evil.example/a")])
    assert refused(r) == "forward_auth.host_mismatch"


@pytest.mark.parametrize("uri", [b"a/b", b"*", b"/a b", b"/a#frag", b"/a\x00", b"/\xc3\xa9", b"//evil/x"[1:] + b"\t"])
def test_bad_uris(uri: bytes) -> None:
    assert refused(rebuild("nginx", [(b"host", b"h"), (b"x-original-uri", uri)])) == "forward_auth.bad_uri"


@pytest.mark.parametrize(("convention", "extra"), [
    ("nginx", (b"x-forwarded-uri", b"/other")),
    ("nginx", (b"x-forwarded-method", b"DELETE")),
    ("nginx", (b"x-forwarded-host", b"other.example")),
    ("traefik", (b"x-original-uri", b"/other")),
    ("envoy", (b"x-original-uri", b"/other")),
    ("envoy", (b"x-forwarded-method", b"DELETE")),
])
def test_two_conventions_disagreeing(convention: str, extra: tuple[bytes, bytes]) -> None:
    headers = [(b"host", b"h"), (b"x-original-uri", b"/p"), (b"x-original-method", b"GET"),
               (b"x-forwarded-uri", b"/p"), (b"x-forwarded-method", b"GET"), extra]
    headers = [(k, v) for k, v in headers if k != extra[0]] + [extra]
    r = reconstruct(convention, "GET", b"/envoy/p" if convention == "envoy" else b"/x", b"", headers,  # type: ignore[arg-type]
                    peer="127.0.0.1", proxies=PROXIES)
    assert refused(r) == "forward_auth.ambiguous"


def test_two_conventions_agreeing_are_fine() -> None:
    o = rebuild("nginx", [(b"host", b"H"), (b"x-original-uri", b"/p"), (b"x-forwarded-uri", b"/p"),
                          (b"x-forwarded-host", b"h")])
    assert isinstance(o, Original)


@pytest.mark.parametrize("name", [b"x-original-uri", b"x-original-method", b"x-real-ip", b"x-forwarded-proto",
                                  b"host"])
def test_a_field_said_twice(name: bytes) -> None:
    base = {b"host": b"h", b"x-original-uri": b"/p", b"x-original-method": b"GET", b"x-real-ip": b"1.2.3.4",
            b"x-forwarded-proto": b"http"}
    headers = [*base.items(), (name, base[name])]
    assert refused(rebuild("nginx", headers)) == "forward_auth.duplicate_field"


def test_oversized_fields() -> None:
    assert refused(rebuild("nginx", [(b"host", b"h" * 2000), (b"x-original-uri", b"/")])) \
        == "forward_auth.field_too_long"
    assert refused(rebuild("nginx", [(b"host", b"h"), (b"x-original-uri", b"/" + b"a" * 20000)])) \
        == "forward_auth.field_too_long"


def test_bad_proto_and_client_address() -> None:
    assert refused(rebuild("nginx", [(b"host", b"h"), (b"x-original-uri", b"/"), (b"x-forwarded-proto", b"ftp")])) \
        == "forward_auth.bad_proto"
    assert refused(rebuild("nginx", [(b"host", b"h"), (b"x-original-uri", b"/"), (b"x-real-ip", b"unknown")])) \
        == "forward_auth.bad_client_ip"


# --- the front stage ------------------------------------------------------------------------------

def front(**cfg: Any) -> ForwardAuthStage:
    return ForwardAuthStage(ForwardAuthConfig(**cfg), NormalizeConfig())


def test_front_stage_rewrites_the_exchange_and_strips_forwarding_headers() -> None:
    ex = exchange("GET", b"/nginx", [
        (b"host", b"127.0.0.1:9181"), (b"x-original-uri", b"/v1/p?z=1"), (b"x-original-method", b"POST"),
        (b"x-original-host", b"api.example.com"), (b"x-real-ip", b"192.0.2.8"), (b"x-forwarded-for", b"192.0.2.8"),
        (b"x-forwarded-proto", b"https"), (b"authorization", b"Bearer k"), (b"x-portcullis-subject", b"admin"),
        (b"X-Portcullis-Tenant".lower(), b"other"), (b"content-length", b"0"), (b"forwarded", b"for=1.1.1.1"),
        (b"x-request-id", b"nginx-req-1"), (b"user-agent", b"ua")])
    assert asyncio.run(front().on_request(ex)) is None
    assert (ex.method, ex.raw_path, ex.query, ex.client_ip) == ("POST", b"/v1/p", b"z=1", "192.0.2.8")
    assert ex.scope["scheme"] == "https"
    assert ex.scope.get("method") is None  # the decision request's own, untouched
    assert ex.request_id == "nginx-req-1"
    assert ex.facts["forward_auth"] == "nginx"
    assert sorted(ex.headers) == [(b"authorization", b"Bearer k"), (b"host", b"api.example.com"),
                                  (b"user-agent", b"ua")]


def test_front_stage_refuses_untrusted_callers_before_anything_else() -> None:
    ex = exchange("GET", b"/nginx", [(b"host", b"h")], client_ip="203.0.113.1")
    p = asyncio.run(front().on_request(ex))
    assert p is not None
    assert (p.status, p.reason) == (403, "forward_auth.untrusted_caller")
    assert ex.facts["forward_auth"] == "nginx"


def test_front_stage_unknown_and_disabled_endpoints() -> None:
    stage = front(conventions=["traefik"])
    for path in (b"/nginx", b"/envoy/x", b"/", b"/traefik/x"):
        p = asyncio.run(stage.on_request(exchange("GET", path, [(b"host", b"h")])))
        assert p is not None
        assert (p.status, p.reason) == (404, "forward_auth.unknown_endpoint")
    assert front(envoy_path_prefix="/ext/authz").convention(b"/ext/authz/v1/x") == "envoy"
    assert front().convention(b"/envoy") is None  # the original path always starts with '/'


def test_front_stage_oversized_headers_are_431() -> None:
    headers = [(b"host", b"h"), (b"x-original-uri", b"/")] + [(b"x-filler", b"v")] * 200
    p = asyncio.run(front().on_request(exchange("GET", b"/nginx", headers)))
    assert p is not None
    assert p.status == 431


def test_front_stage_ignores_a_bad_or_repeated_request_id() -> None:
    for ids in ([(b"x-request-id", b"bad id\x01")], [(b"x-request-id", b"a"), (b"x-request-id", b"b")]):
        ex = exchange("GET", b"/nginx", [(b"host", b"h"), (b"x-original-uri", b"/"), *ids])
        assert asyncio.run(front().on_request(ex)) is None
        assert ex.request_id == "rid"
        assert all(k != b"x-request-id" for k, _ in ex.headers)


# --- principal headers ----------------------------------------------------------------------------

def test_header_values_cannot_split_headers_and_are_bounded() -> None:
    assert header_value("key:reader", 100) == b"key:reader"
    assert header_value("a\r\nSet-Cookie: x", 100) == b"a%0D%0ASet-Cookie: x"
    assert header_value("100%", 100) == b"100%25"
    assert header_value("é", 100) == b"%C3%A9"
    assert header_value("x" * 101, 100) is None


def test_principal_headers() -> None:
    p = Principal(subject="user:1", tenant="acme", credential_id="c", credential_kind="jwt",
                  scopes=frozenset({"b", "a"}), roles=frozenset({"r"}), client_id="app")
    assert principal_headers("X-Portcullis-", p, "rid1") == [
        (b"x-portcullis-subject", b"user:1"), (b"x-portcullis-tenant", b"acme"), (b"x-portcullis-client-id", b"app"),
        (b"x-portcullis-scopes", b"a b"), (b"x-portcullis-roles", b"r"), (b"x-portcullis-credential-kind", b"jwt"),
        (b"x-portcullis-request-id", b"rid1")]
    anonymous = principal_headers("X-Pdp-", None, "rid2")
    assert anonymous is not None
    assert [v for _, v in anonymous] == [b""] * 6 + [b"rid2"]
    assert principal_headers("X-P-", Principal(subject="s" * 5000, tenant="t", credential_id="c",
                                                credential_kind="jwt", scopes=frozenset()), "r") is None


# --- config ---------------------------------------------------------------------------------------

def test_config_defaults_and_refusals() -> None:
    cfg = ForwardAuthConfig()
    assert (cfg.listen.host, cfg.trusted_callers) == ("127.0.0.1", ["127.0.0.1/32", "::1/128"])
    assert cfg.conventions == ["nginx", "traefik", "caddy", "envoy"]
    bads: list[dict[str, Any]] = [
        {"unknown": 1}, {"trusted_callers": ["10.0.0.1/8"]}, {"trusted_callers": []},
        {"principal_headers": "X Bad:"}, {"conventions": ["nginx", "nginx"]}, {"conventions": ["apache"]},
        {"envoy_path_prefix": "envoy"}, {"envoy_path_prefix": "/nginx"}, {"listen": {"port": 70000}}]
    for bad in bads:
        with pytest.raises(ValidationError):
            ForwardAuthConfig(**bad)


BASE_DOC = """
upstreams: {u: {url: "http://127.0.0.1:9"}}
routes: [{name: r, path: /x, methods: [GET], upstream: u, public: true}]
"""


def test_gateway_config_field() -> None:
    assert parse_config(BASE_DOC).config.forward_auth is None
    loaded = parse_config(BASE_DOC + "forward_auth: {listen: {port: 9999}, conventions: [nginx]}\n")
    assert loaded.config.forward_auth is not None
    assert loaded.config.forward_auth.listen.port == 9999
    with pytest.raises(ConfigError) as err:
        parse_config(BASE_DOC + "forward_auth: {listen: {prt: 1}}\n")
    assert "forward_auth.listen.prt: unknown key" in err.value.errors


# --- the decision app, in process -----------------------------------------------------------------

Sent = list[dict[str, Any]]


class Decider:
    """A built gateway (started) and a way to call its decision app as a given peer."""

    def __init__(self, gw: Gateway, loop: asyncio.AbstractEventLoop, data_dir: Path) -> None:
        self.gw, self.loop, self.data_dir = gw, loop, data_dir

    def call(self, path: str, headers: dict[str, str], method: str = "GET", peer: str = "127.0.0.1",
             query: bytes = b"") -> tuple[int, dict[str, str], bytes]:
        scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query,
                 "scheme": "http", "client": (peer, 40000),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        sent: Sent = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(msg: dict[str, Any]) -> None:
            sent.append(msg)

        app = self.gw.decision_app
        assert app is not None
        self.loop.run_until_complete(app(scope, receive, send))
        start = sent[0]
        body = b"".join(m.get("body", b"") for m in sent[1:])
        hdrs = {k.decode(): v.decode() for k, v in start["headers"]}
        return start["status"], hdrs, body

    def event(self, request_id: str) -> AuditEvent:
        assert self.gw.writer.flush(10.0)
        store = open_audit_store(self.data_dir, writable=False)
        try:
            return next(e for e in store.iter_events(after_seq=0) if e.request_id == request_id)
        finally:
            store.close()


@pytest.fixture(scope="module")
def decider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Decider, dict[str, str]]]:
    d = tmp_path_factory.mktemp("fa")
    (d / "config.yaml").write_text("""
data_dir: .
server: {metrics: null}
forward_auth: {trusted_callers: ["127.0.0.1/32"], principal_headers: "X-Pdp-"}
signatures: {}
upstreams: {u: {url: "http://127.0.0.1:9"}}
routes:
  - {name: projects, path: "/t/{tenant}/projects", methods: [GET, POST], upstream: u, auth: [api_key],
     scopes: [p:read], tenant_param: tenant}
  - {name: signed, path: /signed, methods: [GET, POST], upstream: u, auth: [api_key], require_signature: true}
  - {name: open, path: /open, methods: [GET], upstream: u, public: true}
""")
    loaded = parse_config((d / "config.yaml").read_text(), d / "config.yaml")
    keys = {}
    _, keys["reader"] = create_key(loaded.data_dir, name="reader", tenant="acme", scopes=["p:read"], roles=[],
                                   expires_at=None, rate_limit=None)
    _, keys["limited"] = create_key(loaded.data_dir, name="limited", tenant="acme", scopes=["p:read"], roles=[],
                                    expires_at=None, rate_limit=(1, 60.0, 1))
    gw = build_gateway(loaded)
    loop = asyncio.new_event_loop()
    for hook in gw.app.startup_hooks:
        loop.run_until_complete(hook())
    yield Decider(gw, loop, loaded.data_dir), keys
    for hook in gw.app.shutdown_hooks:
        loop.run_until_complete(hook())
    loop.close()


def test_traefik_allow_returns_the_principal_and_is_audited(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, keys = decider
    status, headers, body = dec.call("/traefik", {
        "Host": "pdp", "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/t/acme/projects",
        "X-Forwarded-Host": "api.example.com", "X-Forwarded-For": "198.51.100.4",
        "Authorization": f"Bearer {keys['reader']}", "X-Pdp-Subject": "smuggled"})
    assert (status, body) == (200, b"")
    assert headers["x-pdp-subject"] == "key:reader"
    assert headers["x-pdp-tenant"] == "acme"
    assert headers["x-pdp-credential-kind"] == "api_key"
    ev = dec.event(headers["x-pdp-request-id"])
    assert (ev.decision, ev.route, ev.path, ev.host, ev.client_ip) == (
        "allow", "projects", "/t/acme/projects", "api.example.com", "198.51.100.4")
    assert ev.extra["forward_auth"] == "traefik"


def test_envoy_denials_keep_the_gateway_status(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, keys = decider
    status, headers, body = dec.call("/envoy/t/acme/projects", {"Host": "api.example.com"})
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert json.loads(body)["type"].endswith("/unauthenticated")
    auth = {"Host": "api.example.com", "Authorization": f"Bearer {keys['limited']}"}
    assert dec.call("/envoy/t/acme/projects", auth)[0] == 200
    status, headers, body = dec.call("/envoy/t/acme/projects", auth)
    assert status == 429
    assert int(headers["retry-after"]) >= 1
    doc = json.loads(body)
    ev = dec.event(doc["request_id"])
    assert (ev.reason, ev.extra["forward_auth"]) == ("limit.rate", "envoy")


def test_nginx_denials_are_401_or_403_with_the_real_status(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, _keys = decider
    base = {"Host": "pdp", "X-Original-Host": "api.example.com"}
    status, headers, _ = dec.call("/nginx", {**base, "X-Original-URI": "/t/acme/projects"})
    assert status == 401
    assert headers["x-pdp-status"] == "401"
    status, headers, body = dec.call("/nginx", {**base, "X-Original-URI": "/nowhere"})
    assert (status, headers["x-pdp-status"]) == (403, "404")
    assert json.loads(headers["x-pdp-problem"]) == json.loads(body)
    assert json.loads(body)["status"] == 404
    status, headers, body = dec.call("/nginx", {**base, "X-Original-URI": "/t/acme/projects",
                                                "X-Forwarded-Uri": "/open"})
    assert (status, headers["x-pdp-status"]) == (403, "400")
    assert dec.event(json.loads(body)["request_id"]).reason == "forward_auth.ambiguous"


def test_head_original_behind_a_get_decision_request(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, _ = decider
    status, headers, body = dec.call("/caddy", {"Host": "h", "X-Forwarded-Method": "HEAD",
                                                "X-Forwarded-Uri": "/t/acme/projects"})
    assert status == 401
    assert int(headers["content-length"]) == len(body) > 0  # a GET: the body must be whole


def test_untrusted_caller_is_403_and_audited(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, _keys = decider
    status, _, body = dec.call("/traefik", {"Host": "h", "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/open"},
                               peer="192.0.2.50")
    assert status == 403
    ev = dec.event(json.loads(body)["request_id"])
    assert (ev.reason, ev.client_ip, ev.extra["forward_auth"]) == ("forward_auth.untrusted_caller", "192.0.2.50",
                                                                   "traefik")


def test_public_route_is_allowed_without_principal(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, _ = decider
    status, headers, _ = dec.call("/nginx", {"Host": "h", "X-Original-URI": "/open"})
    assert status == 200
    assert headers["x-pdp-subject"] == ""


def test_signed_routes_cannot_be_decided_with_a_body(decider: tuple[Decider, dict[str, str]]) -> None:
    dec, keys = decider
    auth = {"Host": "h", "Authorization": f"Bearer {keys['reader']}", "X-Forwarded-Uri": "/signed"}
    status, _, body = dec.call("/traefik", {**auth, "X-Forwarded-Method": "POST"})
    assert status == 403
    assert dec.event(json.loads(body)["request_id"]).reason == "forward_auth.signature_needs_body"
    status, _, body = dec.call("/traefik", {**auth, "X-Forwarded-Method": "GET"})
    assert status == 401  # the signature stage itself: no signature
    assert dec.event(json.loads(body)["request_id"]).reason == "sig.missing"


def test_make_server_refuses_the_public_port(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(BASE_DOC + "server: {listen: {port: 18080}, metrics: null}\n"
                                     "forward_auth: {listen: {port: 18080}}\ndata_dir: .\n")
    loaded = parse_config((tmp_path / "c.yaml").read_text(), tmp_path / "c.yaml")
    gw = build_gateway(loaded)
    with pytest.raises(ValueError, match="must not share the public port"):
        make_server(gw, loaded)
