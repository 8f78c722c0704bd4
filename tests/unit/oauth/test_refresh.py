"""The authorization/refresh store (refresh.py) without HTTP: rotation is atomic, reuse
revokes the family and its access tokens, a revocation racing an issue still revokes
the new token, lifetimes, RFC 7009 / RFC 7662 hooks."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from portcullis.credentials.acr import ACR_MFA
from portcullis.credentials.apikeys import KeyHasher
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.models import LoginState
from portcullis.oauth.refresh import Grants, jwt_facts, login_from_json, login_to_json, wants_refresh_token
from portcullis.oauth.service import AuthContext, open_context
from portcullis.storage.protocols import RevocationRecord

LOGIN = LoginState("sess", "u1", "alice@acme.example", "acme", ("tenant-admin",), 1_700_000_000.0, ("pwd", "otp"),
                   ACR_MFA)


class Revocations:
    def __init__(self) -> None:
        self.records: list[RevocationRecord] = []

    def revoke_tokens(self, record: RevocationRecord) -> bool:
        self.records.append(record)
        return True

    def revocations(self, now: float) -> list[RevocationRecord]:
        return list(self.records)

    def revision(self) -> int:
        return len(self.records)


class Clock:
    now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def fake_jwt(jti: str, exp: float) -> str:
    def seg(d: dict[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
    return f"{seg({'alg': 'ES256'})}.{seg({'jti': jti, 'exp': exp})}.sig"


@pytest.fixture
def env(tmp_path: Path) -> tuple[AuthContext, Grants, Revocations, Clock]:
    rev, clock = Revocations(), Clock()
    cfg = AuthServerConfig(issuer="https://as.example", refresh_idle_seconds=300, refresh_absolute_seconds=600)
    ctx = open_context(cfg, tmp_path, KeyHasher(b"p" * 32), rev, clock=clock)
    return ctx, Grants(ctx.db, ctx.hasher, rev, cfg, clock), rev, clock


def test_login_round_trip_and_jwt_facts() -> None:
    assert login_from_json(login_to_json(LOGIN)) == LOGIN
    assert jwt_facts(fake_jwt("j1", 123.0)) == ("j1", 123.0)
    assert jwt_facts("opaque") is None and jwt_facts("a.b.c") is None


def test_refresh_policy() -> None:
    assert wants_refresh_token(("authorization_code", "refresh_token"), "projects:read")
    assert not wants_refresh_token(("authorization_code", "refresh_token"), "openid projects:read")
    assert wants_refresh_token(("authorization_code", "refresh_token"), "openid offline_access")
    assert not wants_refresh_token(("authorization_code",), "openid offline_access")


def test_tokens_stored_hashed_and_spent_once(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    ctx, grants, _rev, _clock = env
    fam = grants.start(client_id="c1", login=LOGIN, scope="openid offline_access", resources=[], dpop_jkt=None)
    grants.record(fam, access_token=fake_jwt("j1", 2e9), refresh_token="prt_secret", scope="openid offline_access")
    assert b"prt_secret" not in (Path(ctx.db.path)).read_bytes()
    rec = grants.lookup("prt_secret")
    assert rec is not None and rec.login == LOGIN and rec.client_id == "c1"
    assert grants.spend(rec.token_hash) is True
    assert grants.spend(rec.token_hash) is False  # exactly one winner
    assert grants.lookup("prt_unknown") is None and grants.lookup("x" * 1000) is None


def test_revoke_family_revokes_live_access_tokens(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    _ctx, grants, rev, clock = env
    fam = grants.start(client_id="c1", login=LOGIN, scope="s", resources=[], dpop_jkt=None)
    grants.record(fam, access_token=fake_jwt("live", clock.now + 600), refresh_token="prt_a", scope="s")
    grants.record(fam, access_token=fake_jwt("dead", clock.now - 1), refresh_token=None, scope="s")
    assert grants.revoke(fam, "oauth.refresh_reuse") == 1
    assert [(r.kind, r.value, r.reason) for r in rev.records] == [("jti", "live", "oauth.refresh_reuse")]
    rec = grants.lookup("prt_a")
    assert rec is not None and rec.revoked_at is not None


def test_issue_after_revocation_is_revoked_at_once(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    _ctx, grants, rev, clock = env
    fam = grants.start(client_id="c1", login=LOGIN, scope="s", resources=[], dpop_jkt=None)
    grants.revoke(fam, "oauth.code_reuse")  # the reuse won the race
    grants.record(fam, access_token=fake_jwt("late", clock.now + 600), refresh_token="prt_late", scope="s")
    assert [r.value for r in rev.records] == ["late"]


def test_revoke_user_and_summaries(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    _ctx, grants, _rev, _clock = env
    for cid in ("c1", "c1", "c2"):
        grants.start(client_id=cid, login=LOGIN, scope="a b", resources=[], dpop_jkt=None)
    assert sorted((g.client_id, g.families) for g in grants.user_grants("u1")) == [("c1", 2), ("c2", 1)]
    assert grants.revoke_user("u1", "c1") == 2
    assert [g.client_id for g in grants.user_grants("u1")] == ["c2"]
    assert grants.revoke_user("u1") == 1


def test_rfc7009_and_rfc7662_hooks(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    _ctx, grants, _rev, clock = env
    fam = grants.start(client_id="c1", login=LOGIN, scope="s", resources=[], dpop_jkt=None)
    grants.record(fam, access_token=None, refresh_token="prt_x", scope="s")
    doc = grants.introspector("prt_x")
    assert doc is not None and doc["active"] is True and doc["sub"] == "u1" and doc["tenant"] == "acme"
    assert doc["exp"] == int(clock.now + 300)  # the idle limit comes first
    assert grants.introspector("not-ours") is None
    assert grants.revoker("prt_x", "someone-else") is True  # recognised, not revoked
    assert grants.introspector("prt_x") == doc
    assert grants.revoker("prt_x", "c1") is True
    assert grants.introspector("prt_x") == {"active": False}
    assert grants.revoker("not-ours", "c1") is False


def test_expiry_is_idle_or_absolute(env: tuple[AuthContext, Grants, Revocations, Clock]) -> None:
    _ctx, grants, _rev, clock = env
    fam = grants.start(client_id="c1", login=LOGIN, scope="s", resources=[], dpop_jkt=None)
    clock.now += 500
    grants.record(fam, access_token=None, refresh_token="prt_late", scope="s")
    rec = grants.lookup("prt_late")
    assert rec is not None and grants.expiry(rec) == rec.family_created_at + 600
    clock.now += 101
    assert grants.introspector("prt_late") == {"active": False}
