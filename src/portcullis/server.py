"""Runs a gateway under uvicorn (uvloop + httptools; see docs/architecture.md for why).

SIGTERM or SIGINT: uvicorn stops accepting, lets in-flight requests finish within
`server.shutdown_grace_seconds`, then the lifespan shutdown flushes the audit writer;
the process exits 0.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import functools
import gc
import importlib.util
import logging
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any

import uvicorn
from prometheus_client import start_http_server
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from portcullis.app import GatewayApp
from portcullis.config import LoadedConfig
from portcullis.gateway import Gateway, build_gateway
from portcullis.policy.engine import PolicyError
from portcullis.problems import PROBLEM_CONTENT_TYPE
from portcullis.tls import server_context, tls_extension

log = logging.getLogger("portcullis.server")


def _loop() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    """The TLS protocol the loop itself runs for `create_server(ssl=...)`: uvloop's own
    under uvloop, asyncio's otherwise (the same code, so the same speed). Looked up per
    connection: a microsecond beside a TLS handshake."""
    try:
        import uvloop
        import uvloop.loop as uvloop_loop

        cls = getattr(uvloop_loop, "SSLProtocol", None)  # not in uvloop's stubs
        if cls is not None and isinstance(loop, uvloop.Loop):
            return cls
    except ImportError:  # pragma: no cover - uvloop is a dependency
        pass
    return asyncio.sslproto.SSLProtocol


def _handshake_done(app: GatewayApp, peer: str, fut: asyncio.Future[Any]) -> None:
    """Audit a failed TLS handshake: an OpenSSL error (`tls.handshake_failed`, its reason:
    `HTTP_REQUEST` for plain HTTP, `UNSUPPORTED_PROTOCOL`, `PEER_DID_NOT_RETURN_A_CERTIFICATE`,
    `TLSV1_ALERT_UNKNOWN_CA`...) or the handshake timeout (`tls.handshake_timeout`). A peer
    that closes before finishing the handshake (a load balancer's TCP probe) did nothing
    and is not audited."""
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is None:
        return
    if isinstance(exc, ssl.SSLError):
        app.refuse_tls(peer, "tls.handshake_failed", str(exc.reason or type(exc).__name__))
    elif isinstance(exc, ConnectionAbortedError):  # sslproto's handshake timeout
        app.refuse_tls(peer, "tls.handshake_timeout", "handshake timeout")
    else:
        log.debug("TLS connection from %s closed before the handshake: %s", peer, type(exc).__name__)


def audited_http_protocol(app: GatewayApp, rid_header: bytes, tls: ssl.SSLContext | None = None,
                          handshake_timeout: float = 10.0) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, but a request its parser refuses gets an audited
    RFC 9457 problem instead of uvicorn's plain-text 400. With ``tls``, the protocol
    terminates TLS itself (uvicorn is given no SSL context), so that a failed handshake is
    seen with the client's address and audited (`_handshake_done`)."""

    class PortcullisHttpProtocol(HttpToolsProtocol):
        _tls: dict[str, Any] | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._tls = tls_extension(transport)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._tls is not None:
                # The ASGI TLS extension: the client certificate for RFC 8705 binding checks.
                self.scope["extensions"] = {"tls": self._tls}  # type: ignore[dict-item]

        def send_400_response(self, msg: str) -> None:
            peer = self.client[0] if self.client else "0.0.0.0"  # noqa: S104 - an address, not a bind
            rid, body = app.refuse_malformed(peer)
            self.transport.write(b"".join((
                b"HTTP/1.1 400 Bad Request\r\ncontent-type: ", PROBLEM_CONTENT_TYPE,
                b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n", rid_header, b": ", rid.encode(),
                b"\r\ncache-control: no-store\r\nconnection: close\r\n\r\n", body,
            )))
            self.transport.close()

    if tls is None:
        return PortcullisHttpProtocol

    class PortcullisTlsProtocol(PortcullisHttpProtocol):
        _tls_started = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if self._tls_started:  # the second call: the handshake is done, HTTP starts
                super().connection_made(transport)
                return
            # The first call, with the TCP transport: put the loop's TLS protocol between
            # it and this one, now, before any byte is read (what create_server(ssl=...)
            # does, plus a waiter that reports how the handshake ended).
            self._tls_started = True
            peer = transport.get_extra_info("peername")
            waiter = self.loop.create_future()
            sslp = _ssl_protocol_class(self.loop)(self.loop, self, tls, waiter, server_side=True,
                                                 ssl_handshake_timeout=handshake_timeout)
            transport.set_protocol(sslp)
            sslp.connection_made(transport)
            waiter.add_done_callback(functools.partial(
                _handshake_done, app, str(peer[0]) if isinstance(peer, tuple) and peer else "0.0.0.0"))  # noqa: S104

    return PortcullisTlsProtocol


def make_server(gw: Gateway, loaded: LoadedConfig, host: str | None = None, port: int | None = None) -> uvicorn.Server:
    """A uvicorn server for `gw`: our own proxy-header handling (never uvicorn's), no access log."""
    srv = loaded.config.server
    tls = srv.tls.resolve(loaded.path.parent if loaded.path else None) if srv.tls else None
    ctx = server_context(tls) if tls else None  # built here: a bad file is a clear error, not a traceback
    config = uvicorn.Config(
        gw.app,
        host=host or srv.listen.host,
        port=srv.listen.port if port is None else port,
        loop=_loop(),
        http=audited_http_protocol(gw.app, gw.app.request_id_header, ctx,
                                   tls.handshake_timeout_seconds if tls else 10.0),
        lifespan="on",
        access_log=False,
        log_config=None,
        proxy_headers=False,  # X-Forwarded-For is honoured only via normalize's trusted proxies
        server_header=False,
        timeout_graceful_shutdown=srv.shutdown_grace_seconds,
        timeout_keep_alive=srv.keep_alive_seconds,
        ws="none",
    )
    if gw.decision_app is not None:
        _attach_decision_listener(gw, loaded, srv.listen.port if port is None else port)
    server = _Server(config)
    server.tls = ctx is not None
    return server


class _Server(uvicorn.Server):
    """uvicorn's server, whose start-up line names the scheme the listener speaks: TLS is
    terminated in the protocol (`audited_http_protocol`), so uvicorn itself would say
    http."""

    tls = False

    def _log_started_message(self, listeners: Sequence[socket.SocketType]) -> None:
        if not self.tls or self.config.fd is not None or self.config.uds is not None:
            super()._log_started_message(listeners)
            return
        host = self.config.host
        port = self.config.port or listeners[0].getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info("Uvicorn running on https://%s:%d (Press CTRL+C to quit)",
                                                shown, port)


def _attach_decision_listener(gw: Gateway, loaded: LoadedConfig, public_port: int) -> None:
    """Serve the forward-auth decision app on its own listener, in the main server's loop.

    Its socket is bound here (a bad address is a clear error before anything starts); it
    starts at the end of the gateway's start-up and stops — in-flight decisions finished —
    before the gateway's stores close: one process, one lifecycle.
    """
    fa = loaded.config.forward_auth
    app = gw.decision_app
    assert fa is not None
    assert app is not None
    if fa.listen.port != 0 and fa.listen.port == public_port:
        raise ValueError("forward_auth.listen.port: the decision listener must not share the public port")
    family = socket.AF_INET6 if ":" in fa.listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((fa.listen.host, fa.listen.port))
    except OSError as exc:
        sock.close()
        where = f"{fa.listen.host}:{fa.listen.port}"
        raise ValueError(f"forward_auth.listen: cannot bind {where} ({exc.strerror})") from None
    sock.setblocking(False)
    srv = loaded.config.server
    server = uvicorn.Server(uvicorn.Config(
        app, host=fa.listen.host, port=sock.getsockname()[1], loop=_loop(),
        http=audited_http_protocol(app, app.request_id_header), lifespan="off", access_log=False,
        log_config=None, proxy_headers=False, server_header=False,
        timeout_graceful_shutdown=srv.shutdown_grace_seconds, timeout_keep_alive=srv.keep_alive_seconds, ws="none",
    ))
    ticking: list[asyncio.Task[None]] = []

    async def start() -> None:
        server.config.load()
        server.lifespan = server.config.lifespan_class(server.config)
        await server.startup(sockets=[sock])
        ticking.append(asyncio.get_running_loop().create_task(server.main_loop()))
        log.info("forward-auth decisions on %s:%d", fa.listen.host, sock.getsockname()[1])

    async def stop() -> None:
        if not server.started:
            sock.close()
            return
        server.should_exit = True
        for task in ticking:
            await task
        await server.shutdown(sockets=[sock])

    gw.app.startup_hooks.append(start)
    gw.app.shutdown_hooks.insert(0, stop)


def start_metrics(gw: Gateway, loaded: LoadedConfig) -> Callable[[], None]:
    """Serve /metrics on the separate loopback listener; returns a stop function."""
    m = loaded.config.server.metrics
    if m is None:
        return lambda: None
    gw.metrics.audit_backlog.set_function(lambda: gw.writer.backlog)
    gw.metrics.audit_durable.set_function(lambda: gw.writer.durable_count)
    httpd, thread = start_http_server(m.port, addr=m.host, registry=gw.metrics.registry)

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)

    return stop


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A listening socket with SO_REUSEPORT: several worker processes bind the same address
    and the kernel spreads connections over them (`serve --workers`)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ValueError(f"server.listen: cannot bind {host}:{port} ({exc.strerror})") from None
    sock.setblocking(False)
    return sock


