"""The token endpoint over real HTTP: client credentials with every client authentication
method (driven by requests-oauth2client, an independent client), the attacks on each,
DPoP-bound and certificate-bound tokens, discovery and JWKS.

`tok_env` (also used by the introspection and gateway tests) is a real gateway with the
authorization server, a trusted TLS-terminating proxy at 127.0.0.2 forwarding client
certificates, DPoP at the gateway, and the demo routes accepting this issuer's tokens.
"""

from __future__ import annotations

import datetime
import http.client
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jwskate
import pytest
import requests
from binapy import BinaPy
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet
from requests_oauth2client import ClientSecretBasic, ClientSecretPost, DPoPKey, OAuth2Client, PrivateKeyJwt
from requests_oauth2client.exceptions import InvalidScope

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.oauth.models import Client
from portcullis.oauth.service import AuthContext
from portcullis.tls import cert_thumbprint
from tests.integration.harness import GatewayThread, find_audit_event, free_port, write_config
from tests.integration.oauth.conftest import oauth_storage
from tests.integration.test_mtls import Pki, write_pki

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass
class Registered:
    client: Client
    secret: str | None = None
    key: jwskate.Jwk | None = None


@dataclass
class TokEnv:
    port: int
    issuer: str
    gateway: GatewayThread
    ctx: AuthContext
    pki: Pki
    clients: dict[str, Registered] = field(default_factory=dict)

    @property
    def token_url(self) -> str:
        return f"{self.issuer}/oauth2/token"

    def post(self, path: str, data: dict[str, Any] | str, *, auth: tuple[str, str] | None = None,
             headers: dict[str, str] | None = None) -> requests.Response:
        return requests.post(self.issuer + path, data=data, auth=auth, headers=headers, timeout=10)

    def via_proxy(self, path: str, form: dict[str, str], cert_pem: bytes | None,
                  source: str = "127.0.0.2", method: str = "POST", headers: dict[str, str] | None = None
                  ) -> tuple[int, dict[str, str], bytes]:
        """A request as a TLS-terminating proxy at `source` forwards it, with the client's certificate."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10, source_address=(source, 0))
        hs = {**(headers or {})}
        if method == "POST":
            hs["content-type"] = "application/x-www-form-urlencoded"
        if cert_pem is not None:
            hs["x-client-cert"] = quote(cert_pem.decode())
        try:
            conn.request(method, path, body=urlencode(form) if method == "POST" else None, headers=hs)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()

    def reason(self, resp: requests.Response) -> str:
        return find_audit_event(self.gateway, resp.headers["x-request-id"]).reason

    def decode(self, token: str) -> jwt.Token:
        """Verify an access token with the JWKS fetched over HTTP, as any resource server would."""
        jwks = requests.get(f"{self.issuer}/oauth2/jwks", timeout=10).json()
        return jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["ES256"])


def oauth_client(token_url: str, auth: Any) -> OAuth2Client:
    """requests-oauth2client against our http://127.0.0.1 test issuer (it insists on https otherwise)."""
    return OAuth2Client(token_url, auth=auth, testing=True)


def private_jwk() -> jwskate.Jwk:
    return jwskate.Jwk.generate(alg="ES256", kid=str(uuid.uuid4()))


def self_signed(cn: str) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM), key


def start_env(upstream: UpstreamThread, d: Path, *, storage: dict[str, Any] | None = None, **as_cfg: Any) -> TokEnv:
    """A gateway with the authorization server; its stores in `storage` (conftest.oauth_storage) if given."""
    port, mport = free_port(), free_port()
    issuer = f"http://127.0.0.1:{port}"
    doc = demo_config(upstream.url, port, mport)
    doc["auth_server"] = {"issuer": issuer, **as_cfg}
    doc["normalize"] = {"trusted_proxies": ["127.0.0.2"], "client_cert_header": "x-client-cert"}
    doc["dpop"] = {}
    for r in doc["routes"]:
        if not r.get("public"):
            r["auth"] = ["api_key", "jwt"]
    if storage is not None:
        doc["storage"] = storage
    gw = GatewayThread(write_config(d, doc))
    gw.start()
    auth = gw.gw.auth_server
    assert auth is not None
    auth.ctx.clients.create_tenant("acme")
    auth.ctx.clients.create_tenant("globex")
    return TokEnv(port, issuer, gw, auth.ctx, write_pki(d))


