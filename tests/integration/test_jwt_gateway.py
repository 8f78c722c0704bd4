"""JWT access tokens through the real gateway, from a real (local) OIDC issuer found by
discovery; and `portcullis demo --trust-issuer` as DEMO.md describes it."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from portcullis.demo.run import demo_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.keysadmin import create_key
from tests.integration.harness import Client, GatewayThread, find_audit_event, free_port, write_config
from tests.integration.issuer import IssuerApp
from tests.integration.test_demo import keys_by_name, start_demo, stop, wait_ready


@dataclass
class JwtEnv:
    port: int
    issuer: IssuerApp
    audience: str
    api_key: str
    gateway: GatewayThread
    data_dir: Path

    def bearer(self, token: str) -> Client:
        return Client(self.port, {"Authorization": f"Bearer {token}"})


@pytest.fixture(scope="module")
def issuer_thread() -> Iterator[tuple[UpstreamThread, IssuerApp]]:
    app = IssuerApp()
    t = UpstreamThread(app)
    app.issuer = t.url
    t.start()
    yield t, app
    t.stop()


@pytest.fixture(scope="module")
def jenv(upstream: UpstreamThread, issuer_thread: tuple[UpstreamThread, IssuerApp],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[JwtEnv]:
    _, app = issuer_thread
    port = free_port()
    doc = demo_config(upstream.url, port, free_port(), trust_issuer=app.issuer)
    data_dir = tmp_path_factory.mktemp("jwt")
    loaded = write_config(data_dir, doc)
    _, key = create_key(loaded.data_dir, name="reader", tenant="acme", scopes=["projects:read"], roles=[])
    gw = GatewayThread(loaded)
    gw.start()
    yield JwtEnv(port, app, f"http://127.0.0.1:{port}", key, gw, loaded.data_dir)
    gw.stop()


def audited_reason(env: JwtEnv, rid: str) -> str:
    return find_audit_event(env.gateway, rid).reason


def test_valid_token_reaches_the_upstream_with_its_principal(jenv: JwtEnv) -> None:
    r = jenv.bearer(jenv.issuer.mint(jenv.audience)).request("GET", "/v1/tenants/acme/projects")
    assert r.status == 200, r.body
    ev = find_audit_event(jenv.gateway, r.headers["x-request-id"])
    assert (ev.subject, ev.tenant, ev.credential_kind) == ("user-1", "acme", "jwt")


def test_scp_array_and_tenant_binding(jenv: JwtEnv) -> None:
    token = jenv.issuer.mint(jenv.audience, scope=None, scp=["projects:read"])
    assert jenv.bearer(token).request("GET", "/v1/tenants/acme/projects").status == 200
    assert jenv.bearer(token).request("GET", "/v1/tenants/globex/projects").status == 403
    assert jenv.bearer(token).request("GET", "/v1/tenants/acme/invoices").status == 403  # no billing:read


@pytest.mark.parametrize(("claims", "reason"), [
    ({"exp": int(time.time()) - 120}, "jwt.expired"),
    ({"aud": "https://elsewhere.example"}, "jwt.bad_audience"),
    ({"nonce": "abc"}, "jwt.id_token"),
    ({"cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}, "auth.dpop_required"),
    ({"cnf": {"x5t#S256": "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"}}, "auth.cert_required"),
    ({"tenant": None}, "jwt.missing_tenant"),
])
def test_refused_tokens_are_401_problems_with_audit_reasons(jenv: JwtEnv, claims: dict[str, object],
                                                            reason: str) -> None:
    r = jenv.bearer(jenv.issuer.mint(jenv.audience, **claims)).request("GET", "/v1/tenants/acme/projects")
    assert r.status == 401
    assert r.json()["type"].endswith("/invalid-credential")
    assert r.headers["www-authenticate"].startswith('Bearer realm="portcullis", error="invalid_token"')
    assert audited_reason(jenv, r.headers["x-request-id"]) == reason


def test_a_forged_token_is_refused(jenv: JwtEnv) -> None:
    token = jenv.issuer.mint(jenv.audience)
    head, body, sig = token.split(".")
    forged = ".".join([head, body[:-2] + ("AA" if body[-2:] != "AA" else "BB"), sig])
    r = jenv.bearer(forged).request("GET", "/v1/tenants/acme/projects")
    assert r.status == 401


def test_api_keys_still_work_beside_jwt(jenv: JwtEnv) -> None:
    assert jenv.bearer(jenv.api_key).request("GET", "/v1/tenants/acme/projects").status == 200


def test_demo_trust_issuer(tmp_path: Path, issuer_thread: tuple[UpstreamThread, IssuerApp]) -> None:
    _, app = issuer_thread
    port = free_port()
    proc = start_demo("--port", str(port), "--data-dir", str(tmp_path / "d"), "--trust-issuer", app.issuer,
                      "--tenant-claim", "org")
    try:
        wait_ready(proc, port)
        creds = json.loads((tmp_path / "d" / "credentials.json").read_text())
        assert creds["audience"] == f"http://127.0.0.1:{port}"
        token = app.mint(creds["audience"], org="globex", tenant=None)
        c = Client(port, {"Authorization": f"Bearer {token}"})
        assert c.request("GET", "/v1/tenants/globex/projects").status == 200
        assert c.request("GET", "/v1/tenants/acme/projects").status == 403
        key = keys_by_name(creds)["acme-reader"]["key"]
        assert Client(port, {"X-API-Key": key}).request("GET", "/v1/tenants/acme/projects").status == 200
    finally:
        assert stop(proc)[0] == 0


@pytest.mark.parametrize(("kind", "claims", "value"), [
    ("jti", {"jti": "to-revoke-1"}, "to-revoke-1"),
    ("sub", {"sub": "mallory"}, "mallory"),
    ("client", {"client_id": "leaky-app"}, "leaky-app"),
])
def test_revocation_is_honoured_within_a_second(jenv: JwtEnv, kind: str, claims: dict[str, str],
                                                value: str) -> None:
    from portcullis.keysadmin import revoke_tokens

    c = jenv.bearer(jenv.issuer.mint(jenv.audience, **claims))
    assert c.request("GET", "/v1/tenants/acme/projects").status == 200  # verified and now cached
    assert revoke_tokens(jenv.data_dir, kind, value, reason="test")  # type: ignore[arg-type]
    revoked_at = time.monotonic()
    while True:
        r = c.request("GET", "/v1/tenants/acme/projects")
        if r.status == 401:
            break
        assert time.monotonic() - revoked_at < 1.0, "still accepted a second after revocation"
        time.sleep(0.02)
    assert audited_reason(jenv, r.headers["x-request-id"]).startswith("jwt.revoked_")


def test_route_audience_and_authentication_context(jenv: JwtEnv, tmp_path: Path) -> None:
    """A route may demand its own audience; acr/amr reach the principal (for step-up later)."""
    from portcullis.credentials.jwt import JwtConfig, JwtIssuerConfig, JwtVerifier

    token = jenv.issuer.mint(jenv.audience, acr="urn:mfa", amr=["pwd", "otp"], aud=[jenv.audience, "billing"])
    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=jenv.issuer.issuer, discovery=True, audience=jenv.audience)])
    p = asyncio.run(JwtVerifier(cfg).verify(token.encode()))
    assert p.audiences == frozenset({jenv.audience, "billing"})
    assert (p.acr, p.amr) == ("urn:mfa", ("pwd", "otp"))
