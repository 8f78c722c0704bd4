"""Unit tests of the authenticate, authorize, limit and record stages, on real
in-memory stores (no network)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.writer import AuditWriter
from portcullis.credentials import apikeys
from portcullis.exchange import Exchange, Principal
from portcullis.problems import Problem
from portcullis.stages.authenticate import AuthenticateStage, KeyCache
from portcullis.stages.authorize import AuthorizeStage
from portcullis.stages.limit import LimitStage, RateLimitConfig
from portcullis.stages.record import RecordStage
from portcullis.stages.route import RouteConfig, Router
from portcullis.storage.protocols import ApiKeyRecord, RateLimitSpec
from portcullis.traffic.gcra import MemoryGcra
from tests.support import MemoryKeyStore, exchange

HASHER = apikeys.KeyHasher(b"k" * 32)
ROUTER = Router([
    RouteConfig(name="projects", path="/t/{tenant}/projects", methods=["GET", "DELETE"], upstream="u",
                auth=["api_key"], scopes=["projects:read"], tenant_param="tenant", roles=[]),
    RouteConfig(name="admin", path="/t/{tenant}/admin", methods=["POST"], upstream="u", auth=["api_key"],
                scopes=["a", "b"], roles=["tenant-admin", "owner"], tenant_param="tenant"),
    RouteConfig(name="open", path="/open", methods=["GET"], upstream="u", public=True, rate_limit="ip"),
    RouteConfig(name="limited", path="/t/{tenant}/limited", methods=["GET"], upstream="u", auth=["api_key"],
                tenant_param="tenant", rate_limit="ip"),
])


def routed(path: str, method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None) -> Exchange:
    ex = exchange(method, path.encode(), headers)
    ex.path = path
    found = ROUTER.resolve("gw", method, path)
    assert not isinstance(found, list)
    ex.route, ex.path_params = found
    return ex


def key(name: str = "k", tenant: str = "acme", scopes: tuple[str, ...] = ("projects:read",),
        expires_at: float | None = None, revoked: bool = False) -> tuple[ApiKeyRecord, str]:
    kid, full = apikeys.generate()
    rec = ApiKeyRecord(kid, name, tenant, frozenset(scopes), frozenset(), HASHER.digest(full), time.time(),
                       expires_at=expires_at, revoked_at=time.time() if revoked else None,
                       rate_limit=RateLimitSpec(2, 60, 2))
    return rec, full


def authenticate_stage(*records: ApiKeyRecord, clock: float | None = None) -> AuthenticateStage:
    cache = KeyCache(MemoryKeyStore(*records))
    cache.load()
    return AuthenticateStage(cache, HASHER, clock=(lambda: clock) if clock is not None else time.time)


async def auth(stage: AuthenticateStage, headers: list[tuple[bytes, bytes]]) -> tuple[Exchange, Problem | None]:
    ex = routed("/t/acme/projects", headers=[(b"host", b"gw"), *headers])
    return ex, await stage.on_request(ex)


async def test_authenticate_bearer_and_x_api_key() -> None:
    rec, full = key()
    stage = authenticate_stage(rec)
    for header in ((b"authorization", b"Bearer " + full.encode()), (b"authorization", b"bearer " + full.encode()),
                   (b"x-api-key", full.encode())):
        ex, problem = await auth(stage, [header])
        assert problem is None
        assert ex.principal == Principal(subject="key:k", tenant="acme", credential_id=rec.key_id,
                                         credential_kind="api_key", scopes=frozenset({"projects:read"}),
                                         rate_limit=(2, 60.0, 2))


@pytest.mark.parametrize(("headers", "status", "reason"), [
    ([], 401, "auth.missing"),
    ([(b"authorization", b"Basic abc")], 401, "auth.unsupported_scheme"),
    ([(b"authorization", b"Bearer ")], 401, "auth.missing"),
    ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], 400, "auth.multiple_credentials"),
    ([(b"x-api-key", b"a"), (b"x-api-key", b"b")], 400, "auth.multiple_credentials"),
    ([(b"x-api-key", b"\xff\xfe")], 401, "auth.key_malformed"),
    ([(b"x-api-key", b"pcl_" + b"A" * 600)], 401, "auth.credential_too_long"),
])
async def test_authenticate_refusals(headers: list[tuple[bytes, bytes]], status: int, reason: str) -> None:
    ex, problem = await auth(authenticate_stage(), headers)
    assert problem is not None
    assert (problem.status, problem.reason) == (status, reason)
    assert ex.principal is None
    assert any(k == b"www-authenticate" for k, _ in problem.headers)


async def test_authenticate_expired_revoked_and_clock() -> None:
    now = time.time()
    live, live_key = key("live", expires_at=now + 60)
    dead, dead_key = key("dead", revoked=True)
    stage = authenticate_stage(live, dead, clock=now)
    assert (await auth(stage, [(b"x-api-key", live_key.encode())]))[1] is None
    _, p = await auth(stage, [(b"x-api-key", dead_key.encode())])
    assert p is not None and p.reason == "auth.key_revoked"
    later = authenticate_stage(live, clock=now + 61)
    _, p = await auth(later, [(b"x-api-key", live_key.encode())])
    assert p is not None and p.reason == "auth.key_expired"


async def test_revocation_reaches_the_cache_on_refresh() -> None:
    rec, full = key()
    store = MemoryKeyStore(rec)
    cache = KeyCache(store)
    cache.load()
    stage = AuthenticateStage(cache, HASHER)
    assert (await auth(stage, [(b"x-api-key", full.encode())]))[1] is None
    store.revoke(rec.key_id, time.time())
    assert await cache.refresh_if_changed()
    _, p = await auth(stage, [(b"x-api-key", full.encode())])
    assert p is not None and p.reason == "auth.key_revoked"
    assert not await cache.refresh_if_changed()  # nothing new


async def test_public_route_skips_authentication() -> None:
    ex = routed("/open")
    assert await authenticate_stage().on_request(ex) is None
    assert ex.principal is None


def principal(tenant: str = "acme", scopes: tuple[str, ...] = ("projects:read",),
              roles: tuple[str, ...] = ()) -> Principal:
    return Principal("s", tenant, "cid", "api_key", frozenset(scopes), frozenset(roles))


@pytest.mark.parametrize(("path", "method", "p", "status", "reason"), [
    ("/t/acme/projects", "GET", principal(), None, None),
    ("/t/globex/projects", "GET", principal(scopes=("projects:read", "everything")), 403, "authz.tenant_mismatch"),
    ("/t/acme/projects", "GET", principal(scopes=()), 403, "authz.scope_missing"),
    ("/t/acme/admin", "POST", principal(scopes=("a",), roles=("owner",)), 403, "authz.scope_missing"),
    ("/t/acme/admin", "POST", principal(scopes=("a", "b")), 403, "authz.role_missing"),
    ("/t/acme/admin", "POST", principal(scopes=("a", "b"), roles=("owner",)), None, None),
    ("/t/acme/projects", "GET", None, 401, "authz.no_principal"),
])
async def test_authorize(path: str, method: str, p: Principal | None, status: int | None, reason: str | None) -> None:
    ex = routed(path, method)
    ex.principal = p
    problem = await AuthorizeStage().on_request(ex)
    assert (problem.status, problem.reason) == (status, reason) if problem else status is None


async def test_insufficient_scope_challenge_names_the_scopes() -> None:
    ex = routed("/t/acme/admin", "POST")
    ex.principal = principal(scopes=())
    problem = await AuthorizeStage().on_request(ex)
    assert problem is not None
    challenge = dict(problem.headers)[b"www-authenticate"]
    assert b'error="insufficient_scope"' in challenge and b'scope="a b"' in challenge


async def test_limit_per_credential_and_refund() -> None:
    now = [1000.0]
    stage = LimitStage({"ip": RateLimitConfig(requests=100, per_seconds=60, burst=100, key="ip")}, MemoryGcra(),
                       clock=lambda: now[0])
    p = Principal("s", "acme", "cid", "api_key", frozenset(), rate_limit=(2, 60.0, 2))
    results = []
    for _ in range(3):
        ex = routed("/t/acme/projects")
        ex.principal = p
        results.append(await stage.on_request(ex))
        last = ex
    assert results[0] is None and results[1] is None
    assert results[2] is not None and results[2].status == 429
    assert dict(results[2].headers)[b"retry-after"] == b"30"
    assert dict(last.response_headers)[b"ratelimit-policy"] == b'"credential";q=2;w=60'
    now[0] += 30  # one request's worth refills
    ex = routed("/t/acme/projects")
    ex.principal = p
    assert await stage.on_request(ex) is None


async def test_limit_refused_request_does_not_use_up_other_limits() -> None:
    stage = LimitStage({"ip": RateLimitConfig(requests=3, per_seconds=60, burst=3, key="ip")}, MemoryGcra(),
                       clock=lambda: 0.0)
    one_shot = Principal("s", "acme", "c1", "api_key", frozenset(), rate_limit=(1, 60.0, 1))
    other = Principal("s", "acme", "c2", "api_key", frozenset())

    async def call(p: Principal) -> Problem | None:
        ex = routed("/t/acme/limited")
        ex.principal = p
        return await stage.on_request(ex)

    assert await call(one_shot) is None  # ip 1/3, credential 1/1
    for _ in range(5):  # the credential refuses; the ip limit must be refunded each time
        refused = await call(one_shot)
        assert refused is not None and refused.reason == "limit.rate"
    # Same client IP, another key: the ip limit still has 2 of 3 left.
    assert await call(other) is None
    assert await call(other) is None
    assert (await call(other)) is not None


async def test_limit_keys_by_client_ip_on_public_routes() -> None:
    stage = LimitStage({"ip": RateLimitConfig(requests=1, per_seconds=60, burst=1, key="ip")}, MemoryGcra(),
                       clock=lambda: 0.0)
    assert await stage.on_request(routed("/open")) is None
    assert await stage.on_request(routed("/open")) is not None
    other_ip = routed("/open")
    other_ip.client_ip = "10.0.0.9"
    assert await stage.on_request(other_ip) is None


async def test_record_writes_one_event_with_who_what_where(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "a.db", signing_key=Ed25519PrivateKey.generate())
    writer = AuditWriter(store, max_backlog=2)
    writer.start()
    stage = RecordStage(writer)
    ex = routed("/t/acme/projects")
    ex.principal = principal()
    ex.status, ex.bytes_out, ex.user_agent, ex.host = 200, 42, "curl/8", "gw"
    assert await stage.on_request(ex) is None
    stage.on_complete(ex)
    assert writer.flush(5)
    (ev,) = store.tail(1)
    assert (ev.route, ev.status, ev.tenant, ev.credential_id, ev.user_agent, ev.bytes_out, ev.decision) == (
        "projects", 200, "acme", "cid", "curl/8", 42, "allow")
    writer.close()
    store.close()


async def test_record_refuses_when_the_audit_backlog_is_full(tmp_path: Path) -> None:
    store = SqliteAuditStore(tmp_path / "a.db", signing_key=Ed25519PrivateKey.generate())
    writer = AuditWriter(store, max_backlog=1)  # not started: nothing drains
    stage = RecordStage(writer)
    first = routed("/open")
    assert await stage.on_request(first) is None
    stage.on_complete(first)
    problem = await stage.on_request(routed("/open"))
    assert problem is not None
    assert (problem.status, problem.reason) == (503, "audit.backlog_full")  # fail closed, not unaudited
    writer.close()
    store.close()


async def test_token_revocations_by_jti_subject_and_client() -> None:
    from portcullis.storage.protocols import RevocationRecord

    store = MemoryKeyStore()
    now = [1000.0]
    cache = KeyCache(store, revocations=store, clock=lambda: now[0])
    cache.load()
    alice = Principal("alice", "acme", "jti-1", "jwt", frozenset(), client_id="app-1")
    bob = Principal("bob", "acme", "jti-2", "jwt", frozenset(), client_id="app-2")
    assert cache.revoked(alice) is None
    store.revoke_tokens(RevocationRecord("jti", "jti-1", now[0]))
    assert cache.revoked(alice) is None  # not seen before the next poll
    assert await cache.refresh_if_changed()
    assert cache.revoked(alice) == "jwt.revoked_token"
    assert cache.revoked(bob) is None
    store.revoke_tokens(RevocationRecord("sub", "bob", now[0], expires_at=now[0] + 60))
    store.revoke_tokens(RevocationRecord("client", "app-1", now[0]))
    await cache.refresh_if_changed()
    assert cache.revoked(bob) == "jwt.revoked_subject"
    assert cache.revoked(Principal("carol", "acme", "j3", "jwt", frozenset(), client_id="app-1")) == (
        "jwt.revoked_client")
    now[0] += 61  # the subject revocation lapses, without waiting for a reload
    assert cache.revoked(bob) is None
    assert store.revoke_tokens(RevocationRecord("sub", "bob", now[0]))  # and may be made again
    await cache.refresh_if_changed()
    assert cache.revoked(bob) == "jwt.revoked_subject"


async def test_route_audience_must_be_in_the_token() -> None:
    route_router = Router([RouteConfig(name="b", path="/b", methods=["GET"], upstream="u", auth=["jwt"],
                                       audience="https://billing.example")])

    class FakeJwt:  # a verifier returning a fixed principal: the check under test is the stage's own
        def __init__(self, auds: frozenset[str]) -> None:
            self.auds = auds

        def verify_now(self, token: bytes) -> Principal:
            return Principal("s", "acme", "j", "jwt", frozenset(), audiences=self.auds)

        async def verify(self, token: bytes) -> Principal:
            return self.verify_now(token)

    for auds, ok in ((frozenset({"https://api.example"}), False),
                     (frozenset({"https://api.example", "https://billing.example"}), True)):
        cache = KeyCache(MemoryKeyStore())
        cache.load()
        stage = AuthenticateStage(cache, HASHER, jwt=FakeJwt(auds))  # type: ignore[arg-type]
        ex = exchange("GET", b"/b", [(b"host", b"gw"), (b"authorization", b"Bearer a.b.c")])
        ex.path = "/b"
        found = route_router.resolve("gw", "GET", "/b")
        assert not isinstance(found, list)
        ex.route, ex.path_params = found
        problem = await stage.on_request(ex)
        assert (problem is None) == ok
        if problem is not None:
            assert problem.reason == "auth.route_audience"


async def test_a_key_bound_to_a_signing_key_fails_closed_without_signature_checking() -> None:
    kid, full = apikeys.generate()
    rec = ApiKeyRecord(kid, "partner", "acme", frozenset({"projects:read"}), frozenset(), HASHER.digest(full),
                       time.time(), signing_key_id="partner-1")
    cache = KeyCache(MemoryKeyStore(rec))
    cache.load()
    ex, problem = await auth(AuthenticateStage(cache, HASHER), [(b"x-api-key", full.encode())])
    assert problem is not None and problem.reason == "sig.not_configured"
    ex, problem = await auth(AuthenticateStage(cache, HASHER, signatures_enabled=True),
                             [(b"x-api-key", full.encode())])
    assert problem is None and ex.principal is not None and ex.principal.signing_key_id == "partner-1"


def test_unusable_tls_files_are_named(tmp_path: Path) -> None:
    from portcullis.tls import TlsConfig, server_context

    with pytest.raises(ValueError, match=r"cannot load .*missing\.pem"):
        server_context(TlsConfig(cert_file=str(tmp_path / "missing.pem"), key_file=str(tmp_path / "k.pem")))