def register(env: TokEnv, name: str, method: str, *, tenant: str = "acme", scopes: list[str] | None = None,
             **kw: Any) -> Registered:
    key = None
    if method == "private_key_jwt" and "jwks" not in kw:
        key = private_jwk()
        kw["jwks"] = json.dumps({"keys": [key.public_jwk().to_dict()]})
    client, secret = env.ctx.clients.create_client(
        name=name, tenant=tenant, auth_method=method, grant_types=["client_credentials"],
        scopes=scopes or ["projects:read", "billing:read"], **kw)
    reg = Registered(client, secret, key)
    env.clients[name] = reg
    return reg


@pytest.fixture(scope="module")
def tok_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokEnv]:
    yield from make_tok_env(upstream, tmp_path_factory)


def make_tok_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory, *,
                 on_postgres: bool | None = None) -> Iterator[TokEnv]:
    """`tok_env`'s body (on PostgreSQL when `on_postgres`; None: as `oauth_storage` decides)."""
    with oauth_storage(on_postgres) as storage:
        env = start_env(upstream, tmp_path_factory.mktemp("tok"), storage=storage)
        try:
            register(env, "basic", "client_secret_basic")
            register(env, "post", "client_secret_post")
            register(env, "pkjwt", "private_key_jwt")
            register(env, "tls", "tls_client_auth", tls_subject_dn="CN=alice")
            register(env, "globex", "client_secret_basic", tenant="globex", scopes=["projects:read"])
            register(env, "dpop-only", "client_secret_basic", require_dpop=True)
            yield env
        finally:
            env.gateway.stop()


def basic(env: TokEnv, name: str = "basic") -> ClientSecretBasic:
    reg = env.clients[name]
    assert reg.secret is not None
    return ClientSecretBasic(reg.client.client_id, reg.secret)


def assertion(env: TokEnv, name: str = "pkjwt", *, key: jwskate.Jwk | None = None, alg: str = "ES256",
              **over: Any) -> str:
    reg = env.clients[name]
    now = int(time.time())
    claims = {"iss": reg.client.client_id, "sub": reg.client.client_id, "aud": env.token_url, "iat": now,
              "exp": now + 60, "jti": str(uuid.uuid4()), **over}
    claims = {k: v for k, v in claims.items() if v is not None}
    k = key or reg.key
    assert k is not None
    return str(jwskate.Jwt.sign(claims, key=k, alg=alg))


def cc_form(env: TokEnv, client_assertion: str, **extra: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": client_assertion, **extra}


# --- client_secret_basic / client_secret_post --------------------------------------------


def test_client_credentials_with_basic_issues_an_rfc9068_token(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    oc = oauth_client(tok_env.token_url, auth=basic(tok_env))
    tok = oc.client_credentials(scope="projects:read")
    assert tok.token_type.lower() == "bearer"
    decoded = tok_env.decode(tok.access_token)
    assert decoded.header["typ"] == "at+jwt" and decoded.header["alg"] == "ES256"
    c = decoded.claims
    assert c["iss"] == tok_env.issuer and c["aud"] == tok_env.issuer
    assert c["sub"] == reg.client.client_id == c["client_id"]
    assert c["scope"] == "projects:read" and c["tenant"] == "acme"
    assert c["exp"] - c["iat"] == 600 and isinstance(c["jti"], str) and len(c["jti"]) >= 16
    assert "cnf" not in c and "refresh_token" not in tok.as_dict()  # RFC 6749 §4.4.3


def test_token_responses_are_never_cached(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    ok = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"},
                      auth=(reg.client.client_id, reg.secret or ""))
    bad = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=(reg.client.client_id, "nope"))
    for r in (ok, bad):
        assert r.headers["cache-control"] == "no-store" and r.headers["pragma"] == "no-cache"
    assert ok.status_code == 200 and ok.json()["expires_in"] == 600


def test_omitted_scope_is_the_clients_scope_and_more_is_refused(tok_env: TokEnv) -> None:
    oc = oauth_client(tok_env.token_url, auth=basic(tok_env))
    assert tok_env.decode(oc.client_credentials().access_token).claims["scope"] == "projects:read billing:read"
    with pytest.raises(InvalidScope):
        oc.client_credentials(scope="projects:read projects:write")


def test_client_secret_post(tok_env: TokEnv) -> None:
    reg = tok_env.clients["post"]
    assert reg.secret is not None
    tok = oauth_client(tok_env.token_url, auth=ClientSecretPost(reg.client.client_id, reg.secret)).client_credentials()
    assert tok_env.decode(tok.access_token).claims["client_id"] == reg.client.client_id
    # The registered method only: the same secret over Basic is refused.
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=(reg.client.client_id, reg.secret))
    assert r.status_code == 401 and tok_env.reason(r) == "oauth.client_auth.wrong_method"


