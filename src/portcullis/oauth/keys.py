"""The issuer's signing keyring (RFC 7515 signatures, RFC 7517 JWK Set, RFC 7638 `kid`).

One current key signs; rotation (`Keyring.rotate`, by command, or every
`key_rotation_days` on a schedule) makes a new current key and retires the old one.
A retired key stays published in `jwks()` until every token it may have signed has
expired: retired_at + the longest token lifetime (access or ID token) + `RETIRE_LEEWAY`
(verifiers' clock skew and JWKS caches, and the moment another process may still have
signed with it before noticing the rotation). Then it is dropped and deleted.

Keys live in the AuthDb (`oauth_signing_keys`): the public JWK in clear, the private
key as PKCS#8 encrypted with AES-256-GCM (the `kid` as associated data) under a 32-byte
key-encryption key in `secrets/as-signing-kek` (0600, created once). Losing that file
costs one rotation (a fresh key is made; old public keys stay published), never a
silent failure. Processes sharing the data directory see each other's rotations: the
store's revision is polled at most every `POLL_SECONDS`, and at once when asked to
(`refresh`), e.g. by a verifier meeting an unknown `kid`.

Signing uses `cryptography` directly with the key objects cached (ES256 costs one
ECDSA signature, ~40 µs); headers are encoded once per (key, typ).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, utils
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from portcullis.credentials.jwt import (
    IssuerKeys,
    JwksCache,
    JwtIssuerConfig,
    JwtRefusal,
    PublicKey,
    import_keys,
)
from portcullis.credentials.rfc9449 import jwk_thumbprint
from portcullis.oauth import db
from portcullis.oauth.config import AuthServerConfig
from portcullis.secretfile import create_once

log = logging.getLogger("portcullis.oauth.keys")

#: Published past the longest token lifetime: verifiers' leeway (≤ 300 s in our own
#: issuer config) and a process that signed just before it saw a rotation.
RETIRE_LEEWAY = 300.0
#: How often a keyring re-reads the store's revision (other processes' rotations).
POLL_SECONDS = 1.0
KEK_FILE = "as-signing-kek"

signing_keys = sa.Table(
    "oauth_signing_keys", db.metadata,
    sa.Column("kid", sa.String(64), primary_key=True),       # RFC 7638 thumbprint
    sa.Column("alg", sa.String(16), nullable=False),
    sa.Column("public_jwk", sa.Text, nullable=False),        # JSON, no private members
    sa.Column("private_enc", sa.LargeBinary, nullable=False),  # nonce(12) || AES-GCM(PKCS#8 DER)
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("retired_at", sa.Float, nullable=True),
)

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def load_kek(secrets_dir: Path) -> bytes:
    """The 32-byte key-encryption key (created once, 0600)."""
    path = secrets_dir / KEK_FILE
    if not path.exists():
        create_once(path, secrets.token_bytes(32))
    data = path.read_bytes()
    if len(data) < 32:
        raise ValueError(f"{path} is shorter than 32 bytes; move it aside to start with new signing keys")
    return data[:32]


def _generate(alg: str) -> PrivateKey:
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {alg!r}")


def public_jwk(key: PrivateKey, alg: str) -> dict[str, str]:
    """The public JWK with its RFC 7638 thumbprint as `kid` (RFC 7517 §4)."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        nums = key.public_key().public_numbers()
        jwk = {"kty": "EC", "crv": "P-256", "x": _b64(nums.x.to_bytes(32, "big")),
               "y": _b64(nums.y.to_bytes(32, "big"))}
    else:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        jwk = {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
    return {**jwk, "kid": jwk_thumbprint(jwk), "alg": alg, "use": "sig"}


@dataclass(frozen=True, slots=True)
class KeyRow:
    kid: str
    alg: str
    jwk: dict[str, str]
    created_at: float
    retired_at: float | None


class Keyring:
    """The issuer's keys: implements `service.SigningKeys`. Thread-safe."""

    def __init__(self, cfg: AuthServerConfig, adb: db.AuthDb, secrets_dir: Path, *,
                 clock: Callable[[], float] = time.time) -> None:
        self._cfg = cfg
        self._db = adb
        self._secrets_dir = secrets_dir
        self._clock = clock
        self._lock = threading.RLock()
        self._kek: bytes | None = None
        self._rev = -1
        self._checked = -1e18
        self._rows: list[KeyRow] = []
        self._current: KeyRow | None = None
        self._private: dict[str, PrivateKey] = {}
        self._headers: dict[tuple[str, str], bytes] = {}
        self._jwks: dict[str, Any] = {"keys": []}
        self._jwks_json = b'{"keys":[]}'
        #: Increments whenever the published set or the current key changes.
        self.version = 0

    # --- lifetimes ---
    @property
    def alg(self) -> str:
        return self._cfg.signing_alg

    @property
    def rotation_seconds(self) -> float:
        return self._cfg.key_rotation_days * 86400.0

    @property
    def retention_seconds(self) -> float:
        """How long a retired key stays published."""
        return max(self._cfg.access_token_lifetime_seconds, self._cfg.id_token_lifetime_seconds) + RETIRE_LEEWAY

    # --- encryption at rest ---
    def _aead(self) -> AESGCM:
        if self._kek is None:
            self._kek = load_kek(self._secrets_dir)
        return AESGCM(self._kek)

    def _encrypt(self, kid: str, key: PrivateKey) -> bytes:
        der = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        nonce = os.urandom(12)
        return nonce + self._aead().encrypt(nonce, der, kid.encode())

    def _decrypt(self, kid: str, blob: bytes) -> PrivateKey | None:
        try:
            der = self._aead().decrypt(blob[:12], blob[12:], kid.encode())
        except (InvalidTag, ValueError):
            return None
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            return None
        return key

    # --- store ---
    def _dropped_before(self, now: float) -> float:
        """Keys retired before this instant are no longer published."""
        return now - self.retention_seconds

    def _reload(self, conn: sa.Connection, now: float) -> None:
        rows = conn.execute(sa.select(signing_keys).order_by(signing_keys.c.created_at, signing_keys.c.kid)).all()
        keep = [KeyRow(r.kid, r.alg, json.loads(r.public_jwk), float(r.created_at),
                       None if r.retired_at is None else float(r.retired_at)) for r in rows]
        live = [k for k in keep if k.retired_at is None and k.alg == self.alg]
        current = live[-1] if live else None
        published = [k for k in keep if k.retired_at is None or k.retired_at >= self._dropped_before(now)]
        blobs = {r.kid: r.private_enc for r in rows}
        if current is not None and current.kid not in self._private:
            key = self._decrypt(current.kid, blobs[current.kid])
            if key is None:
                log.error("signing key %s cannot be decrypted (key-encryption key changed?); rotating", current.kid)
                current = None
            else:
                self._private[current.kid] = key
        changed = ([k.kid for k in published] != [k.kid for k in self._rows]
                   or (current and current.kid) != (self._current and self._current.kid))
        self._rows = published
        self._current = current
        if changed:
            self._jwks = {"keys": [k.jwk for k in published]}
            self._jwks_json = json.dumps(self._jwks, separators=(",", ":")).encode()
            self._private = {kid: k for kid, k in self._private.items() if any(r.kid == kid for r in published)}
            self.version += 1

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the store if its revision moved (at most every POLL_SECONDS unless
        `force`); make the first key, or rotate when the schedule says so."""
        mono = time.monotonic()
        if not force and mono - self._checked < POLL_SECONDS and self._current is not None:
            return
        with self._lock:
            self._checked = mono
            rev = self._db.revision()
            now = self._clock()
            if rev != self._rev or self._current is None:
                with self._db.engine.connect() as conn:
                    self._reload(conn, now)
                self._rev = rev
            if self._current is None or now - self._current.created_at >= self.rotation_seconds:
                self._rotate(scheduled=True)
            elif any(k.retired_at is not None and k.retired_at < self._dropped_before(now) for k in self._rows):
                self._purge()

    def _rotate(self, *, scheduled: bool) -> str:
        now = self._clock()
        key = _generate(self.alg)
        jwk = public_jwk(key, self.alg)
        kid = jwk["kid"]
        blob = self._encrypt(kid, key)
        with self._db.begin() as conn:
            # The write comes first: it takes SQLite's write lock, so the reads below see
            # any rotation another process committed meanwhile (no two new keys).
            self._db.bump(conn)
            live = conn.execute(sa.select(signing_keys).where(signing_keys.c.retired_at.is_(None))).all()
            fresh = sorted((r for r in live if r.alg == self.alg and now - float(r.created_at) < self.rotation_seconds
                            and self._decrypt(r.kid, r.private_enc) is not None),
                           key=lambda r: (float(r.created_at), r.kid))
            if scheduled and fresh:
                # Another process rotated first: keep its key (and retire any twin).
                kid = fresh[-1].kid
                conn.execute(signing_keys.update().where(signing_keys.c.retired_at.is_(None)
                                                         & (signing_keys.c.kid != kid)).values(retired_at=now))
            else:
                conn.execute(signing_keys.update().where(signing_keys.c.retired_at.is_(None))
                             .values(retired_at=now))
                conn.execute(signing_keys.insert().values(kid=kid, alg=self.alg, public_jwk=json.dumps(jwk),
                                                          private_enc=blob, created_at=now, retired_at=None))
                self._private[kid] = key
                log.info("signing key rotated: new kid %s (%s)", kid, "scheduled" if scheduled else "on request")
            conn.execute(signing_keys.delete().where(signing_keys.c.retired_at < self._dropped_before(now)))
            self._reload(conn, now)
        self._rev = self._db.revision()
        return kid

    def _purge(self) -> None:
        now = self._clock()
        with self._db.begin() as conn:
            conn.execute(signing_keys.delete().where(signing_keys.c.retired_at < self._dropped_before(now)))
            self._reload(conn, now)

    # --- public API ---
    def rotate(self) -> str:
        """Make a new current key now (CLI `portcullis oauth rotate-keys`); returns its kid."""
        with self._lock:
            return self._rotate(scheduled=False)

    def maintain(self) -> None:
        """Scheduled work: rotate when due, drop keys past their retention."""
        self.refresh(force=True)

    def current_kid(self) -> str:
        self.refresh()
        assert self._current is not None
        return self._current.kid

    def sign(self, claims: dict[str, Any], typ: str) -> str:
        """A compact JWS over `claims` with the current key (RFC 7515 §7.1)."""
        self.refresh()
        with self._lock:
            cur = self._current
            assert cur is not None
            key = self._private[cur.kid]
            header = self._headers.get((cur.kid, typ))
            if header is None:
                header = _b64(json.dumps({"alg": cur.alg, "kid": cur.kid, "typ": typ},
                                         separators=(",", ":")).encode()).encode()
                self._headers[(cur.kid, typ)] = header
        signing_input = header + b"." + _b64(json.dumps(claims, separators=(",", ":")).encode()).encode()
        if isinstance(key, ec.EllipticCurvePrivateKey):
            r, s = utils.decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 §3.4
        else:
            sig = key.sign(signing_input)
        return (signing_input + b"." + _b64(sig).encode()).decode("ascii")

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set: the current key and every retired key still needed."""
        self.refresh()
        return self._jwks

    def jwks_json(self) -> bytes:
        self.refresh()
        return self._jwks_json

    def rows(self) -> list[KeyRow]:
        """Published keys, oldest first (for the CLI's listing)."""
        self.refresh()
        return list(self._rows)

    def verification_keys(self) -> IssuerKeys:
        """The published keys, imported for verification (introspection, revocation)."""
        return import_keys(self.jwks())


def issuer_config(cfg: AuthServerConfig) -> JwtIssuerConfig:
    """How the gateway verifies this server's access tokens (RFC 9068 §4): `typ`
    at+jwt, the signing algorithm only, the configured audience and tenant claim."""
    # The keys come in-process (KeyringJwks), never over HTTP from this URL.
    return JwtIssuerConfig(issuer=cfg.issuer, jwks_uri=f"{cfg.issuer}/oauth2/jwks", audience=cfg.audience,
                           algorithms=[cfg.signing_alg], require_typ="at+jwt", tenant_claim=cfg.tenant_claim,
                           jwks_ttl_seconds=60, jwks_min_refresh_seconds=1)


class KeyringJwks(JwksCache):
    """The gateway's key source for its own issuer: the keyring itself, no HTTP.

    Re-imported only when the keyring's version moves; an unknown `kid` makes the
    keyring re-read the store at once (another process may just have rotated), at most
    every `unknown_kid_interval` seconds so random kids cannot turn into store reads.
    """

    def __init__(self, cfg: JwtIssuerConfig, keyring: Keyring, unknown_kid_interval: float = 0.1) -> None:
        super().__init__(cfg, fetch=lambda _url: keyring.jwks_json())
        self._keyring = keyring
        self._version = -1
        self._interval = unknown_kid_interval
        self._forced_at = -1e18

    def _sync(self, *, force: bool = False) -> None:
        self._keyring.refresh(force=force)
        if self._keyring.version != self._version or self.keys is None:
            self.keys = import_keys(self._keyring.jwks())
            self._version = self._keyring.version

    async def refresh(self, *, forced: bool) -> None:
        self._sync(force=forced)

    async def key_for(self, kid: str | None) -> list[tuple[PublicKey, str | None]]:
        self._sync()
        if kid is not None and not self._has(kid):
            now = time.monotonic()
            if now - self._forced_at >= self._interval:
                self._forced_at = now
                self._sync(force=True)
            if not self._has(kid):
                raise JwtRefusal("jwt.unknown_kid")
        assert self.keys is not None
        return self.keys.candidates(kid)
