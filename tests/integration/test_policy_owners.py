"""Object-level authorization (BOLA) with owners the gateway cannot know in advance: an
owner service (`upstream` source), the upstream's own answer (`header` source), and
what happens when either cannot say — always a refusal, never an allow."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from portcullis.demo.upstream import UpstreamThread
from portcullis.keysadmin import create_key
from tests.integration.harness import Client, GatewayThread, find_audit_event, free_port, write_config

DOCS = {"d1": ("key:alice", "acme"), "d2": ("key:bob", "acme")}


class DocsApi:
    """GET /v1/tenants/{t}/docs/{id}: 200 naming the owner in headers (d3: no owner
    header; d4: the owner header twice); GET /owners/Item/{id}: the owner service."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        parts = scope["path"].strip("/").split("/")
        status, headers, body = 404, [], b"{}"
        if len(parts) == 5 and parts[3] == "docs":
            doc = parts[4]
            status, body = 200, json.dumps({"id": doc}).encode()
            if doc in DOCS:
                headers = [(b"x-resource-owner", DOCS[doc][0].encode()), (b"x-resource-tenant", DOCS[doc][1].encode())]
            elif doc == "d4":
                headers = [(b"x-resource-owner", b"key:alice"), (b"x-resource-owner", b"key:bob")]
        elif len(parts) == 3 and parts[0] == "owners" and parts[2] in DOCS:
            owner, tenant = DOCS[parts[2]]
            status, body = 200, json.dumps({"owner": owner, "tenant": tenant}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})


OWNER_ONLY_READS = """
@id("read-all") permit (principal, action, resource);
@id("owner-only") forbid (principal, action, resource)
when { resource.owned && !(resource has owner && resource.owner == principal.subject) };
"""


@dataclass
class OEnv:
    port: int
    decision_port: int
    keys: dict[str, str]
    gw: GatewayThread

    def get(self, who: str, path: str) -> Any:
        return Client(self.port, {"X-API-Key": self.keys[who]}).request("GET", path)


@pytest.fixture(scope="module")
def oenv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OEnv]:
    api = UpstreamThread(DocsApi())
    api.start()
    root = tmp_path_factory.mktemp("owners")
    (root / "policies").mkdir()
    (root / "policies" / "owners.cedar").write_text(OWNER_ONLY_READS)
    port, decision_port = free_port(), free_port()
    t = "/v1/tenants/{tenant}"

    def route(name: str, path: str) -> dict[str, Any]:
        return {"name": name, "methods": ["GET"], "path": path, "upstream": "docs", "auth": ["api_key"],
                "scopes": ["docs:read"], "tenant_param": "tenant"}

    doc = {
        "version": 1, "data_dir": ".",
        "server": {"listen": {"host": "127.0.0.1", "port": port}, "metrics": None},
        "forward_auth": {"listen": {"host": "127.0.0.1", "port": decision_port}},
        "upstreams": {"docs": {"url": api.url}},
        "routes": [route("get-doc", t + "/docs/{id}"),
                   {**route("get-item", t + "/items/{id}"), "upstream_path": t + "/docs/{id}"},
                   {**route("get-thing", t + "/things/{id}"), "upstream_path": t + "/docs/{id}"}],
        "policy": {
            "dir": "policies",
            "resources": {
                "get-doc": {"type": "Doc", "id_param": "id", "owner": "from-answer"},
                "get-item": {"type": "Item", "id_param": "id", "owner": "owner-service"},
                "get-thing": {"type": "Thing", "id_param": "id", "owner": "dead-service"},
            },
            "owner_sources": {
                "from-answer": {"kind": "header"},
                "owner-service": {"kind": "upstream", "url": api.url + "/owners/{type}/{id}?tenant={tenant}"},
                "dead-service": {"kind": "upstream", "url": f"http://127.0.0.1:{free_port()}/owners/{{id}}",
                                 "timeout_seconds": 0.5},
            },
        },
    }
    loaded = write_config(root, doc)
    keys = {}
    for name in ("alice", "bob"):
        _, keys[name] = create_key(loaded.data_dir, name=name, tenant="acme", roles=[], scopes=["docs:read"])
    gw = GatewayThread(loaded)
    gw.start()
    yield OEnv(port, decision_port, keys, gw)
    gw.stop()
    api.stop()


D = "/v1/tenants/acme"


def test_header_owner_decided_on_the_answer(oenv: OEnv) -> None:
    assert oenv.get("alice", f"{D}/docs/d1").status == 200
    r = oenv.get("bob", f"{D}/docs/d1")
    assert r.status == 403 and '"id"' not in r.body.decode()  # the upstream body never reaches bob
    ev = find_audit_event(oenv.gw, r.headers["x-request-id"])
    assert ev.reason == "policy.forbid" and ev.extra["policy"]["policies"] == ["owner-only"]


@pytest.mark.parametrize("doc", ["d3", "d4"])  # no owner header; two owner headers
def test_header_owner_missing_or_ambiguous_fails_closed(oenv: OEnv, doc: str) -> None:
    r = oenv.get("alice", f"{D}/docs/{doc}")
    assert r.status == 502 and '"id"' not in r.body.decode()  # not the upstream body
    ev = find_audit_event(oenv.gw, r.headers["x-request-id"])
    assert ev.reason == "policy.owner_ambiguous" and ev.extra["policy"]["policy_decision"] == "deny"


def test_upstream_owner_service(oenv: OEnv) -> None:
    assert oenv.get("bob", f"{D}/items/d2").status == 200
    r = oenv.get("alice", f"{D}/items/d2")
    assert r.status == 403
    assert find_audit_event(oenv.gw, r.headers["x-request-id"]).extra["policy"]["policies"] == ["owner-only"]


def test_owner_service_down_refuses_with_503(oenv: OEnv) -> None:
    r = oenv.get("alice", f"{D}/things/d1")
    assert r.status == 503 and r.headers.get("retry-after") == "1"
    assert find_audit_event(oenv.gw, r.headers["x-request-id"]).reason == "policy.owner_unavailable"


def test_forward_auth_refuses_what_only_the_answer_could_decide(oenv: OEnv) -> None:
    decide = Client(oenv.decision_port, {"X-API-Key": oenv.keys["alice"], "X-Original-URI": f"{D}/docs/d1",
                                         "X-Original-Method": "GET"})
    r = decide.request("GET", "/nginx")
    assert r.status == 403
    assert find_audit_event(oenv.gw, r.headers["x-request-id"]).reason == "forward_auth.owner_needs_response"
    # A route whose owner is known before the answer is decided normally.
    ok = Client(oenv.decision_port, {"X-API-Key": oenv.keys["bob"], "X-Original-URI": f"{D}/items/d2",
                                     "X-Original-Method": "GET"}).request("GET", "/nginx")
    assert ok.status == 200