@pytest.mark.parametrize(("who", "secret", "reason"), [
    ("basic", "pcs_wrong", "oauth.client_auth.bad_secret"),
    ("cl_nobody", "pcs_whatever", "oauth.client_auth.unknown_client"),
])
def test_bad_client_secret_is_invalid_client_with_basic_challenge(tok_env: TokEnv, who: str, secret: str,
                                                                  reason: str) -> None:
    cid = tok_env.clients[who].client.client_id if who in tok_env.clients else who
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=(cid, secret))
    assert r.status_code == 401
    assert r.json() == {"error": "invalid_client", "error_description": "Client authentication failed."}
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    assert tok_env.reason(r) == reason  # the cause is audited, never told


def test_revoked_client_is_refused_within_a_second(tok_env: TokEnv) -> None:
    reg = register(tok_env, "to-revoke", "client_secret_basic")
    auth = (reg.client.client_id, reg.secret or "")
    assert tok_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=auth).status_code == 200
    tok_env.ctx.clients.revoke_client(reg.client.client_id)
    time.sleep(1.0)
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=auth)
    assert r.status_code == 401 and tok_env.reason(r) == "oauth.client_auth.unknown_client"


def test_no_credentials_and_two_methods_are_refused(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials", "client_id": reg.client.client_id})
    assert r.status_code == 401 and r.json()["error"] == "invalid_client"
    # RFC 6749 §2.3: one method per request.
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials", "client_secret": reg.secret or ""},
                     auth=(reg.client.client_id, reg.secret or ""))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert tok_env.reason(r) == "oauth.client_auth.multiple_methods"


@pytest.mark.parametrize("grant", ["password", "implicit", "urn:ietf:params:oauth:grant-type:device_code", ""])
def test_no_password_or_implicit_grant(tok_env: TokEnv, grant: str) -> None:
    reg = tok_env.clients["basic"]
    r = tok_env.post("/oauth2/token", {"grant_type": grant, "username": "alice", "password": "x"},
                     auth=(reg.client.client_id, reg.secret or ""))
    assert r.status_code == 400 and r.json()["error"] == "unsupported_grant_type"


