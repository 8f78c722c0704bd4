"""Microbenchmarks of the per-request hot functions (pytest-benchmark).

Skipped by `make test` (addopts has --benchmark-skip); `make bench-micro` runs them.
They assert behaviour, never speed: the figures go to docs/benchmarks.md.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.chain import chain_hash, normalize_event
from portcullis.audit.events import AuditEvent
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.credentials import apikeys
from portcullis.exchange import Exchange, Principal
from portcullis.pipeline import Stage
from portcullis.stages.authenticate import AuthenticateStage, KeyCache
from portcullis.stages.authorize import AuthorizeStage
from portcullis.stages.limit import LimitStage
from portcullis.stages.normalize import Accepted, NormalizeConfig, NormalizeStage, inspect_request
from portcullis.stages.route import RouteConfig, Router, RouteStage
from portcullis.storage.protocols import ApiKeyRecord, RateLimitSpec
from portcullis.traffic.gcra import MemoryGcra
from tests.support import MemoryKeyStore, no_body

HEADERS = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"accept", b"*/*"),
           (b"authorization", b"Bearer x"), (b"x-forwarded-for", b"10.0.0.1")]
PATH = b"/v1/tenants/acme/projects"


def routes() -> list[RouteConfig]:
    out = [RouteConfig(name="health", path="/v1/health", methods=["GET"], upstream="u", public=True)]
    for i, (m, p) in enumerate([("GET", "/projects"), ("POST", "/projects"), ("GET", "/projects/{id}"),
                                ("DELETE", "/projects/{id}"), ("GET", "/invoices"), ("GET", "/users/{id}")]):
        out.append(RouteConfig(name=f"r{i}", path="/v1/tenants/{tenant}" + p, methods=[m], upstream="u",
                               auth=["api_key"], scopes=["projects:read"], tenant_param="tenant"))
    return out


def test_normalize_inspect(benchmark: Any) -> None:
    cfg = NormalizeConfig()
    result = benchmark(inspect_request, "GET", PATH, b"", HEADERS, cfg)
    assert isinstance(result, Accepted)


def test_route_resolve(benchmark: Any) -> None:
    router = Router(routes())
    found = benchmark(router.resolve, "127.0.0.1", "GET", "/v1/tenants/acme/projects/prj_1")
    assert not isinstance(found, list)
    assert found[1] == {"tenant": "acme", "id": "prj_1"}


def test_api_key_parse_and_verify(benchmark: Any) -> None:
    hasher = apikeys.KeyHasher(b"p" * 32)
    kid, key = apikeys.generate()
    stored = hasher.digest(key)

    def verify() -> bool:
        return apikeys.parse(key) == kid and hasher.matches(key, stored)

    assert benchmark(verify)


def test_gcra_check(benchmark: Any) -> None:
    g = MemoryGcra()
    spec = RateLimitSpec(10**9, 60, 10**6)
    assert benchmark(lambda: g.check("credential|abc", spec, time.monotonic())).allowed


def test_audit_event_chain_hash(benchmark: Any) -> None:
    ev = normalize_event(AuditEvent(ts=time.time(), kind="request", request_id="r" * 24, decision="allow",
                                    reason="ok", method="GET", path=PATH.decode(), status=200, latency_ms=1.2))
    assert len(benchmark(chain_hash, "0" * 64, ev)) == 64


def test_audit_append_batch_of_64(benchmark: Any, tmp_path: Path) -> None:
    """One group commit of 64 events (chain, insert, signed checkpoint, fsync); per call."""
    store = SqliteAuditStore(tmp_path / "a.db", signing_key=Ed25519PrivateKey.generate())

    def batch() -> list[AuditEvent]:
        return [normalize_event(AuditEvent(ts=time.time(), kind="request", request_id=f"r{i}", decision="allow",
                                           reason="ok", path="/x", status=200)) for i in range(64)]

    out = benchmark.pedantic(store.append_batch, setup=lambda: ((batch(),), {"assume_normalized": True}),
                             rounds=50)
    assert out[-1].seq > 0
    store.close()


def test_request_stages_in_process(benchmark: Any) -> None:
    """normalize -> route -> authenticate -> authorize -> limit for one request, no network."""
    hasher = apikeys.KeyHasher(b"p" * 32)
    kid, key = apikeys.generate()
    rec = ApiKeyRecord(kid, "bench", "acme", frozenset({"projects:read"}), frozenset(), hasher.digest(key),
                       time.time(), rate_limit=RateLimitSpec(10**9, 60, 10**6))
    cache = KeyCache(MemoryKeyStore(rec))
    cache.load()
    stages: list[Stage] = [NormalizeStage(NormalizeConfig()), RouteStage(Router(routes())),
                           AuthenticateStage(cache, hasher), AuthorizeStage(), LimitStage({}, MemoryGcra())]
    headers = [(b"host", b"127.0.0.1:8080"), (b"user-agent", b"wrk"), (b"authorization", f"Bearer {key}".encode())]
    loop = asyncio.new_event_loop()

    async def run() -> Exchange:
        ex = Exchange(scope={"type": "http"}, receive=no_body, method="GET", raw_path=PATH, query=b"",
                      headers=headers, request_id="r", client_ip="127.0.0.1")
        for s in stages:
            problem = await s.on_request(ex)
            assert problem is None, problem
        return ex

    ex = benchmark(lambda: loop.run_until_complete(run()))
    loop.close()
    assert isinstance(ex.principal, Principal)
    assert ex.principal.tenant == "acme"


# --- JWT verification (issue: credentials) ----------------------------------------
JWT_NOW = 1_800_000_000.0


def _jwt_setup(alg: str, cache_size: int) -> tuple[Any, bytes, Any]:
    from joserfc import jwt as jose_jwt
    from joserfc.jwk import ECKey, OKPKey, RSAKey

    from portcullis.credentials.jwt import JwtConfig, JwtIssuerConfig, JwtVerifier

    key: Any
    if alg == "RS256":
        key = RSAKey.generate_key(2048, parameters={"kid": "k"})
    elif alg == "ES256":
        key = ECKey.generate_key("P-256", parameters={"kid": "k"})
    else:
        key = OKPKey.generate_key("Ed25519", parameters={"kid": "k"})
    doc = json.dumps({"keys": [key.as_dict(private=False)]}).encode()
    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer="https://i.example", jwks_uri="https://i.example/jwks",
                                             audience="https://api.example", algorithms=[alg])],
                    cache_size=cache_size)
    verifier = JwtVerifier(cfg, fetch=lambda url: doc, clock=lambda: JWT_NOW)
    claims = {"iss": "https://i.example", "aud": "https://api.example", "sub": "u", "tenant": "acme",
              "exp": int(JWT_NOW) + 600, "scope": "projects:read"}
    token = jose_jwt.encode({"alg": alg, "kid": "k"}, claims, key, algorithms=[alg]).encode()
    return verifier, token, key


def _drive(verifier: Any, token: bytes) -> Principal:
    """`verify_now`, which the gateway's authenticate stage calls first: with the JWKS
    loaded and fresh it answers without a coroutine (it raises `KeysNeeded` otherwise)."""
    return verifier.verify_now(token)  # type: ignore[no-any-return]


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwt_verify_cold(benchmark: Any, alg: str) -> None:
    """Full verification every time (verified-token cache off)."""
    verifier, token, _ = _jwt_setup(alg, cache_size=0)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(verifier.verify(token))  # loads the JWKS
    loop.close()
    assert benchmark(_drive, verifier, token).subject == "u"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwt_verify_cached(benchmark: Any, alg: str) -> None:
    """A repeated token: served from the verified-token cache."""
    verifier, token, _ = _jwt_setup(alg, cache_size=1000)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(verifier.verify(token))
    loop.close()
    assert benchmark(_drive, verifier, token).subject == "u"


def _raw_check(alg: str, token: bytes, key: Any) -> Any:
    """The bare `cryptography` signature check of `token` with `key`: the floor."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, utils

    head, body, sig_b64 = token.split(b".")
    signing_input = head + b"." + body
    sig = base64.urlsafe_b64decode(sig_b64 + b"=" * (-len(sig_b64) % 4))
    pub = key.get_op_key("verify")
    if alg == "RS256":
        def check() -> None:
            pub.verify(sig, signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif alg == "ES256":
        der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))

        def check() -> None:
            pub.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
    else:
        def check() -> None:
            pub.verify(sig, signing_input)
    return check


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_raw_cryptography_verify(benchmark: Any, alg: str) -> None:
    """The bare `cryptography` signature check of the same token and key: the floor."""
    _, token, key = _jwt_setup(alg, cache_size=0)
    benchmark(_raw_check(alg, token, key))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_jwt_cold_over_raw(benchmark: Any, alg: str) -> None:
    """Cold verification over the raw primitive, measured interleaved.

    This VM's speed shifts by up to a third between seconds, so the separate cold and raw
    benchmarks above, taken one after the other, can compare two different machines. Here
    blocks of 2,000 cold verifications and 2,000 raw checks alternate 25 times, and the
    ratio of each adjacent pair is kept: `extra_info` has their median and quartiles.
    """
    import statistics
    import timeit

    verifier, token, key = _jwt_setup(alg, cache_size=0)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(verifier.verify(token))
    loop.close()
    raw = _raw_check(alg, token, key)

    cold = functools.partial(verifier.verify_now, token)

    def pairs() -> list[float]:
        ratios = []
        for _ in range(25):
            c = timeit.timeit(cold, number=2000)
            r = timeit.timeit(raw, number=2000)
            ratios.append(c / r)
        return ratios

    ratios = benchmark.pedantic(pairs, rounds=1, iterations=1)
    q1, med, q3 = statistics.quantiles(ratios, n=4)
    benchmark.extra_info.update(cold_over_raw_median=round(med, 3), q1=round(q1, 3), q3=round(q3, 3))
    print(f"\n{alg}: cold / raw median {med:.3f} (quartiles {q1:.3f}-{q3:.3f})")
    assert cold().subject == "u"