async def freeze_startup_heap() -> None:
    """Move everything built so far (modules, config, stages, policy state: ~120,000
    objects) into the garbage collector's permanent generation, so that the full
    collections a busy gateway triggers every few seconds scan only what was made since.
    Measured on the decision endpoint: a full collection paused the event loop 40-70 ms
    (p99 at load 42-59 ms), with the heap frozen under 2 ms (p99 17-18 ms); see
    docs/benchmarks.md. Refcounting still frees frozen objects; only a reference cycle
    among them is kept for the life of the process. The last start-up hook of `serve`."""
    gc.collect()
    gc.freeze()


def serve(loaded: LoadedConfig, host: str | None = None, port: int | None = None, *,
          reuse_port: bool = False, worker_index: int = 0) -> int:
    """Run until SIGTERM/SIGINT; the exit status for the CLI. As worker `worker_index` of
    `serve --workers` (`reuse_port`), the public socket is shared and the metrics listener
    moves to `metrics.port + worker_index`."""
    if worker_index:
        m = loaded.config.server.metrics
        if m is not None and m.port:
            server_cfg = loaded.config.server.model_copy(
                update={"metrics": m.model_copy(update={"port": m.port + worker_index})})
            loaded = LoadedConfig(loaded.config.model_copy(update={"server": server_cfg}), loaded.path)
    try:
        gw = build_gateway(loaded)
    except PolicyError as exc:
        for problem in exc.problems:
            log.error("cannot start: policy: %s", problem)
        return 1
    try:
        server = make_server(gw, loaded, host, port)
    except ValueError as exc:
        log.error("cannot start: %s", exc)
        return 1
    gw.app.startup_hooks.append(freeze_startup_heap)
    stop_metrics = start_metrics(gw, loaded)
    received: list[int] = []
    if threading.current_thread() is threading.main_thread():
        # uvicorn captures SIGTERM/SIGINT for its graceful shutdown and, once done,
        # re-raises them to the handlers it found. These record the signal instead of
        # killing the process, so a clean shutdown exits 0 as operators expect.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, _frame: received.append(signum))
    sockets = None
    if reuse_port:
        listen = loaded.config.server.listen
        try:
            sockets = [reuse_port_socket(host or listen.host, listen.port if port is None else port)]
        except ValueError as exc:
            stop_metrics()
            log.error("cannot start: %s", exc)
            return 1
    try:
        server.run(sockets=sockets)
    finally:
        stop_metrics()
    if not server.started:
        log.error("the gateway did not start")
        return 1
    log.info("stopped cleanly")
    return 0
