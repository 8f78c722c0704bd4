"""The concurrency stage inside the real `GatewayApp`: the slot is given back however
the exchange ends (a stage raising, a refusal after it, the body failing mid-stream,
the client gone)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import pytest

from portcullis.app import GatewayApp
from portcullis.exchange import Exchange, Principal, UpstreamResponse
from portcullis.pipeline import Pipeline, Stage
from portcullis.problems import Problem
from portcullis.stages.concurrency import ConcurrencyStage
from portcullis.stages.normalize import NormalizeConfig, NormalizeStage
from portcullis.stages.route import RouteConfig, Router, RouteStage
from portcullis.traffic.concurrency import ConcurrencyConfig, ConcurrencyLimiter

ROUTES = [RouteConfig(name="r", path="/r", methods=["GET"], upstream="u", auth=["api_key"])]


class Principals:
    name: ClassVar[str] = "authenticate"

    async def on_request(self, ex: Exchange) -> Problem | None:
        ex.principal = Principal("s", "acme", "c", "api_key", frozenset())
        return None


class Terminal:
    """Stands where the proxy is: answers in the way `mode` says."""

    name: ClassVar[str] = "proxy"

    def __init__(self, mode: str) -> None:
        self.mode = mode

    async def on_request(self, ex: Exchange) -> Problem | None:
        if self.mode == "raise":
            raise RuntimeError("stage bug")
        if self.mode == "refuse":
            return Problem(429, "rate-limited", "limit.rate", "no")

        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            if self.mode == "body-error":
                raise ConnectionResetError("upstream went away")
            yield b"second"

        ex.upstream = UpstreamResponse(200, [], body())
        return None


def app(mode: str) -> tuple[GatewayApp, ConcurrencyLimiter]:
    limiter = ConcurrencyLimiter(ConcurrencyConfig.model_validate(
        {"upstreams": {"u": {"max_concurrency": 1, "adaptive": {"sample_window_seconds": 0.001}}}, "per_tenant": 1}))
    conc = ConcurrencyStage(limiter)
    stages: list[Stage] = [NormalizeStage(NormalizeConfig()), RouteStage(Router(ROUTES)), Principals(), conc,
                           Terminal(mode)]
    return GatewayApp(Pipeline(stages, [conc])), limiter


async def call(a: GatewayApp, *, send_fails: bool = False) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(msg: dict[str, Any]) -> None:
        if send_fails and msg["type"] == "http.response.body":
            raise OSError("client disconnected")
        sent.append(msg)

    scope = {"type": "http", "method": "GET", "path": "/r", "raw_path": b"/r", "query_string": b"",
             "headers": [(b"host", b"gw")], "client": ("10.0.0.1", 1234), "scheme": "http"}
    await a(scope, receive, send)
    return sent


@pytest.mark.parametrize(("mode", "status"), [("ok", 200), ("raise", 500), ("refuse", 429), ("body-error", 200)])
async def test_slot_released_however_the_exchange_ends(mode: str, status: int) -> None:
    a, limiter = app(mode)
    for _ in range(3):  # with a limit of 1, a leaked slot would shed the next call (503)
        sent = await call(a)
        assert sent[0]["status"] == status
        assert limiter.in_flight == {} and limiter.tenant_in_flight("acme") == 0


async def test_slot_released_when_sending_to_the_client_fails() -> None:
    a, limiter = app("ok")
    await call(a, send_fails=True)  # the app cuts the response off and records why
    assert limiter.in_flight == {}
    assert (await call(a))[0]["status"] == 200


async def test_latency_is_sampled_only_for_answered_exchanges() -> None:
    a, limiter = app("ok")
    ctl = limiter.controllers["u"]
    await call(a)
    await asyncio.sleep(0.005)  # past the 1 ms sample window: the next sample closes it
    await call(a)
    assert ctl.sample_rtt is not None  # a window closed with a real sample
    b, limiter_b = app("refuse")
    await call(b)
    await asyncio.sleep(0.005)
    await call(b)
    assert limiter_b.controllers["u"].sample_rtt is None
