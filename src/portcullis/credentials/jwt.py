"""JWT access tokens from trusted issuers (RFC 7519, RFC 9068, RFC 8725 best practices).

Verification is strict and in a fixed order; each refusal has its own audit reason:

1. Size bound and compact-JWS shape (three base64url segments) before any parsing.
2. The header: `alg` must be in the issuer's allowlist (never ``none``, never HMAC —
   RFC 8725 §3.1/§3.2: an issuer's *public* key must never verify an HMAC); unknown
   ``crit`` parameters are refused (RFC 7515 §4.1.11); keys named by ``jku``, ``x5u``,
   ``x5c`` or ``jwk`` are never used (§3.10: only keys from the configured JWKS);
   ``typ`` must be ``at+jwt`` when the issuer requires it (RFC 9068 §4), and tokens
   typed as DPoP proofs are never access tokens (RFC 9449 §4.2).
3. The issuer is chosen by the token's `iss`, compared exactly against the config (no
   prefix match); the unverified payload is read only for that choice.
4. The key comes from that issuer's JWKS by `kid` (keys imported and validated once by
   joserfc); the signature is checked with `cryptography` for the allowlisted
   algorithm, and only with a key of the matching type and curve.
5. Claims (RFC 7519 §4.1, RFC 9068 §2.2): `exp` required; `exp`/`nbf`/`iat` with
   explicit leeway; `aud` must contain the configured audience; ID tokens (`nonce`,
   `at_hash`) are refused as access tokens; a DPoP-bound token (`cnf.jkt`) presented as
   Bearer is refused (RFC 9449 §7.1).

Verified tokens are cached by the SHA-256 of the token, bounded, never beyond `exp`
plus the leeway.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import re
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.exchange import Principal

log = logging.getLogger("portcullis.jwt")

# Public-key algorithms only: an HMAC "secret" known to the gateway is not how third-
# party issuers sign, and allowing HS* is the root of the RS/HS key-confusion attack.
ALLOWED_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
                                "ES256", "ES384", "ES512", "EdDSA", "Ed25519"})
MAX_JWKS_BYTES = 1024 * 1024
_B64URL = re.compile(rb"[A-Za-z0-9_-]*")


class JwtIssuerConfig(BaseModel):
    """One trusted issuer. Exactly one key source: discovery, `jwks_uri` or `jwks_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuer: str = Field(min_length=1, max_length=2048)
    discovery: bool = False
    jwks_uri: str | None = None
    jwks_file: str | None = None
    audience: str = Field(min_length=1, max_length=2048)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA", "Ed25519"], min_length=1)
    require_typ: Literal["at+jwt"] | None = None
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    max_token_bytes: int = Field(default=8192, ge=256, le=65536)
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    jwks_ttl_seconds: float = Field(default=300, ge=10, le=86400)
    jwks_min_refresh_seconds: float = Field(default=30, ge=1, le=3600)

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        return check_algorithms(v)

    @model_validator(mode="after")
    def _one_source(self) -> JwtIssuerConfig:
        sources = [self.discovery, self.jwks_uri is not None, self.jwks_file is not None]
        if sum(sources) != 1:
            raise ValueError("give exactly one key source: discovery: true, jwks_uri or jwks_file")
        for url in (self.jwks_uri, self.issuer if self.discovery else None):
            if url is not None and not safe_key_url(url):
                raise ValueError(f"{url!r}: keys must be fetched over https (plain http only on loopback)")
        return self


class JwtConfig(BaseModel):
    """Trusted issuers and the verified-token cache."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    issuers: list[JwtIssuerConfig] = Field(min_length=1)
    cache_size: int = Field(default=100_000, ge=0, le=10_000_000)

    @field_validator("issuers")
    @classmethod
    def _unique(cls, v: list[JwtIssuerConfig]) -> list[JwtIssuerConfig]:
        seen = [i.issuer for i in v]
        if len(seen) != len(set(seen)):
            raise ValueError("an issuer appears twice")
        return v


class JwtRefusal(Exception):
    """A token is refused; `reason` is the audit reason code."""

    def __init__(self, reason: str, detail: str = "The access token is not valid.") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


_TO_STD = bytes.maketrans(b"-_", b"+/")
#: The 6-bit value of each base64url character (RFC 4648 §5); 0 for the rest.
_B64_VALUE = [0] * 256
for _i, _c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
    _B64_VALUE[_c] = _i


def b64decode(segment: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2), canonical only; ValueError on anything else.

    Canonical: the unused low bits of the last character must be zero, so every byte
    string has exactly one encoding. Otherwise one token has several spellings that all
    verify, and anything keyed by the token's text (a revocation, a cache) can be
    sidestepped by re-spelling it (found by the Wycheproof JWS vectors).
    """
    rem = len(segment) % 4
    if rem == 1 or not _B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    # The last character of a 2- or 3-character tail carries 4 or 2 unused low bits;
    # they must be zero (checked directly: re-encoding the segment cost more than the
    # decode itself on a 342-character RS256 signature).
    if rem and _B64_VALUE[segment[-1]] & (0x0F if rem == 2 else 0x03):
        raise ValueError("non-canonical base64url")
    try:
        return binascii.a2b_base64(segment.translate(_TO_STD) + b"=" * (-rem % 4), strict_mode=True)
    except binascii.Error:
        raise ValueError("not base64url") from None


def _b64json(segment: bytes) -> dict[str, Any]:
    if not segment:
        raise JwtRefusal("jwt.malformed")
    try:
        doc = json.loads(b64decode(segment).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise JwtRefusal("jwt.malformed") from None
    if not isinstance(doc, dict):
        raise JwtRefusal("jwt.malformed")
    return doc


def check_algorithms(algorithms: list[str]) -> list[str]:
    """A configured algorithm list: public-key algorithms only (never `none` or HMAC), no repeats."""
    for alg in algorithms:
        if alg not in ALLOWED_ALGORITHMS:
            allowed = ", ".join(sorted(ALLOWED_ALGORITHMS))
            raise ValueError(f"algorithm {alg!r} is not allowed (never 'none' or HMAC); choose from {allowed}")
    if len(set(algorithms)) != len(algorithms):
        raise ValueError("an algorithm appears twice")
    return algorithms


def scopes_and_roles(claims: dict[str, Any], roles_claim: str) -> tuple[frozenset[str], frozenset[str]]:
    """Scopes from ``scope`` (space-separated, RFC 8693 §4.2) or ``scp`` (array, or a string as some
    issuers send it), and roles from `roles_claim` (an array of strings; anything else is ignored)."""
    scope, scp = claims.get("scope"), claims.get("scp")
    if isinstance(scope, str):
        scopes = frozenset(scope.split())
    elif isinstance(scp, list) and all(isinstance(s, str) for s in scp):
        scopes = frozenset(scp)
    elif isinstance(scp, str):  # e.g. Microsoft Entra ID
        scopes = frozenset(scp.split())
    else:
        scopes = frozenset()
    raw = claims.get(roles_claim)
    roles = frozenset(r for r in raw if isinstance(r, str)) if isinstance(raw, list) else frozenset()
    return scopes, roles


Fetch = Callable[[str], bytes]
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def safe_key_url(url: str) -> bool:
    """https, or plain http to a loopback host only; judged on the parsed URL, so
    ``http://127.0.0.1@evil.example`` or ``http://localhost.evil.example`` do not pass."""
    try:
        u = urlsplit(url)
        u.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return False
    if u.username is not None or u.password is not None or not u.hostname:
        return False
    return u.scheme == "https" or (u.scheme == "http" and u.hostname in _LOOPBACK)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Key documents are fetched from the configured URL only: a redirect could lead
    anywhere (another host, plain http), so it is an error, not followed."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

# RFC 7518 §3.1 (and RFC 8037 §3.1, RFC 9864 for Ed25519): what each `alg` means.
_HASH: dict[str, type[hashes.HashAlgorithm]] = {"256": hashes.SHA256, "384": hashes.SHA384, "512": hashes.SHA512}
_EC_CURVE = {"ES256": ("secp256r1", 32), "ES384": ("secp384r1", 48), "ES512": ("secp521r1", 66)}
MIN_RSA_BITS = 2048  # RFC 7518 §3.3
# The padding and hash objects are immutable: made once, not per verification.
_RSA_PARAMS: dict[str, tuple[padding.AsymmetricPadding, hashes.HashAlgorithm]] = {
    **{f"RS{n}": (padding.PKCS1v15(), h()) for n, h in _HASH.items()},
    # RFC 7518 §3.5: PSS with MGF1 over the same hash and a salt as long as the hash.
    **{f"PS{n}": (padding.PSS(padding.MGF1(h()), h().digest_size), h()) for n, h in _HASH.items()},
}
_ECDSA = {alg: ec.ECDSA(_HASH[alg[2:]]()) for alg in _EC_CURVE}


def verify_signature(alg: str, key: PublicKey, signing_input: bytes, sig: bytes) -> bool:
    """Check a JWS signature with `cryptography` directly (RFC 7515 §5.2 step 8).

    Why not joserfc's `jwt.decode`: it re-parses the token and resolves the key per
    call, which measured 2-6x the cost of the signature itself (docs/benchmarks.md);
    keys are imported and validated once, with joserfc, when the JWKS is loaded. The
    key type must fit the algorithm, so an `alg` header can never pick a primitive
    the key was not meant for (RFC 8725 §3.1).
    """
    try:
        if alg.startswith(("RS", "PS")):
            if not isinstance(key, rsa.RSAPublicKey):
                return False
            pad, h = _RSA_PARAMS[alg]
            key.verify(sig, signing_input, pad, h)
            return True
        if alg in _EC_CURVE:
            curve, size = _EC_CURVE[alg]
            if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != curve or len(sig) != 2 * size:
                return False
            # RFC 7518 §3.4: R || S, each `size` octets; r = s = 0 (CVE-2022-21449) fails in OpenSSL.
            der = utils.encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
            key.verify(der, signing_input, _ECDSA[alg])
            return True
        if alg in ("EdDSA", "Ed25519"):
            if not isinstance(key, ed25519.Ed25519PublicKey):
                return False
            key.verify(sig, signing_input)
            return True
    except InvalidSignature:
        return False
    return False


@dataclass(frozen=True, slots=True)
class IssuerKeys:
    """An issuer's verification keys by `kid` (None: keys published without one)."""

    by_kid: dict[str | None, list[tuple[PublicKey, str | None]]]

    def candidates(self, kid: str | None) -> list[tuple[PublicKey, str | None]]:
        if kid is not None:
            return self.by_kid.get(kid, [])
        return [k for keys in self.by_kid.values() for k in keys]

    def has(self, kid: str) -> bool:
        return kid in self.by_kid


def import_keys(doc: Any) -> IssuerKeys:
    """Public signing keys from a JWK Set document; private, symmetric, encryption-only
    and too-small keys are left out (a misconfiguration, and an `oct` key would enable
    HMAC confusion)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("not a JWK Set")
    usable = [k for k in doc["keys"] if isinstance(k, dict) and k.get("kty") in ("RSA", "EC", "OKP")
              and "d" not in k and k.get("use", "sig") == "sig"]
    by_kid: dict[str | None, list[tuple[PublicKey, str | None]]] = {}
    for entry in usable:
        declared = entry.get("alg")
        if declared is not None and declared not in ALLOWED_ALGORITHMS:
            # RFC 8725 §3.1: a key is for its one algorithm; one we do not allow (or
            # know) makes the key unusable here, rather than usable for any algorithm.
            log.warning("JWKS key %r skipped: algorithm %r not allowed", entry.get("kid"), declared)
            continue
        try:
            jwk = KeySet.import_key_set({"keys": [entry]}).keys[0]
            pub = jwk.get_op_key("verify")
        except (JoseError, ValueError, KeyError, TypeError) as exc:
            # One odd key (unknown curve, bad encoding) must not take the others down.
            log.warning("JWKS key %r skipped: %s", entry.get("kid"), type(exc).__name__)
            continue
        if isinstance(pub, rsa.RSAPublicKey) and pub.key_size < MIN_RSA_BITS:
            continue
        if isinstance(pub, rsa.RSAPublicKey) and roca_fingerprint(pub.public_numbers().n):
            log.warning("JWKS key %r skipped: RSA modulus with the ROCA fingerprint (CVE-2017-15361)",
                        entry.get("kid"))
            continue
        if isinstance(pub, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            by_kid.setdefault(jwk.kid, []).append((pub, declared))
    return IssuerKeys(by_kid)


# ROCA (CVE-2017-15361; Nemec et al., CCS 2017): RSA moduli from the affected Infineon
# library are factorable. Their fingerprint: N mod p lies in the subgroup generated by
# 65537 modulo p for every small prime p below (a random modulus passes all 38 with
# probability about 2^-154). Written here because the one package for it (roca-detect)
# has not been maintained since 2018.
_ROCA_PRIMES = (3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71, 73, 79, 83, 89, 97,
                101, 103, 107, 109, 113, 127, 131, 137, 139, 149, 151, 157, 163, 167)


def _subgroup(p: int) -> frozenset[int]:
    out, x = set(), 1
    while x not in out:
        out.add(x)
        x = x * 65537 % p
    return frozenset(out)


_ROCA_SUBGROUPS = tuple((p, _subgroup(p)) for p in _ROCA_PRIMES)


def roca_fingerprint(n: int) -> bool:
    """True if the RSA modulus `n` has the ROCA fingerprint (a factorable key)."""
    return all(n % p in group for p, group in _ROCA_SUBGROUPS)


_EDDSA_NAMES = frozenset({"EdDSA", "Ed25519"})  # RFC 9864: Ed25519 is EdDSA with that curve


def alg_fits_key(alg: str, declared: str | None) -> bool:
    """A key that declares an `alg` (RFC 7517 §4.4) verifies only that algorithm."""
    return declared is None or declared == alg or (declared in _EDDSA_NAMES and alg in _EDDSA_NAMES)


def http_fetch(url: str) -> bytes:
    """GET `url` (bounded size, 5 s timeout); raises OSError/ValueError on failure."""
    # The scheme is https (or http on loopback), checked by JwtIssuerConfig.
    if not safe_key_url(url):
        raise ValueError("refusing to fetch keys from a non-https URL")
    req = urllib.request.Request(url, headers={"Accept": "application/json", "User-Agent": "portcullis"})  # noqa: S310
    opener = urllib.request.build_opener(_NoRedirects)
    with opener.open(req, timeout=5) as resp:
        data: bytes = resp.read(MAX_JWKS_BYTES + 1)
    if len(data) > MAX_JWKS_BYTES:
        raise ValueError("document too large")
    return data


class JwksCache:
    """One issuer's keys: cached for `ttl`, refreshed on an unknown `kid` at most once
    per `min_refresh` (a flood of random kids cannot hammer the issuer), and served
    stale while the issuer is unreachable."""

    def __init__(self, cfg: JwtIssuerConfig, fetch: Fetch = http_fetch,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self._fetch = fetch
        self._clock = clock
        self.keys: IssuerKeys | None = None
        self._fetched_at = -1e18
        self._attempted_at = -1e18
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.fetches = 0

    def _jwks_url(self) -> str:
        if self.cfg.jwks_uri is not None:
            return self.cfg.jwks_uri
        issuer = self.cfg.issuer
        u = urlsplit(issuer)
        path = u.path.rstrip("/")
        # OIDC Discovery 1.0 §4.1 appends to the issuer; RFC 8414 §3.1 inserts the
        # well-known segment between the host and the issuer's path.
        candidates = (issuer.rstrip("/") + "/.well-known/openid-configuration",
                      f"{u.scheme}://{u.netloc}/.well-known/oauth-authorization-server{path}")
        for url in candidates:
            try:
                meta = json.loads(self._fetch(url))
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict):
                continue
            jwks_uri = meta.get("jwks_uri")
            # RFC 8414 §3.3: the issuer in the metadata must match exactly.
            if meta.get("issuer") == issuer and isinstance(jwks_uri, str) and safe_key_url(jwks_uri):
                return jwks_uri
        raise ValueError("discovery failed")

    def _load(self) -> IssuerKeys:
        if self.cfg.jwks_file is not None:
            with open(self.cfg.jwks_file, "rb") as f:
                raw = f.read(MAX_JWKS_BYTES + 1)
        else:
            raw = self._fetch(self._jwks_url())
        if len(raw) > MAX_JWKS_BYTES:
            raise ValueError("JWKS too large")
        return import_keys(json.loads(raw))

    async def refresh(self, *, forced: bool) -> None:
        async with self._lock:
            now = self._clock()
            # At most one attempt per interval, forced or not: while the issuer is down
            # requests must not queue up behind one fetch after another.
            if now - self._attempted_at < self.cfg.jwks_min_refresh_seconds:
                return
            if not forced and now - self._fetched_at < self.cfg.jwks_ttl_seconds:
                return
            self._attempted_at = now
            self.fetches += 1
            try:
                self.keys = await asyncio.to_thread(self._load)
                self._fetched_at = now
            except (OSError, ValueError, JoseError) as exc:
                # Keep serving the last good keys (stale) while the issuer is down.
                log.warning("JWKS for %s unavailable: %s", self.cfg.issuer, type(exc).__name__)

    async def key_for(self, kid: str | None) -> list[tuple[PublicKey, str | None]]:
        if self.keys is None:
            await self.refresh(forced=False)
        elif self._clock() - self._fetched_at >= self.cfg.jwks_ttl_seconds and (
                self._background is None or self._background.done()):
            # Stale keys keep serving while fresh ones are fetched off the request path.
            self._background = asyncio.get_running_loop().create_task(self.refresh(forced=False))
        if self.keys is None:
            raise JwtRefusal("jwt.jwks_unavailable", "The token issuer's keys are unavailable.")
        if kid is not None and not self._has(kid):
            await self.refresh(forced=True)
            if not self._has(kid):
                raise JwtRefusal("jwt.unknown_kid")
        return self.keys.candidates(kid)

    def _has(self, kid: str) -> bool:
        return self.keys is not None and self.keys.has(kid)


@dataclass(slots=True)
class _Cached:
    principal: Principal
    exp: float


class JwtVerifier:
    """Verifies access tokens against the configured issuers."""

    def __init__(self, cfg: JwtConfig, fetch: Fetch = http_fetch, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        self.issuers = {i.issuer: JwksCache(i, fetch) for i in cfg.issuers}
        self._max_bytes = max(i.max_token_bytes for i in cfg.issuers)
        self._all_algorithms = frozenset(a for i in cfg.issuers for a in i.algorithms)
        # A plain dict: insertion-ordered, so the oldest entry is the first (FIFO eviction),
        # and its lookups are faster than OrderedDict's on this per-request path.
        self._cache: dict[bytes, _Cached] = {}

    def add_issuer(self, source: JwksCache) -> None:
        """Trust one more issuer with its own key source (e.g. the gateway's own
        authorization server, whose keys come in-process rather than over HTTP)."""
        self.issuers[source.cfg.issuer] = source
        self._max_bytes = max(self._max_bytes, source.cfg.max_token_bytes)
        self._all_algorithms = self._all_algorithms | frozenset(source.cfg.algorithms)

    async def verify(self, token: bytes) -> Principal:
        """The token's Principal; raises `JwtRefusal` with the reason otherwise."""
        if len(token) > self._max_bytes:
            raise JwtRefusal("jwt.too_large")
        digest = hashlib.sha256(token).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit.exp:
                return hit.principal
            del self._cache[digest]
        parts = token.split(b".")
        if len(parts) != 3:
            raise JwtRefusal("jwt.malformed")
        header = _b64json(parts[0])
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._all_algorithms:
            raise JwtRefusal("jwt.alg_not_allowed")  # `none` in any spelling stops here
        if not parts[2]:
            raise JwtRefusal("jwt.malformed")
        payload = _b64json(parts[1])
        iss = payload.get("iss")
        source = self.issuers.get(iss) if isinstance(iss, str) else None
        if source is None:
            raise JwtRefusal("jwt.unknown_issuer")
        icfg = source.cfg
        if len(token) > icfg.max_token_bytes:
            raise JwtRefusal("jwt.too_large")
        self._check_header(header, icfg)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtRefusal("jwt.malformed")
        keys = await source.key_for(kid)
        try:
            sig = b64decode(parts[2])
        except ValueError:
            raise JwtRefusal("jwt.malformed") from None
        signing_input = parts[0] + b"." + parts[1]
        alg = header["alg"]
        if not any(verify_signature(alg, k, signing_input, sig) for k, declared in keys if alg_fits_key(alg, declared)):
            raise JwtRefusal("jwt.bad_signature")
        claims = payload
        exp = self._check_claims(claims, icfg, now)
        # The credential id of a token without `jti` hashes what the signature covers
        # (header.payload), not the token's text: ECDSA signatures are malleable, so the
        # text is not unique, but the signed part is.
        principal = self._principal(claims, icfg, signing_input)
        if self.cfg.cache_size:
            self._cache[digest] = _Cached(principal, exp + icfg.leeway_seconds)
            if len(self._cache) > self.cfg.cache_size:
                del self._cache[next(iter(self._cache))]
        return principal

    @staticmethod
    def _check_header(header: dict[str, Any], icfg: JwtIssuerConfig) -> None:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in icfg.algorithms:
            raise JwtRefusal("jwt.alg_not_allowed")
        crit = header.get("crit")
        if crit is not None:
            # We understand no extension parameters: any crit is unsupported (RFC 7515 §4.1.11).
            raise JwtRefusal("jwt.crit_unsupported")
        typ = header.get("typ")
        if typ is not None and not isinstance(typ, str):
            raise JwtRefusal("jwt.bad_typ")
        t = typ.lower() if typ else None
        if t in ("dpop+jwt", "application/dpop+jwt"):
            raise JwtRefusal("jwt.dpop_proof_as_token")
        if icfg.require_typ is not None and t not in ("at+jwt", "application/at+jwt"):
            raise JwtRefusal("jwt.bad_typ")

    @staticmethod
    def _check_claims(claims: dict[str, Any], icfg: JwtIssuerConfig, now: float) -> float:
        leeway = icfg.leeway_seconds
        exp = claims.get("exp")
        if exp is None:
            raise JwtRefusal("jwt.missing_exp")
        if not _is_number(exp):
            raise JwtRefusal("jwt.malformed")
        if now >= float(exp) + leeway:
            raise JwtRefusal("jwt.expired", "The access token has expired.")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or now + leeway < float(nbf)):
            raise JwtRefusal("jwt.not_yet_valid")
        iat = claims.get("iat")
        if iat is not None and (not _is_number(iat) or now + leeway < float(iat)):
            raise JwtRefusal("jwt.issued_in_future")
        if claims.get("iss") != icfg.issuer:  # exact, again, on the verified claims
            raise JwtRefusal("jwt.unknown_issuer")
        if icfg.audience not in audiences(claims.get("aud")):
            raise JwtRefusal("jwt.bad_audience")
        if "nonce" in claims or "at_hash" in claims:
            raise JwtRefusal("jwt.id_token")  # an ID token is not an access token
        return float(exp)

    @staticmethod
    def _principal(claims: dict[str, Any], icfg: JwtIssuerConfig, signing_input: bytes) -> Principal:
        sub, tenant = subject_and_tenant(claims, icfg.tenant_claim, "jwt")
        scopes, roles = scopes_and_roles(claims, icfg.roles_claim)
        client = claims.get("client_id", claims.get("azp"))
        jti = claims.get("jti")
        jkt, x5t = confirmation(claims.get("cnf"), "jwt")
        return Principal(
            subject=sub, tenant=tenant,
            credential_id=(jti if isinstance(jti, str) and len(jti) <= 128
                           else "sha256:" + hashlib.sha256(signing_input).digest()[:12].hex()),
            credential_kind="jwt", scopes=scopes, roles=roles,
            client_id=client if isinstance(client, str) else None, cnf_jkt=jkt, cnf_x5t=x5t,
            audiences=audiences(claims.get("aud")), acr=str_claim(claims.get("acr")),
            amr=str_list_claim(claims.get("amr")),
            auth_time=float(claims["auth_time"]) if _is_number(claims.get("auth_time")) else None,
            # Rate limits follow the client (or subject) across its tokens, per issuer.
            limit_key=f"jwt:{icfg.issuer}:{client if isinstance(client, str) else 'sub:' + sub}",
        )


def confirmation(cnf: object, prefix: str) -> tuple[str | None, str | None]:
    """The `cnf` (RFC 7800 §3.1) DPoP key and certificate thumbprints; the stage enforces them.

    A `cnf` that is present but unusable is refused, never ignored: ignoring it would
    turn a sender-constrained token into a bearer token.
    """
    if cnf is None:
        return None, None
    if not isinstance(cnf, dict):
        raise JwtRefusal(f"{prefix}.malformed")
    jkt, x5t = cnf.get("jkt"), cnf.get("x5t#S256")
    for v in (jkt, x5t):
        if v is not None and (not isinstance(v, str) or not 20 <= len(v) <= 128):
            raise JwtRefusal(f"{prefix}.malformed")
    if jkt is None and x5t is None:
        raise JwtRefusal(f"{prefix}.unsupported_cnf")
    return jkt, x5t


def subject_and_tenant(claims: dict[str, Any], tenant_claim: str, prefix: str) -> tuple[str, str]:
    """`sub` and the tenant claim, both required non-empty strings (`<prefix>.missing_*`)."""
    sub, tenant = claims.get("sub"), claims.get(tenant_claim)
    if not isinstance(sub, str) or not sub:
        raise JwtRefusal(f"{prefix}.missing_sub")
    if not isinstance(tenant, str) or not tenant:
        raise JwtRefusal(f"{prefix}.missing_tenant")
    return sub, tenant


def audiences(aud: object) -> frozenset[str]:
    """The `aud` claim as a set: a string or an array of strings (RFC 7519 §4.1.3)."""
    if isinstance(aud, str):
        return frozenset({aud})
    if isinstance(aud, list):
        return frozenset(a for a in aud if isinstance(a, str))
    return frozenset()


def str_claim(v: object) -> str | None:
    return v if isinstance(v, str) and len(v) <= 256 else None


def str_list_claim(v: object) -> tuple[str, ...]:
    return tuple(x for x in v if isinstance(x, str))[:16] if isinstance(v, list) else ()


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