def test_token_endpoint_accepts_only_posted_forms(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    auth = (reg.client.client_id, reg.secret or "")
    r = requests.post(tok_env.token_url, json={"grant_type": "client_credentials"}, auth=auth, timeout=10)
    assert r.status_code == 400 and tok_env.reason(r) == "oauth.content_type"
    r = requests.post(tok_env.token_url + "?grant_type=client_credentials", data={"x": "y"}, auth=auth, timeout=10)
    assert r.status_code == 400 and tok_env.reason(r) == "oauth.query_parameters"
    r = tok_env.post("/oauth2/token", "grant_type=client_credentials&scope=a&scope=b", auth=auth,
                     headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and tok_env.reason(r) == "oauth.repeated_parameter"
    assert requests.get(tok_env.token_url, timeout=10).status_code == 405


def test_resource_indicators(tok_env: TokEnv) -> None:
    oc = oauth_client(tok_env.token_url, auth=basic(tok_env))
    tok = oc.client_credentials(resource=tok_env.issuer)
    assert tok_env.decode(tok.access_token).claims["aud"] == tok_env.issuer
    reg = tok_env.clients["basic"]
    for resource in ("https://evil.example/api", "not a uri", f"{tok_env.issuer}#frag"):
        r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials", "resource": resource},
                         auth=(reg.client.client_id, reg.secret or ""))
        assert r.status_code == 400 and r.json()["error"] == "invalid_target"


# --- private_key_jwt (RFC 7523) ---------------------------------------------------------


def test_private_key_jwt_with_requests_oauth2client(tok_env: TokEnv) -> None:
    reg = tok_env.clients["pkjwt"]
    assert reg.key is not None
    oc = oauth_client(tok_env.token_url, auth=PrivateKeyJwt(reg.client.client_id, reg.key, alg="ES256"))
    tok = oc.client_credentials(scope="billing:read")
    claims = tok_env.decode(tok.access_token).claims
    assert claims["client_id"] == reg.client.client_id and claims["scope"] == "billing:read"


def test_private_key_jwt_replay_is_refused(tok_env: TokEnv) -> None:
    a = assertion(tok_env)
    first = tok_env.post("/oauth2/token", cc_form(tok_env, a))
    assert first.status_code == 200
    again = tok_env.post("/oauth2/token", cc_form(tok_env, a))
    assert again.status_code == 401 and again.json()["error"] == "invalid_client"
    assert tok_env.reason(again) == "oauth.client_auth.assertion_replay"


def _hs256(env: TokEnv) -> str:
    cid = env.clients["pkjwt"].client.client_id
    now = int(time.time())
    return str(jwskate.Jwt.sign({"iss": cid, "sub": cid, "aud": env.token_url, "exp": now + 60, "jti": "h"},
                                key=jwskate.SymmetricJwk.generate(key_size=256), alg="HS256"))


def _none(env: TokEnv) -> str:
    cid = env.clients["pkjwt"].client.client_id
    now = int(time.time())
    seg = BinaPy.serialize_to("json", {"alg": "none", "typ": "JWT"}).to("b64u").decode()
    body = BinaPy.serialize_to("json", {"iss": cid, "sub": cid, "aud": env.token_url, "exp": now + 60,
                                                "jti": "n"}).to("b64u").decode()
    return f"{seg}.{body}."


@pytest.mark.parametrize(("make", "reason"), [
    (lambda e: assertion(e, exp=int(time.time()) - 120), "assertion_expired"),
    (lambda e: assertion(e, exp=int(time.time()) + 3600), "assertion_lifetime"),
    (lambda e: assertion(e, exp=None), "assertion_no_exp"),
    (lambda e: assertion(e, aud="https://other-as.example/token"), "assertion_bad_aud"),
    (lambda e: assertion(e, aud=[e.token_url, "https://other-as.example"]), "assertion_bad_aud"),
    (lambda e: assertion(e, jti=None), "assertion_no_jti"),
    (lambda e: assertion(e, iss="someone-else"), "assertion_bad_iss"),
    (lambda e: assertion(e, iat=int(time.time()) + 100, exp=int(time.time()) + 160), "assertion_not_yet_valid"),
    (lambda e: assertion(e, key=private_jwk()), "assertion_bad_signature"),
    (lambda e: assertion(e, sub=e.clients["basic"].client.client_id,
                         iss=e.clients["basic"].client.client_id), "wrong_method"),
    (_hs256, "assertion_alg"),
    (_none, "assertion_alg"),
    (lambda e: "x" * 9000, "assertion_too_large"),
    (lambda e: "not.a.jwt", "assertion_malformed"),
])
def test_bad_assertions_are_refused(tok_env: TokEnv, make: Any, reason: str) -> None:
    r = tok_env.post("/oauth2/token", cc_form(tok_env, make(tok_env)))
    assert r.status_code == 401 and r.json()["error"] == "invalid_client", r.text
    assert tok_env.reason(r) == f"oauth.client_auth.{reason}"


def test_assertion_client_id_parameter_must_match(tok_env: TokEnv) -> None:
    r = tok_env.post("/oauth2/token", cc_form(tok_env, assertion(tok_env),
                                              client_id=tok_env.clients["basic"].client.client_id))
    assert r.status_code == 401 and tok_env.reason(r) == "oauth.client_auth.assertion_client_mismatch"


def test_assertion_for_the_issuer_audience_is_accepted(tok_env: TokEnv) -> None:
    r = tok_env.post("/oauth2/token", cc_form(tok_env, assertion(tok_env, aud=tok_env.issuer)))
    assert r.status_code == 200


# --- RFC 8705: tls_client_auth and self_signed_tls_client_auth ---------------------------


def test_tls_client_auth_binds_the_token_to_the_certificate(tok_env: TokEnv) -> None:
    cid = tok_env.clients["tls"].client.client_id
    cert, _key, der = tok_env.pki.clients["alice"]
    status, headers, body = tok_env.via_proxy("/oauth2/token", {"grant_type": "client_credentials", "client_id": cid},
                                              cert.read_bytes())
    assert status == 200, body
    claims = tok_env.decode(json.loads(body)["access_token"]).claims
    assert claims["cnf"] == {"x5t#S256": cert_thumbprint(der)}
    assert headers["cache-control"] == "no-store"


def test_tls_client_auth_refusals(tok_env: TokEnv) -> None:
    cid = tok_env.clients["tls"].client.client_id
    form = {"grant_type": "client_credentials", "client_id": cid}
    mallory = tok_env.pki.clients["mallory"][0].read_bytes()
    alice = tok_env.pki.clients["alice"][0].read_bytes()
    status, headers, _ = tok_env.via_proxy("/oauth2/token", form, mallory)
    assert status == 401
    ev = find_audit_event(tok_env.gateway, headers["x-request-id"])
    assert ev.reason == "oauth.client_auth.cert_mismatch"
    # A certificate header from anyone but the trusted proxy is ignored.
    status, headers, _ = tok_env.via_proxy("/oauth2/token", form, alice, source="127.0.0.1")
    assert status == 401
    assert find_audit_event(tok_env.gateway, headers["x-request-id"]).reason == "oauth.client_auth.cert_missing"


def test_self_signed_tls_client_auth(tok_env: TokEnv) -> None:
    pem, key = self_signed("device-7")
    jwk = ECKey.import_key(key.public_key()).as_dict()
    reg = register(tok_env, "self-signed", "self_signed_tls_client_auth", jwks=json.dumps({"keys": [jwk]}))
    form = {"grant_type": "client_credentials", "client_id": reg.client.client_id}
    status, _, body = tok_env.via_proxy("/oauth2/token", form, pem)
    assert status == 200, body
    other, _ = self_signed("device-7")  # same subject, another key
    status, headers, _ = tok_env.via_proxy("/oauth2/token", form, other)
    assert status == 401
    assert find_audit_event(tok_env.gateway, headers["x-request-id"]).reason == "oauth.client_auth.cert_mismatch"


# --- DPoP (RFC 9449) ---------------------------------------------------------------------


def test_dpop_bound_token(tok_env: TokEnv) -> None:
    oc = oauth_client(tok_env.token_url, auth=basic(tok_env))
    key = DPoPKey.generate(alg="ES256")
    tok = oc.client_credentials(dpop_key=key)
    assert tok.token_type == "DPoP"
    assert tok_env.decode(tok.access_token).claims["cnf"] == {"jkt": key.dpop_jkt}


def test_dpop_proof_refusals(tok_env: TokEnv) -> None:
    reg = tok_env.clients["basic"]
    auth = (reg.client.client_id, reg.secret or "")
    form = {"grant_type": "client_credentials"}
    key = DPoPKey.generate(alg="ES256")
    proof = str(key.proof("POST", tok_env.token_url))
    assert tok_env.post("/oauth2/token", form, auth=auth, headers={"DPoP": proof}).status_code == 200
    cases = {
        "dpop.replay": proof,
        "dpop.htu_mismatch": str(key.proof("POST", f"{tok_env.issuer}/oauth2/introspect")),
        "dpop.htm_mismatch": str(key.proof("GET", tok_env.token_url)),
        "dpop.malformed": "not-a-proof",
    }
    for reason, p in cases.items():
        r = tok_env.post("/oauth2/token", form, auth=auth, headers={"DPoP": p})
        assert r.status_code == 400 and r.json()["error"] == "invalid_dpop_proof", reason
        assert tok_env.reason(r) == f"oauth.{reason}"
    stale = DPoPKey.generate(alg="ES256", iat_generator=lambda: int(time.time()) - 3600)
    r = tok_env.post("/oauth2/token", form, auth=auth, headers={"DPoP": str(stale.proof("POST", tok_env.token_url))})
    assert r.status_code == 400 and tok_env.reason(r) == "oauth.dpop.stale"


def test_two_dpop_headers_are_refused(tok_env: TokEnv) -> None:
    """RFC 9449 §4.3 point 1: exactly one DPoP header, even when each proof is valid."""
    reg = tok_env.clients["basic"]
    key = DPoPKey.generate(alg="ES256")
    body = b"grant_type=client_credentials"
    conn = http.client.HTTPConnection("127.0.0.1", tok_env.port, timeout=10)
    try:
        conn.putrequest("POST", "/oauth2/token")
        conn.putheader("Content-Type", "application/x-www-form-urlencoded")
        conn.putheader("Content-Length", str(len(body)))
        conn.putheader("Authorization", requests.auth._basic_auth_str(reg.client.client_id, reg.secret or ""))
        conn.putheader("DPoP", str(key.proof("POST", tok_env.token_url)))
        conn.putheader("DPoP", str(key.proof("POST", tok_env.token_url)))
        conn.endheaders(body)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 400 and doc["error"] == "invalid_dpop_proof"
    assert find_audit_event(tok_env.gateway, resp.headers["x-request-id"]).reason == "oauth.dpop.multiple"


def test_client_that_must_use_dpop(tok_env: TokEnv) -> None:
    oc = oauth_client(tok_env.token_url, auth=basic(tok_env, "dpop-only"))
    r = tok_env.post("/oauth2/token", {"grant_type": "client_credentials"},
                     auth=(tok_env.clients["dpop-only"].client.client_id, tok_env.clients["dpop-only"].secret or ""))
    assert r.status_code == 400 and r.json()["error"] == "invalid_request"
    assert tok_env.reason(r) == "oauth.dpop.required"
    assert oc.client_credentials(dpop=True).token_type == "DPoP"


@pytest.fixture(scope="module")
def nonce_env(upstream: UpstreamThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokEnv]:
    with oauth_storage() as storage:
        env = start_env(upstream, tmp_path_factory.mktemp("nonce"), storage=storage, dpop_nonce_required=True)
        try:
            register(env, "basic", "client_secret_basic")
            yield env
        finally:
            env.gateway.stop()


def test_dpop_nonce_challenge(nonce_env: TokEnv) -> None:
    reg = nonce_env.clients["basic"]
    key = DPoPKey.generate(alg="ES256")
    auth = (reg.client.client_id, reg.secret or "")
    r = nonce_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=auth,
                       headers={"DPoP": str(key.proof("POST", nonce_env.token_url))})
    assert r.status_code == 400 and r.json()["error"] == "use_dpop_nonce"
    assert r.headers["dpop-nonce"]
    forged = str(key.proof("POST", nonce_env.token_url, nonce="A" * 32))
    r = nonce_env.post("/oauth2/token", {"grant_type": "client_credentials"}, auth=auth,
                       headers={"DPoP": forged})
    assert r.status_code == 400 and r.json()["error"] == "use_dpop_nonce"
    # requests-oauth2client retries with the nonce it was given (RFC 9449 §8).
    tok = oauth_client(nonce_env.token_url, auth=basic(nonce_env)).client_credentials(dpop_key=key)
    assert tok.token_type == "DPoP"


