"""The issuer's keyring: publication, rotation, retirement, encryption at rest, processes."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import KeySet, import_key

from portcullis.credentials.jwt import JwtRefusal
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.db import AuthDb
from portcullis.oauth.keys import KEK_FILE, RETIRE_LEEWAY, Keyring, KeyringJwks, issuer_config, signing_keys

ISS = "https://as.example"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def keyset(ring: Keyring) -> KeySet:
    doc: Any = ring.jwks()
    return KeySet.import_key_set(doc)


def make(tmp_path: Path, clock: Clock, alg: str = "ES256", **kw: object) -> Keyring:
    cfg = AuthServerConfig(issuer=ISS, signing_alg=alg, **kw)  # type: ignore[arg-type]
    ring = Keyring(cfg, AuthDb(tmp_path / "oauth.db"), tmp_path / "secrets", clock=clock)
    ring.refresh(force=True)
    return ring


def verify(token: str, ring: Keyring) -> dict[str, object]:
    tok = jwt.decode(token, keyset(ring), algorithms=[ring.alg])
    return dict(tok.claims)


@pytest.mark.parametrize("alg", ["ES256", "EdDSA"])
def test_first_key_signs_and_is_published_with_thumbprint_kid(tmp_path: Path, alg: str) -> None:
    ring = make(tmp_path, Clock(), alg)
    (jwk,) = ring.jwks()["keys"]
    assert "d" not in jwk and jwk["use"] == "sig" and jwk["alg"] == alg
    assert jwk["kid"] == import_key(jwk).thumbprint()  # RFC 7638, computed independently by joserfc
    token = ring.sign({"sub": "x", "n": 1}, "at+jwt")
    header = jwt.decode(token, keyset(ring), algorithms=[alg]).header
    assert header == {"alg": alg, "kid": jwk["kid"], "typ": "at+jwt"}
    assert verify(token, ring) == {"sub": "x", "n": 1}


def test_rotation_keeps_old_key_until_its_tokens_expired(tmp_path: Path) -> None:
    clock = Clock()
    ring = make(tmp_path, clock)
    old_kid = ring.current_kid()
    old_token = ring.sign({"sub": "a"}, "at+jwt")
    clock.now += 10
    new_kid = ring.rotate()
    assert new_kid != old_kid and ring.current_kid() == new_kid
    assert [k["kid"] for k in ring.jwks()["keys"]] == [old_kid, new_kid]
    assert verify(old_token, ring) == {"sub": "a"}  # still verifiable after rotation
    assert jwt.decode(ring.sign({}, "at+jwt"), keyset(ring)).header["kid"] == new_kid
    # Still there just before the retention ends (the longest token lifetime + leeway)...
    retention = max(ring._cfg.access_token_lifetime_seconds, ring._cfg.id_token_lifetime_seconds) + RETIRE_LEEWAY
    clock.now += retention - 1
    ring.refresh(force=True)
    assert old_kid in {k["kid"] for k in ring.jwks()["keys"]}
    # ... then dropped, and deleted from the store.
    clock.now += 2
    ring.maintain()
    assert [k["kid"] for k in ring.jwks()["keys"]] == [new_kid]
    with ring._db.engine.connect() as conn:
        assert conn.execute(sa.select(signing_keys.c.kid)).scalars().all() == [new_kid]


def test_scheduled_rotation_on_sign(tmp_path: Path) -> None:
    clock = Clock()
    ring = make(tmp_path, clock, key_rotation_days=1)
    first = ring.current_kid()
    clock.now += 86400 - 5
    ring.refresh(force=True)
    assert ring.current_kid() == first
    clock.now += 10
    ring.refresh(force=True)  # what sign() does at most every second
    token = ring.sign({}, "at+jwt")
    assert jwt.decode(token, keyset(ring)).header["kid"] != first
    assert len(ring.jwks()["keys"]) == 2


def test_private_keys_are_encrypted_at_rest(tmp_path: Path) -> None:
    ring = make(tmp_path, Clock())
    kek = tmp_path / "secrets" / KEK_FILE
    assert stat.S_IMODE(os.stat(kek).st_mode) == 0o600 and len(kek.read_bytes()) == 32
    key = ring._private[ring.current_kid()]
    der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    raw = b"".join(f.read_bytes() for f in tmp_path.glob("oauth.db*"))
    assert der not in raw and der[-32:] not in raw  # neither the key nor its private scalar
    with ring._db.engine.connect() as conn:
        blob = conn.execute(sa.select(signing_keys.c.private_enc)).scalar_one()
    assert der not in blob and b"PRIVATE" not in blob


def test_lost_kek_costs_one_rotation_not_the_published_keys(tmp_path: Path) -> None:
    clock = Clock()
    ring = make(tmp_path, clock)
    old_kid = ring.current_kid()
    (tmp_path / "secrets" / KEK_FILE).unlink()
    clock.now += 1
    other = make(tmp_path, clock)  # a new process: cannot decrypt the current key
    assert other.current_kid() != old_kid
    assert {k["kid"] for k in other.jwks()["keys"]} == {old_kid, other.current_kid()}
    # A key encrypted under another KEK cannot be swapped in: AES-GCM binds the blob to its kid.
    with other._db.begin() as conn:
        blob = conn.execute(sa.select(signing_keys.c.private_enc).where(
            signing_keys.c.kid == other.current_kid())).scalar_one()
    assert other._decrypt(old_kid, blob) is None


def test_processes_sharing_the_store_see_rotations(tmp_path: Path) -> None:
    clock = Clock()
    a = make(tmp_path, clock)
    b = make(tmp_path, clock)
    assert a.current_kid() == b.current_kid()  # the second process did not make its own key
    new = a.rotate()
    b.refresh(force=True)
    assert b.current_kid() == new
    assert len(b.jwks()["keys"]) == 2


def test_concurrent_first_start_makes_one_key(tmp_path: Path) -> None:
    clock = Clock()
    cfg = AuthServerConfig(issuer=ISS)
    rings = [Keyring(cfg, AuthDb(tmp_path / "oauth.db"), tmp_path / "secrets", clock=clock) for _ in range(4)]
    threads = [threading.Thread(target=r.refresh, kwargs={"force": True}) for r in rings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in rings:
        r.refresh(force=True)
    assert len({r.current_kid() for r in rings}) == 1
    with rings[0]._db.engine.connect() as conn:
        live = conn.execute(sa.select(signing_keys.c.kid).where(signing_keys.c.retired_at.is_(None))).all()
    assert len(live) == 1


def test_gateway_key_source_follows_rotation_at_once(tmp_path: Path) -> None:
    clock = Clock()
    ring = make(tmp_path, clock)
    other_process = make(tmp_path, clock)
    source = KeyringJwks(issuer_config(ring._cfg), ring)

    async def run() -> None:
        await source.refresh(forced=False)
        assert await source.key_for(ring.current_kid())
        new = other_process.rotate()  # rotated elsewhere: unknown here until the store is re-read
        assert await source.key_for(new)
        with pytest.raises(JwtRefusal) as exc:
            await source.key_for("not-a-kid")
        assert exc.value.reason == "jwt.unknown_kid"

    asyncio.run(run())


def test_issuer_config_is_strict() -> None:
    icfg = issuer_config(AuthServerConfig(issuer="https://gw.example", signing_alg="EdDSA", tenant_claim="org"))
    assert icfg.require_typ == "at+jwt" and icfg.algorithms == ["EdDSA"] and icfg.tenant_claim == "org"
    assert icfg.jwks_uri == "https://gw.example/oauth2/jwks" and icfg.audience == "https://gw.example"
