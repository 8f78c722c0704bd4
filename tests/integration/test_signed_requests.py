"""RFC 9421 signed requests through the real gateway, signed by an independent client
(http-message-signatures on a `requests` prepared request), and signed responses
verified by the same library."""

from __future__ import annotations

import http.client
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    MappingKeyResolver,
    algorithms,
)

from portcullis.demo.upstream import UpstreamThread
from portcullis.keysadmin import create_key
from tests.integration.echo import EchoApp
from tests.integration.harness import GatewayThread, find_audit_event, free_port, write_config


def pem_public(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@dataclass
class Env:
    port: int
    gw: GatewayThread
    partner: Ed25519PrivateKey
    other: Ed25519PrivateKey
    gateway_key: Ed25519PrivateKey
    bound_key: str
    plain_key: str


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    echo = UpstreamThread(EchoApp())
    echo.start()
    partner, other, gateway_key = (Ed25519PrivateKey.generate() for _ in range(3))
    d: Path = tmp_path_factory.mktemp("sig")
    (d / "gateway-signing.pem").write_bytes(gateway_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    port = free_port()

    def route(name: str, path: str, **kw: Any) -> dict[str, Any]:
        return {"name": name, "path": path, "methods": ["GET", "POST"], "upstream": "echo",
                "auth": ["api_key"], "scopes": ["s"], **kw}

    doc = {
        "data_dir": ".", "server": {"listen": {"port": port}, "metrics": None},
        "upstreams": {"echo": {"url": echo.url}},
        "signatures": {
            "keys": [{"key_id": "partner-1", "alg": "ed25519", "public_key_pem": pem_public(partner)},
                     {"key_id": "partner-2", "alg": "ed25519", "public_key_pem": pem_public(other)}],
            "response_signing": {"key_id": "gateway-1", "alg": "ed25519", "private_key_file": "gateway-signing.pem"},
        },
        "routes": [route("echo", "/echo/{x}"), route("signed-only", "/signed/{x}", require_signature=True),
                   route("signed-answers", "/answers/{x}", sign_responses=True)],
    }
    loaded = write_config(d, doc)
    _, bound = create_key(loaded.data_dir, name="partner", tenant="t", scopes=["s"], roles=[],
                          signing_key_id="partner-1")
    _, plain = create_key(loaded.data_dir, name="plain", tenant="t", scopes=["s"], roles=[])
    gw = GatewayThread(loaded)
    gw.start()
    yield Env(port, gw, partner, other, gateway_key, bound, plain)
    gw.stop()
    echo.stop()


def signed(env: Env, method: str, path: str, api_key: str, body: bytes | None = None,
           key: Ed25519PrivateKey | None = None, key_id: str = "partner-1", nonce: str | None = None,
           ) -> requests.PreparedRequest:
    req = requests.Request(method, f"http://127.0.0.1:{env.port}{path}", data=body,
                           headers={"X-API-Key": api_key, "Content-Type": "application/json"}).prepare()
    components: tuple[str, ...] = ("@method", "@authority", "@path")
    if req.body:
        components += ("content-digest",)
    if "?" in path:
        components += ("@query",)
    resolver = MappingKeyResolver(public_keys={}, private_keys={key_id: key or env.partner})
    signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=resolver)
    signer.sign(req, key_id=key_id, created=datetime.now(UTC), nonce=nonce or uuid.uuid4().hex,
                covered_component_ids=components, label="sig1",
                body=req.body if isinstance(req.body, bytes) else None)  # adds Content-Digest (RFC 9530)
    return req


def send(env: Env, req: requests.PreparedRequest, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    try:
        path = req.path_url
        payload = body if body is not None else req.body if isinstance(req.body, bytes) else None
        conn.request(req.method or "GET", path, body=payload, headers=dict(req.headers))
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def reason(env: Env, headers: dict[str, str]) -> str:
    return find_audit_event(env.gw, headers["x-request-id"]).reason


def test_bound_key_with_a_valid_signature(env: Env) -> None:
    status, _, _ = send(env, signed(env, "GET", "/echo/a?x=1", env.bound_key))
    assert status == 200


def test_signed_body_is_forwarded_intact(env: Env) -> None:
    status, _, body = send(env, signed(env, "POST", "/echo/b", env.bound_key, b'{"amount": 10}'))
    assert status == 200
    assert b'"body_bytes": 14' in body


def test_bound_key_without_a_signature(env: Env) -> None:
    req = requests.Request("GET", f"http://127.0.0.1:{env.port}/echo/a",
                           headers={"X-API-Key": env.bound_key}).prepare()
    status, headers, _ = send(env, req)
    assert status == 401
    assert reason(env, headers) == "sig.missing"
    assert headers["accept-signature"].startswith('sig1=("@method" "@authority" "@path"')


def test_tampered_body(env: Env) -> None:
    req = signed(env, "POST", "/echo/b", env.bound_key, b'{"amount": 10}')
    status, headers, _ = send(env, req, body=b'{"amount": 99}')
    assert status == 401
    assert reason(env, headers) == "sig.digest_mismatch"


def test_replayed_signature(env: Env) -> None:
    req = signed(env, "GET", "/echo/a", env.bound_key, nonce="fixed-nonce-1")
    assert send(env, req)[0] == 200
    status, headers, _ = send(env, req)
    assert status == 401
    assert reason(env, headers) == "sig.replay"


def test_another_partners_key_cannot_sign_for_this_credential(env: Env) -> None:
    status, headers, _ = send(env, signed(env, "GET", "/echo/a", env.bound_key, key=env.other, key_id="partner-2"))
    assert status == 401
    assert reason(env, headers) == "sig.wrong_key"


def test_signature_over_another_path(env: Env) -> None:
    req = signed(env, "GET", "/echo/a", env.bound_key)
    req.url = f"http://127.0.0.1:{env.port}/echo/zzz"
    status, headers, _ = send(env, req)
    assert status == 401
    assert reason(env, headers) == "sig.bad_signature"


def test_route_requiring_signatures_for_every_credential(env: Env) -> None:
    plain = requests.Request("GET", f"http://127.0.0.1:{env.port}/signed/a",
                             headers={"X-API-Key": env.plain_key}).prepare()
    assert send(env, plain)[0] == 401
    assert send(env, signed(env, "GET", "/signed/a", env.plain_key))[0] == 200
    assert send(env, requests.Request("GET", f"http://127.0.0.1:{env.port}/echo/a",
                                      headers={"X-API-Key": env.plain_key}).prepare())[0] == 200


def test_signed_responses_verify_with_the_gateway_key(env: Env) -> None:
    req = requests.Request("GET", f"http://127.0.0.1:{env.port}/answers/a", headers={"X-API-Key": env.plain_key})
    prepared = req.prepare()
    status, headers, body = send(env, prepared)
    assert status == 200
    assert "signature-input" in headers and "signature" in headers and headers["content-digest"].startswith("sha-256=")
    response = requests.Response()
    response.status_code = status
    response.headers = requests.structures.CaseInsensitiveDict(headers)
    response._content = body
    response.request = prepared
    resolver = MappingKeyResolver(public_keys={"gateway-1": env.gateway_key.public_key()}, private_keys={})
    verifier = HTTPMessageVerifier(signature_algorithm=algorithms.ED25519, key_resolver=resolver)
    results = verifier.verify(response, max_age=timedelta(minutes=5))
    assert results
    assert results[0].parameters["keyid"] == "gateway-1"
    # A response changed on the way no longer verifies.
    response.status_code = 201
    with pytest.raises(HTTPMessageSignaturesException):
        verifier.verify(response, max_age=timedelta(minutes=5))


def test_head_answers_are_not_signed_over_an_empty_body(env: Env) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", env.port, timeout=10)
    try:
        conn.request("HEAD", "/answers/a", headers={"X-API-Key": env.plain_key})
        r = conn.getresponse()
        r.read()
        names = {k.lower() for k, _ in r.getheaders()}
        assert r.status == 200
        assert "signature" not in names and "signature-input" not in names
    finally:
        conn.close()


@pytest.mark.parametrize(("section", "message"), [
    ("{keys: [{key_id: a, alg: hmac-sha256, secret_b64: 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI='}, "
     "{key_id: a, alg: hmac-sha256, secret_b64: 'c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI='}]}",
     "listed more than once"),
    ("{response_signing: {key_id: g, alg: hmac-sha256, private_key_file: k}}", "response_signing.alg"),
])
def test_signature_config_mistakes_are_caught_by_check(section: str, message: str) -> None:
    from portcullis.config import ConfigError, parse_config

    base = """
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes: [{name: r, path: /r, methods: [GET], upstream: api, public: true}]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(base + f"signatures: {section}\n")
    assert any(message in e for e in info.value.errors), info.value.errors


def test_a_partners_access_tokens_must_be_signed_too(tmp_path: Path) -> None:
    """`signatures.clients`: requests with a token of that client need the client's signature."""
    from portcullis.demo.upstream import UpstreamThread as Thread
    from tests.integration.issuer import IssuerApp

    app = IssuerApp()
    issuer = Thread(app)
    app.issuer = issuer.url
    issuer.start()
    echo = Thread(EchoApp())
    echo.start()
    partner = Ed25519PrivateKey.generate()
    port = free_port()
    doc = {
        "data_dir": ".", "server": {"listen": {"port": port}, "metrics": None},
        "jwt": {"issuers": [{"issuer": app.issuer, "discovery": True, "audience": "https://api.example"}]},
        "signatures": {"keys": [{"key_id": "partner-1", "alg": "ed25519", "public_key_pem": pem_public(partner)}],
                       "clients": {"partner-app": "partner-1"}},
        "upstreams": {"echo": {"url": echo.url}},
        "routes": [{"name": "echo", "path": "/echo/{x}", "methods": ["GET"], "upstream": "echo", "auth": ["jwt"],
                    "scopes": ["projects:read"]}],
    }
    gw = GatewayThread(write_config(tmp_path, doc))
    gw.start()
    try:
        token = app.mint("https://api.example", client_id="partner-app")
        other = app.mint("https://api.example", client_id="someone-else")
        url = f"http://127.0.0.1:{port}/echo/a"
        base = {"Authorization": f"Bearer {token}"}
        env = Env(port, gw, partner, partner, partner, "", "")
        unsigned = requests.Request("GET", url, headers=base).prepare()
        status, headers, _ = send(env, unsigned)
        assert status == 401
        assert find_audit_event(gw, headers["x-request-id"]).reason == "sig.missing"
        req = requests.Request("GET", url, headers=base).prepare()
        resolver = MappingKeyResolver(public_keys={}, private_keys={"partner-1": partner})
        HTTPMessageSigner(signature_algorithm=algorithms.ED25519, key_resolver=resolver).sign(
            req, key_id="partner-1", created=datetime.now(UTC), nonce=uuid.uuid4().hex,
            covered_component_ids=("@method", "@authority", "@path"), label="sig1")
        assert send(env, req)[0] == 200
        plain = requests.Request("GET", url, headers={"Authorization": f"Bearer {other}"}).prepare()
        assert send(env, plain)[0] == 200  # other clients are not bound
    finally:
        gw.stop()
        echo.stop()
        issuer.stop()