# --- discovery and JWKS ------------------------------------------------------------------


def test_discovery_documents(tok_env: TokEnv) -> None:
    docs = [requests.get(f"{tok_env.issuer}/.well-known/{name}", timeout=10)
            for name in ("openid-configuration", "oauth-authorization-server")]
    assert docs[0].json() == docs[1].json()
    doc = docs[0].json()
    iss = tok_env.issuer
    assert doc["issuer"] == iss
    assert doc["token_endpoint"] == f"{iss}/oauth2/token" and doc["jwks_uri"] == f"{iss}/oauth2/jwks"
    assert doc["introspection_endpoint"] == f"{iss}/oauth2/introspect"
    assert doc["revocation_endpoint"] == f"{iss}/oauth2/revoke"
    assert {"client_secret_basic", "client_secret_post", "private_key_jwt", "tls_client_auth",
            "self_signed_tls_client_auth"} <= set(doc["token_endpoint_auth_methods_supported"])
    assert "client_credentials" in doc["grant_types_supported"]
    assert not {"implicit", "password"} & set(doc["grant_types_supported"])
    assert doc["tls_client_certificate_bound_access_tokens"] is True
    assert "ES256" in doc["dpop_signing_alg_values_supported"]
    assert "none" not in doc["token_endpoint_auth_signing_alg_values_supported"]


def test_jwks_publishes_public_keys_only(tok_env: TokEnv) -> None:
    r = requests.get(f"{tok_env.issuer}/oauth2/jwks", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"] == "application/jwk-set+json"
    keys = r.json()["keys"]
    assert keys and all("d" not in k and k["use"] == "sig" and k["alg"] == "ES256" for k in keys)
