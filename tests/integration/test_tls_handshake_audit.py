"""Failed TLS handshakes are audited with the client's address: plain HTTP on the TLS
port, no or a foreign client certificate where one is required, an old protocol
version, a handshake that stalls. A TCP probe that closes without a byte is not."""

from __future__ import annotations

import logging
import socket
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from portcullis.audit.events import AuditEvent
from portcullis.gateway import open_audit_store
from tests.integration.harness import GatewayThread, free_port, write_config
from tests.integration.test_mtls import Pki, _name, make_cert, write_pki


@dataclass
class Env:
    pki: Pki
    port: int
    gw: GatewayThread
    foreign: tuple[Path, Path]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    d = tmp_path_factory.mktemp("tlsaudit")
    pki = write_pki(d)
    # A client certificate from a CA the gateway does not trust.
    other_ca = ec.generate_private_key(ec.SECP256R1())
    cert, key = make_cert("eve", other_ca, _name("Other CA"))
    foreign = (d / "eve.pem", d / "eve.key")
    foreign[0].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    foreign[1].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    port = free_port()
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key), "client_ca_file": str(pki.ca_file),
           "client_certificates": "required", "handshake_timeout_seconds": 0.5}
    doc = {"data_dir": ".", "server": {"listen": {"port": port}, "metrics": None, "tls": tls},
           "upstreams": {"app": {"url": "http://127.0.0.1:9"}},
           "routes": [{"name": "health", "path": "/v1/health", "methods": ["GET"], "upstream": "app",
                       "public": True}]}
    gw = GatewayThread(write_config(d / "gw", doc))
    gw.start()
    yield Env(pki, port, gw, foreign)
    gw.stop()


def events(env: Env) -> list[AuditEvent]:
    assert env.gw.gw.writer.flush(10.0)
    store = open_audit_store(env.gw.loaded.data_dir, writable=False)
    try:
        return list(store.iter_events(after_seq=0))
    finally:
        store.close()


def new_events(env: Env, before: int, want: int = 1, timeout: float = 5.0) -> list[AuditEvent]:
    deadline = time.monotonic() + timeout
    while True:
        got = events(env)[before:]
        if len(got) >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def tls_client(env: Env, cert: tuple[Path, Path] | None = None, **opts: object) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(env.pki.ca_file))
    for k, v in opts.items():
        setattr(ctx, k, v)
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def exchange(env: Env, ctx: ssl.SSLContext) -> bytes:
    """Handshake, one request, the answer (b"" or the error's name if the server refused)."""
    try:
        with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s, \
                ctx.wrap_socket(s, server_hostname="127.0.0.1") as t:
            t.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := t.recv(65536):
                data += chunk
            return data
    except (ssl.SSLError, ConnectionError) as exc:
        return type(exc).__name__.encode()


def only_tls_refusal(got: list[AuditEvent], reason: str) -> AuditEvent:
    assert len(got) == 1, got
    ev = got[0]
    assert (ev.reason, ev.decision, ev.status, ev.client_ip) == (reason, "deny", 0, "127.0.0.1")
    assert ev.method == "" and ev.path == ""
    return ev


def test_a_client_with_a_trusted_certificate_is_served(env: Env) -> None:
    alice = env.pki.clients["alice"]
    before = len(events(env))
    answer = exchange(env, tls_client(env, (alice[0], alice[1])))
    assert answer.startswith(b"HTTP/1.1 "), answer
    got = new_events(env, before)
    assert [e.reason for e in got] != [] and all(not e.reason.startswith("tls.") for e in got)


def test_plain_http_on_the_tls_port(env: Env) -> None:
    before = len(events(env))
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: gw\r\n\r\n")
        s.recv(100)
    ev = only_tls_refusal(new_events(env, before), "tls.handshake_failed")
    assert ev.extra["tls"]["error"] == "HTTP_REQUEST"


def test_no_client_certificate_where_one_is_required(env: Env) -> None:
    before = len(events(env))
    exchange(env, tls_client(env))
    ev = only_tls_refusal(new_events(env, before), "tls.handshake_failed")
    assert ev.extra["tls"]["error"] == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_a_certificate_from_an_untrusted_ca(env: Env) -> None:
    before = len(events(env))
    exchange(env, tls_client(env, env.foreign))
    ev = only_tls_refusal(new_events(env, before), "tls.handshake_failed")
    assert ev.extra["tls"]["error"] == "CERTIFICATE_VERIFY_FAILED"


def test_an_old_protocol_version(env: Env) -> None:
    before = len(events(env))
    with warnings.catch_warnings():  # Python warns that TLS 1.0/1.1 are deprecated: that is the point
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = tls_client(env, minimum_version=ssl.TLSVersion.TLSv1, maximum_version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("ALL:@SECLEVEL=0")  # let the client offer it, so the server is the one refusing
    exchange(env, ctx)
    ev = only_tls_refusal(new_events(env, before), "tls.handshake_failed")
    assert ev.extra["tls"]["error"] == "UNSUPPORTED_PROTOCOL"


def test_a_stalled_handshake_times_out(env: Env) -> None:
    before = len(events(env))
    with socket.create_connection(("127.0.0.1", env.port), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x00\xa0\x01")  # the start of a ClientHello, then nothing
        t0 = time.monotonic()
        assert s.recv(100) == b""  # closed by the gateway
        assert time.monotonic() - t0 < 4.0
    only_tls_refusal(new_events(env, before), "tls.handshake_timeout")


def test_a_tcp_probe_that_sends_nothing_is_not_audited(env: Env) -> None:
    before = len(events(env))
    for _ in range(3):
        socket.create_connection(("127.0.0.1", env.port), timeout=5).close()
    time.sleep(0.3)
    assert new_events(env, before, want=1, timeout=0.5) == []
    # and the listener is still fine
    alice = env.pki.clients["alice"]
    assert exchange(env, tls_client(env, (alice[0], alice[1]))).startswith(b"HTTP/1.1 ")


def test_the_start_up_line_names_https(env: Env, tmp_path: Path) -> None:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("uvicorn.error")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        port = free_port()
        tls = {"cert_file": str(env.pki.server_cert), "key_file": str(env.pki.server_key)}
        doc = {"data_dir": ".", "server": {"listen": {"port": port}, "metrics": None, "tls": tls},
               "upstreams": {"app": {"url": "http://127.0.0.1:9"}},
               "routes": [{"name": "health", "path": "/v1/health", "methods": ["GET"], "upstream": "app",
                           "public": True}]}
        gw = GatewayThread(write_config(tmp_path, doc))
        gw.start()
        gw.stop()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [r.getMessage() for r in records if "running on" in r.getMessage()]
    assert lines == [f"Uvicorn running on https://127.0.0.1:{port} (Press CTRL+C to quit)"], lines
