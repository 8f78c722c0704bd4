"""The table of hostile requests: each is refused with the right status, problem type
and audit reason, against the real gateway and the real demo upstream."""

from __future__ import annotations

import pytest

from portcullis.audit.events import AuditEvent
from portcullis.credentials import apikeys
from portcullis.problems import PROBLEM_BASE
from tests.integration.conftest import Env
from tests.integration.harness import Client, find_audit_event, raw_request

P = "/v1/tenants/acme/projects"


def audit_event(env: Env, request_id: str) -> AuditEvent:
    return find_audit_event(env.gateway, request_id)


def unknown_but_well_formed_key() -> str:
    return apikeys.generate("Zzzzzzzz")[1]


def mistyped(key: str) -> str:
    return key[:20] + ("x" if key[20] != "x" else "y") + key[21:]


# (case id, method, path, headers (with {name} placeholders for keys), status, slug, reason)
CASES: list[tuple[str, str, str, dict[str, str], int, str, str]] = [
    ("no-credential", "GET", P, {}, 401, "unauthenticated", "auth.missing"),
    ("basic-scheme", "GET", P, {"Authorization": "Basic dXNlcjpwYXNz"}, 401, "unauthenticated",
     "auth.unsupported_scheme"),
    ("malformed-key", "GET", P, {"Authorization": "Bearer not-a-key"}, 401, "invalid-credential",
     "auth.key_malformed"),
    ("oversized-token", "GET", P, {"Authorization": "Bearer " + "A" * 5000}, 401, "invalid-credential",
     "auth.credential_too_long"),
    ("mistyped-key", "GET", P, {"Authorization": "Bearer {mistyped:reader}"}, 401, "invalid-credential",
     "auth.key_checksum"),
    ("unknown-key", "GET", P, {"Authorization": "Bearer {unknown}"}, 401, "invalid-credential",
     "auth.key_unknown"),
    ("forged-secret", "GET", P, {"Authorization": "Bearer {forged:reader}"}, 401, "invalid-credential",
     "auth.key_mismatch"),
    ("revoked-key", "GET", P, {"Authorization": "Bearer {revoked}"}, 401, "invalid-credential",
     "auth.key_revoked"),
    ("expired-key", "GET", P, {"X-API-Key": "{expired}"}, 401, "invalid-credential", "auth.key_expired"),
    ("two-credentials", "GET", P, {"Authorization": "Bearer {reader}", "X-API-Key": "{writer}"}, 400,
     "bad-request", "auth.multiple_credentials"),
    ("wrong-tenant", "GET", "/v1/tenants/globex/projects", {"Authorization": "Bearer {reader}"}, 403,
     "tenant-mismatch", "authz.tenant_mismatch"),
    ("wrong-tenant-with-every-scope", "GET", "/v1/tenants/globex/invoices", {"X-API-Key": "{writer}"}, 403,
     "tenant-mismatch", "authz.tenant_mismatch"),
    ("missing-scope", "GET", "/v1/tenants/acme/invoices", {"Authorization": "Bearer {reader}"}, 403,
     "insufficient-scope", "authz.scope_missing"),
    ("missing-role", "DELETE", P + "/prj_ac000001", {"Authorization": "Bearer {writer}"}, 403, "forbidden",
     "authz.role_missing"),
    ("dot-dot", "GET", "/v1/tenants/acme/../globex/projects", {"X-API-Key": "{reader}"}, 400, "bad-request",
     "path.dot_segment"),
    ("encoded-dot-dot", "GET", "/v1/tenants/acme/%2e%2e/globex/projects", {"X-API-Key": "{reader}"}, 400,
     "bad-request", "path.dot_segment"),
    ("double-encoded-dot", "GET", "/v1/tenants/acme/%252e%252e/globex/projects", {"X-API-Key": "{reader}"},
     400, "bad-request", "path.double_encoding"),
    ("encoded-slash", "GET", "/v1/tenants/acme%2fprojects", {"X-API-Key": "{reader}"}, 400, "bad-request",
     "path.encoded_slash"),
    ("backslash", "GET", "/v1/tenants/acme/%5cprojects", {"X-API-Key": "{reader}"}, 400, "bad-request",
     "path.backslash"),
    ("nul", "GET", "/v1/tenants/acme/projects%00", {"X-API-Key": "{reader}"}, 400, "bad-request",
     "path.control_char"),
    ("empty-segment", "GET", "/v1/tenants//acme/projects", {"X-API-Key": "{reader}"}, 400, "bad-request",
     "path.empty_segment"),
    ("declared-body-too-large", "POST", P, {"X-API-Key": "{writer}", "Content-Length": "70000",
                                            "Content-Type": "application/json"}, 413, "payload-too-large",
     "request.body_too_large"),
    ("too-many-headers", "GET", P, {f"X-Pad-{i}": "x" for i in range(150)}, 431, "headers-too-large",
     "request.headers_too_large"),
    ("huge-header", "GET", P, {"X-Pad": "x" * 20000}, 431, "headers-too-large", "request.headers_too_large"),
    ("no-route", "GET", "/v2/anything", {}, 404, "not-found", "route.not_found"),
    ("wrong-method", "PUT", P, {"X-API-Key": "{writer}"}, 405, "method-not-allowed",
     "route.method_not_allowed"),
]


