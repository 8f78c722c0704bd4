"""The gateway's ASGI application: runs the pipeline for every HTTP request.

Plain ASGI (Starlette's way): the chain is assembled once in `build_gateway`, and
each request is one pass over a list of bound methods. Nothing a client sends can
produce a stack trace in a response: an unexpected error in a stage becomes a 500
problem whose body says nothing about the cause; the log gets the exception type.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from portcullis.exchange import Exchange, Headers, Receive, Send
from portcullis.pipeline import Pipeline
from portcullis.problems import PROBLEM_CONTENT_TYPE, Problem

log = logging.getLogger("portcullis.gateway")

Hook = Callable[[], Awaitable[None]]


class RequestIds:
    """Request ids: 64 random bits per process, then a counter.

    Unique without coordination between processes, and no syscall per request (a
    `getrandom` call per request costs a GIL hand-off under load). Not a secret.
    """

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter: Iterator[int] = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


class GatewayApp:
    """ASGI 3 callable. `startup`/`shutdown` hooks run on lifespan events, in order."""

    def __init__(self, pipeline: Pipeline, request_id_header: bytes = b"x-request-id") -> None:
        self.pipeline = pipeline
        self._request_stages = pipeline.request_stages
        self._response_stages = pipeline.response_stages
        self._completions = pipeline.completions
        self._rid_header = request_id_header
        self.request_id_header = request_id_header
        self._new_id = RequestIds()
        # Added to every response (e.g. Strict-Transport-Security when TLS ends here).
        self.static_headers: Headers = []
        self.startup_hooks: list[Hook] = []
        self.shutdown_hooks: list[Hook] = []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                try:
                    for hook in self.startup_hooks:
                        await hook()
                except Exception as exc:
                    log.error("start-up failed: %s: %s", type(exc).__name__, exc)
                    await send({"type": "lifespan.startup.failed", "message": type(exc).__name__})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                for hook in self.shutdown_hooks:
                    try:
                        await hook()
                    except Exception as exc:  # keep shutting the rest down
                        log.error("shutdown step failed: %s: %s", type(exc).__name__, exc)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        client = scope.get("client")
        peer = client[0] if client else "0.0.0.0"  # noqa: S104 - a placeholder address, not a bind
        ex = Exchange(
            scope=scope, receive=receive, method=scope["method"],
            raw_path=scope.get("raw_path") or scope["path"].encode(),
            query=scope.get("query_string", b""), headers=scope["headers"],
            request_id=self._new_id(), client_ip=peer,
        )
        ex.facts["peer"] = peer
        problem: Problem | None = None
        try:
            for stage in self._request_stages:
                problem = await stage(ex)
                # A stage answers by refusing (a Problem) or by setting the response
                # itself (the proxy, the authorization server): either ends the chain.
                if problem is not None or ex.upstream is not None:
                    break
        except Exception as exc:
            log.error("stage failed: %s (request %s)", type(exc).__name__, ex.request_id)
            problem = Problem(500, "internal-error", "internal.stage_error",
                              "The gateway failed to handle this request.")
        try:
            if problem is not None:
                await self._send_problem(ex, problem, send)
            else:
                await self._send_upstream(ex, send)
        finally:
            self._complete(ex)

    def refuse_malformed(self, peer: str) -> tuple[str, bytes]:
        """Record a request the HTTP parser refused before the app saw it (smuggling
        framings, bad methods, broken syntax); returns the request id and problem body.

        Runs the completion stages (audit, metrics) on a minimal exchange so every
        denial is audited, as DESIGN.md requires, not just those the stages make.
        """
        problem = Problem(400, "bad-request", "http.malformed", "The request is not valid HTTP/1.1.")
        ex = self._refusal(peer, 400, problem.reason)
        body = problem.body(ex.request_id)
        ex.bytes_out = len(body)
        self._complete(ex)
        return ex.request_id, body

    def refuse_tls(self, peer: str, reason: str, detail: str) -> str:
        """Record a connection whose TLS handshake failed (``reason``: `tls.handshake_failed`
        or `tls.handshake_timeout`; ``detail``: OpenSSL's reason, e.g. `HTTP_REQUEST`,
        `PEER_DID_NOT_RETURN_A_CERTIFICATE`). No HTTP was spoken, so status 0. Returns the
        event's request id."""
        ex = self._refusal(peer, 0, reason)
        ex.facts["tls"] = {"error": detail[:200]}
        self._complete(ex)
        return ex.request_id

    def _refusal(self, peer: str, status: int, reason: str) -> Exchange:
        ex = Exchange(scope={"type": "http"}, receive=_no_body, method="", raw_path=b"", query=b"",
                      headers=[], request_id=self._new_id(), client_ip=peer)
        ex.status, ex.decision, ex.reason = status, "deny", reason
        return ex

    def _complete(self, ex: Exchange) -> None:
        for done in self._completions:
            try:
                done(ex)
            except Exception as exc:  # a completion must never break the others
                log.error("completion failed: %s", type(exc).__name__)

    async def _send_problem(self, ex: Exchange, problem: Problem, send: Send) -> None:
        body = problem.body(ex.request_id)
        ex.status = problem.status
        ex.decision = "error" if problem.status >= 500 else "deny"
        ex.reason = problem.reason
        ex.bytes_out = len(body)
        headers = [
            (b"content-type", PROBLEM_CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            (self._rid_header, ex.request_id.encode()),
            *ex.response_headers,
            *problem.headers,
            *self.static_headers,
        ]
        await send({"type": "http.response.start", "status": problem.status, "headers": headers})
        await send({"type": "http.response.body", "body": body if ex.method != "HEAD" else b""})

    async def _send_upstream(self, ex: Exchange, send: Send) -> None:
        up = ex.upstream
        if up is None:  # the pipeline ended without a terminal stage: a config bug
            await self._send_problem(ex, Problem(500, "internal-error", "internal.no_response",
                                                 "The gateway failed to handle this request."), send)
            return
        try:
            try:
                for on_response in self._response_stages:
                    await on_response(ex)
            except Exception as exc:
                log.error("response stage failed: %s (request %s)", type(exc).__name__, ex.request_id)
                await self._send_problem(ex, Problem(502, "bad-gateway", "upstream.response_refused",
                                                     "The upstream answer could not be delivered."), send)
                return
            up = ex.upstream or up  # a response stage may have replaced it (e.g. to sign it)
            ex.status = up.status
            headers = [*up.headers, *ex.response_headers, (self._rid_header, ex.request_id.encode()),
                       *self.static_headers]
            await send({"type": "http.response.start", "status": up.status, "headers": headers})
            expected = up.content_length
            done = False
            if up.body is not None:
                try:
                    async for chunk in up.body:
                        ex.bytes_out += len(chunk)
                        # With a Content-Length we know which chunk is the last and can
                        # finish with it (one send fewer); otherwise each chunk goes out
                        # as it comes, so streamed responses are not delayed.
                        done = expected is not None and ex.bytes_out >= expected
                        await send({"type": "http.response.body", "body": chunk, "more_body": not done})
                except Exception as exc:
                    # Headers are gone already: all we can do is cut the connection
                    # (by not finishing the response) and record why.
                    ex.decision = "error"
                    ex.reason = ("upstream.response_too_large" if ex.facts.get("response_too_large")
                                 else "upstream.body_error")
                    log.warning("response aborted: %s (request %s)", type(exc).__name__, ex.request_id)
                    return
            if not done:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if up.release is not None:
                up.release()



async def _no_body() -> dict[str, Any]:
    return {"type": "http.disconnect"}
