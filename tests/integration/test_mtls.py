"""Mutual TLS (RFC 8705) end to end: TLS termination with client certificates, tokens
bound to a certificate (`cnf.x5t#S256`), HSTS, refusal of weak TLS, and the same binding
behind a TLS-terminating proxy that forwards the certificate."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import socket
import ssl
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from portcullis.config import ConfigError, parse_config
from portcullis.demo.upstream import UpstreamThread
from portcullis.tls import cert_thumbprint
from tests.integration.echo import EchoApp
from tests.integration.harness import GatewayThread, find_audit_event, free_port, write_config
from tests.integration.issuer import IssuerApp


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_cert(cn: str, issuer_key: Any, issuer_name: x509.Name, *,
              server: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(issuer_name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256()), key


@dataclass
class Pki:
    dir: Path
    ca_file: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path, bytes]]  # name -> (cert, key, DER)


def write_pki(d: Path) -> Pki:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("Test CA")).issuer_name(_name("Test CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))

    def dump(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
        c, k = d / f"{name}.pem", d / f"{name}.key"
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
        return c, k

    ca_file = d / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    srv, srv_key = make_cert("127.0.0.1", ca_key, ca_cert.subject, server=True)
    server_cert, server_key = dump("server", srv, srv_key)
    clients = {}
    for name in ("alice", "mallory"):
        cert, key = make_cert(name, ca_key, ca_cert.subject)
        c, k = dump(name, cert, key)
        clients[name] = (c, k, cert.public_bytes(serialization.Encoding.DER))
    return Pki(d, ca_file, server_cert, server_key, clients)


@dataclass
class Env:
    pki: Pki
    tls_port: int
    plain_port: int
    issuer: IssuerApp
    audience: str
    tls_gw: GatewayThread
    plain_gw: GatewayThread


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("mtls")
    pki = write_pki(d)
    echo = UpstreamThread(EchoApp())
    echo.start()
    app = IssuerApp()
    issuer = UpstreamThread(app)
    app.issuer = issuer.url
    issuer.start()
    tls_port, plain_port = free_port(), free_port()
    audience = "https://api.example"

    def doc(port: int, **server: Any) -> dict[str, Any]:
        return {
            "data_dir": ".",
            "server": {"listen": {"port": port}, "metrics": None, **server},
            "normalize": {"trusted_proxies": ["127.0.0.2"], "client_cert_header": "x-client-cert"},
            "jwt": {"issuers": [{"issuer": app.issuer, "discovery": True, "audience": audience}]},
            "upstreams": {"echo": {"url": echo.url}},
            "routes": [{"name": "echo", "path": "/echo/{x}", "methods": ["GET"], "upstream": "echo",
                        "auth": ["jwt"], "scopes": ["projects:read"]}],
        }

    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "client_ca_file": str(pki.ca_file),
           "client_certificates": "optional"}
    tls_gw = GatewayThread(write_config(d / "tls", doc(tls_port, tls=tls)))
    plain_gw = GatewayThread(write_config(d / "plain", doc(plain_port)))
    tls_gw.start()
    plain_gw.start()
    yield Env(pki, tls_port, plain_port, app, audience, tls_gw, plain_gw)
    tls_gw.stop()
    plain_gw.stop()
    issuer.stop()
    echo.stop()


def https(env: Env, token: str, client: str | None = None, **ctx_opts: Any) -> tuple[int, dict[str, str], bytes]:
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_file))
    for k, v in ctx_opts.items():
        setattr(ctx, k, v)
    if client is not None:
        cert, key, _ = env.pki.clients[client]
        ctx.load_cert_chain(str(cert), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", env.tls_port, context=ctx, timeout=10)
    try:
        conn.request("GET", "/echo/a", headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def bound_token(env: Env, client: str) -> str:
    return env.issuer.mint(env.audience, cnf={"x5t#S256": cert_thumbprint(env.pki.clients[client][2])})


def test_certificate_bound_token_with_its_certificate(env: Env) -> None:
    status, headers, _ = https(env, bound_token(env, "alice"), "alice")
    assert status == 200
    assert headers["strict-transport-security"] == "max-age=31536000"


def test_certificate_bound_token_with_another_certificate(env: Env) -> None:
    status, headers, _ = https(env, bound_token(env, "alice"), "mallory")
    assert status == 401
    assert find_audit_event(env.tls_gw, headers["x-request-id"]).reason == "auth.cert_mismatch"


def test_certificate_bound_token_without_a_certificate(env: Env) -> None:
    status, headers, _ = https(env, bound_token(env, "alice"))
    assert status == 401
    assert find_audit_event(env.tls_gw, headers["x-request-id"]).reason == "auth.cert_required"


def test_plain_bearer_token_over_tls(env: Env) -> None:
    assert https(env, env.issuer.mint(env.audience), "mallory")[0] == 200


def test_weak_tls_is_refused(env: Env) -> None:
    with warnings.catch_warnings():  # Python warns that TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https(env, "x", maximum_version=ssl.TLSVersion.TLSv1_1, minimum_version=ssl.TLSVersion.TLSv1)
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_file))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA")  # CBC only: no AEAD
    with pytest.raises((ssl.SSLError, ConnectionError)), socket.create_connection(("127.0.0.1", env.tls_port)) as s:
        ctx.wrap_socket(s, server_hostname="127.0.0.1")


def proxied(env: Env, token: str, cert_pem: bytes | None, source: str) -> tuple[int, dict[str, str], bytes]:
    """A request as a TLS-terminating proxy at `source` would forward it."""
    headers = {"Authorization": f"Bearer {token}"}
    if cert_pem is not None:
        headers["X-Client-Cert"] = quote(cert_pem.decode(), safe="")
    with socket.create_connection(("127.0.0.1", env.plain_port), source_address=(source, 0)) as s:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        s.sendall(f"GET /echo/a HTTP/1.1\r\nHost: gw\r\n{head}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head_raw, _, body = data.partition(b"\r\n\r\n")
    lines = head_raw.decode().split("\r\n")
    status = int(lines[0].split()[1])
    return status, {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}, body


def test_binding_behind_a_trusted_tls_proxy(env: Env) -> None:
    pem = env.pki.clients["alice"][0].read_bytes()
    status, _, body = proxied(env, bound_token(env, "alice"), pem, "127.0.0.2")
    assert status == 200
    forwarded = {k for k, _ in json.loads(body)["headers"]}
    assert "x-client-cert" not in forwarded  # the gateway's business only


def test_certificate_header_from_an_untrusted_peer_is_ignored(env: Env) -> None:
    pem = env.pki.clients["alice"][0].read_bytes()
    status, headers, _ = proxied(env, bound_token(env, "alice"), pem, "127.0.0.1")
    assert status == 401
    assert find_audit_event(env.plain_gw, headers["x-request-id"]).reason == "auth.cert_required"


def test_check_refuses_weak_or_incomplete_tls_settings() -> None:
    base = """
upstreams: {api: {url: "http://127.0.0.1:1"}}
routes: [{name: r, path: /r, methods: [GET], upstream: api, public: true}]
"""
    for tls, message in (
        ("{cert_file: c, key_file: k, min_version: '1.1'}", "server.tls.min_version"),
        ("{cert_file: c, key_file: k, client_certificates: required}", "needs client_ca_file"),
        ("{cert_file: c, key_file: k, ciphers: 'RC4'}", "unknown key"),
    ):
        with pytest.raises(ConfigError) as info:
            parse_config(base + f"server: {{tls: {tls}}}\n")
        assert any(message in e for e in info.value.errors), info.value.errors
