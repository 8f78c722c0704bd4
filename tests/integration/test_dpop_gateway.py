"""DPoP-bound access tokens (RFC 9449) through the real gateway: proof checks per
request, Bearer refusal, replay, htu/htm binding, key binding and server nonces."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from joserfc import jws
from joserfc.jwk import ECKey

from portcullis.credentials.rfc9449 import jwk_thumbprint
from portcullis.demo.upstream import UpstreamThread
from tests.integration.echo import EchoApp
from tests.integration.harness import Client, GatewayThread, find_audit_event, free_port, write_config
from tests.integration.issuer import IssuerApp

AUD = "https://api.example"


def proof(key: ECKey, method: str, url: str, token: str | None, nonce: str | None = None,
          jti: str | None = None) -> str:
    claims: dict[str, Any] = {"jti": jti or str(uuid.uuid4()), "htm": method, "htu": url, "iat": int(time.time())}
    if token is not None:
        claims["ath"] = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()
    if nonce is not None:
        claims["nonce"] = nonce
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": key.as_dict(private=False)}
    return jws.serialize_compact(header, json.dumps(claims).encode(), key, algorithms=["ES256"])


@dataclass
class Env:
    port: int
    nonce_port: int
    issuer: IssuerApp
    gw: GatewayThread
    nonce_gw: GatewayThread
    key: ECKey

    def url(self, path: str, port: int | None = None) -> str:
        return f"http://127.0.0.1:{port or self.port}{path}"

    def bound(self, key: ECKey | None = None) -> str:
        jkt = jwk_thumbprint((key or self.key).as_dict(private=False))
        return self.issuer.mint(AUD, cnf={"jkt": jkt})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    echo = UpstreamThread(EchoApp())
    echo.start()
    app = IssuerApp()
    issuer = UpstreamThread(app)
    app.issuer = issuer.url
    issuer.start()
    port, nonce_port = free_port(), free_port()

    def doc(p: int, **dpop: Any) -> dict[str, Any]:
        return {
            "data_dir": ".", "server": {"listen": {"port": p}, "metrics": None},
            "jwt": {"issuers": [{"issuer": app.issuer, "discovery": True, "audience": AUD}]},
            "dpop": dict(dpop),
            "upstreams": {"echo": {"url": echo.url}},
            "routes": [{"name": "echo", "path": "/echo/{x}", "methods": ["GET", "POST"], "upstream": "echo",
                        "auth": ["jwt"], "scopes": ["projects:read"]}],
        }

    d = tmp_path_factory.mktemp("dpop")
    gw = GatewayThread(write_config(d / "a", doc(port)))
    nonce_gw = GatewayThread(write_config(d / "b", doc(nonce_port, require_nonce=True)))
    gw.start()
    nonce_gw.start()
    yield Env(port, nonce_port, app, gw, nonce_gw, ECKey.generate_key("P-256"))
    gw.stop()
    nonce_gw.stop()
    issuer.stop()
    echo.stop()


def call(env: Env, token: str, dpop: str | None, scheme: str = "DPoP", method: str = "GET",
         path: str = "/echo/a", port: int | None = None) -> Any:
    headers = {"Authorization": f"{scheme} {token}"}
    if dpop is not None:
        headers["DPoP"] = dpop
    return Client(port or env.port).request(method, path, headers, b"{}" if method == "POST" else None)


def reason(gw: GatewayThread, r: Any) -> str:
    return find_audit_event(gw, r.headers["x-request-id"]).reason


def test_bound_token_with_a_valid_proof(env: Env) -> None:
    token = env.bound()
    r = call(env, token, proof(env.key, "GET", env.url("/echo/a"), token))
    assert r.status == 200, r.body
    forwarded = {k for k, _ in json.loads(r.body)["headers"]}
    assert "dpop" not in forwarded and "authorization" not in forwarded  # credentials are not passed on


def test_bound_token_as_bearer_is_refused(env: Env) -> None:
    r = call(env, env.bound(), None, scheme="Bearer")
    assert r.status == 401
    assert reason(env.gw, r) == "auth.dpop_required"


def test_unbound_token_with_dpop_scheme_is_refused(env: Env) -> None:
    token = env.issuer.mint(AUD)
    r = call(env, token, proof(env.key, "GET", env.url("/echo/a"), token))
    assert r.status == 401
    assert reason(env.gw, r) == "auth.dpop_unbound_token"
    assert r.headers["www-authenticate"].startswith("DPoP algs=")


@pytest.mark.parametrize(("case", "expected"), [
    ("replay", "dpop.replay"),
    ("other-url", "dpop.htu_mismatch"),
    ("other-method", "dpop.htm_mismatch"),
    ("other-key", "dpop.key_mismatch"),
    ("no-proof", "dpop.missing"),
    ("wrong-ath", "dpop.ath_mismatch"),
])
def test_bad_proofs(env: Env, case: str, expected: str) -> None:
    token = env.bound()
    url = env.url("/echo/a")
    if case == "replay":
        p = proof(env.key, "GET", url, token)
        assert call(env, token, p).status == 200
    elif case == "other-url":
        p = proof(env.key, "GET", env.url("/echo/b"), token)
    elif case == "other-method":
        p = proof(env.key, "POST", url, token)
    elif case == "other-key":
        p = proof(ECKey.generate_key("P-256"), "GET", url, token)
    elif case == "wrong-ath":
        p = proof(env.key, "GET", url, env.bound())
    else:
        p = None
    r = call(env, token, p)
    assert r.status == 401, case
    assert reason(env.gw, r) == expected
    assert "DPoP" in r.headers["www-authenticate"]


def test_server_nonce_round_trip(env: Env) -> None:
    token = env.bound()
    url = env.url("/echo/a", env.nonce_port)
    r = call(env, token, proof(env.key, "GET", url, token), port=env.nonce_port)
    assert r.status == 401
    assert 'error="use_dpop_nonce"' in r.headers["www-authenticate"]
    nonce = r.headers["dpop-nonce"]
    r = call(env, token, proof(env.key, "GET", url, token, nonce=nonce), port=env.nonce_port)
    assert r.status == 200, r.body


def test_a_refused_token_on_a_dpop_request_gets_a_dpop_challenge(env: Env) -> None:
    jkt = jwk_thumbprint(env.key.as_dict(private=False))
    expired = env.issuer.mint(AUD, cnf={"jkt": jkt}, exp=int(time.time()) - 600)
    r = call(env, expired, proof(env.key, "GET", env.url("/echo/a"), expired))
    assert r.status == 401
    assert r.headers["www-authenticate"].startswith("DPoP algs=")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert reason(env.gw, r) == "jwt.expired"