def fill(env: Env, value: str) -> str:
    if "{unknown}" in value:
        return value.replace("{unknown}", unknown_but_well_formed_key())
    for name, key in env.keys.items():
        value = value.replace("{mistyped:" + name + "}", mistyped(key))
        # Same id and checksum shape, different secret: recompute a valid checksum.
        if "{forged:" + name + "}" in value:
            body = key[: -apikeys.CHECKSUM_LEN - 1] + ("a" if key[-7] != "a" else "b")
            value = value.replace("{forged:" + name + "}", body + apikeys.checksum(body))
        value = value.replace("{" + name + "}", key)
    return value


@pytest.mark.parametrize(("case", "method", "path", "headers", "status", "slug", "reason"), CASES,
                         ids=[c[0] for c in CASES])
def test_hostile_request(env: Env, case: str, method: str, path: str, headers: dict[str, str], status: int,
                         slug: str, reason: str) -> None:
    hdrs = {k: fill(env, v) for k, v in headers.items()}
    body = b"{}" if method == "POST" and "Content-Length" not in hdrs else None
    if "Content-Length" in hdrs:
        # Declared but never sent: the gateway must refuse on the declaration alone.
        r = raw_request(env.client.port, (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n").encode())
        head = r.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith(f"HTTP/1.1 {status}"), head
        rid = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("x-request-id:"))
        assert audit_event(env, rid).reason == reason
        return
    resp = Client(env.client.port).request(method, path, hdrs, body)
    assert resp.status == status, resp.body
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["type"] == PROBLEM_BASE + slug
    assert doc["status"] == status
    assert "reason" not in doc  # reasons are for the audit log only: no oracle for attackers
    assert doc["request_id"] == resp.headers["x-request-id"]
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer ")
    # Nothing secret reaches the body: no key material, no internals.
    for key in env.keys.values():
        assert key.encode() not in resp.body
    assert b"Traceback" not in resp.body
    ev = audit_event(env, resp.headers["x-request-id"])
    assert ev.reason == reason
    assert ev.status == status
    assert ev.decision == "deny"


# Smuggling: these never reach a stage intact, whichever layer refuses them.
SMUGGLING = [
    ("cl-and-te", b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("duplicate-cl", b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 2\r\n\r\n{}"),
    ("conflicting-cl", b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
     b"Content-Length: 40\r\n\r\n{}"),
    ("duplicate-host", b"GET /v1/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
    ("te-obfuscated", b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n"),
    ("te-list", b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
     b"0\r\n\r\n"),
    ("bad-method", b"G@T /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("unknown-method", b"PURGE /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"),
    ("no-host", b"GET /v1/health HTTP/1.1\r\n\r\n"),
]


@pytest.mark.parametrize(("case", "raw"), SMUGGLING, ids=[c[0] for c in SMUGGLING])
def test_smuggling_refused(env: Env, case: str, raw: bytes) -> None:
    reply = raw_request(env.client.port, raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), (case, reply[:300])
    assert b"x-demo-upstream" not in reply.lower()  # never reached the upstream
    # Refused by the parser or by normalize: either way a problem, and audited.
    assert b"content-type: application/problem+json" in head.lower()
    rid = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
               if line.lower().startswith(b"x-request-id:"))
    assert audit_event(env, rid).decision == "deny"
    assert b"reason" not in body


def test_chunked_body_over_limit_is_413(env: Env) -> None:
    head = (f"POST {P} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {env.keys['writer']}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"a" * 16384
    body = b"".join(b"4000\r\n" + chunk + b"\r\n" for _ in range(6)) + b"0\r\n\r\n"
    reply = raw_request(env.client.port, head + body)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:300]
    assert b"payload-too-large" in reply


def test_rate_limit_429_with_headers(env: Env) -> None:
    c = env.as_("limited")
    statuses = []
    last = None
    for _ in range(5):
        last = c.request("GET", P)
        statuses.append(last.status)
    assert statuses[:3] == [200, 200, 200]
    assert statuses[3:] == [429, 429]
    assert last is not None
    assert int(last.headers["retry-after"]) >= 1
    assert last.headers["ratelimit-policy"] == '"credential";q=3;w=60'
    assert last.headers["ratelimit"].startswith('"credential";r=0;t=')
    assert last.json()["type"] == PROBLEM_BASE + "rate-limited"
    assert audit_event(env, last.headers["x-request-id"]).reason == "limit.rate"
