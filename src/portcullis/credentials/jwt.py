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

Verified tokens are cached by the SHA-256 of the signed part (the signature's text must
match too), bounded, never beyond `exp` plus the leeway.
"""

from __future__ import annotations

import asyncio
import binascii
import hashlib
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import orjson
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
_PADDING = {2: b"==", 3: b"="}
#: The 6-bit value of each base64url character (RFC 4648 §5), and of "+" and "/", which
#: the translation below gives them; 0 for the rest.
_B64_VALUE = [0] * 256
for _i, _c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"):
    _B64_VALUE[_c] = _i
_B64_VALUE[ord("+")], _B64_VALUE[ord("/")] = 62, 63


def b64decode(segment: bytes) -> bytes:
    """base64url without padding (RFC 7515 §2), canonical only; ValueError on anything else.

    Canonical: the unused low bits of the last character must be zero, so every byte
    string has exactly one encoding. Otherwise one token has several spellings that all
    verify, and anything keyed by the token's text (a revocation, a cache) can be
    sidestepped by re-spelling it (found by the Wycheproof JWS vectors).
    """
    # a2b_base64 in strict mode refuses everything outside the standard alphabet and
    # misplaced padding. One translate pass deletes "+", "/" and "=" (the only bytes it
    # would wrongly accept: they are not base64url) and maps "-_" to "+/"; a shorter
    # result means one of them was there. Cheaper than a regex over the segment.
    std = segment.translate(_TO_STD, b"+/=")
    if len(std) != len(segment):
        raise ValueError("not base64url")
    return _decode_translated(std)


def _decode_translated(std: bytes) -> bytes:
    """`b64decode` of a segment already translated to the standard alphabet by `_TO_STD`
    with "+", "/" and "=" deleted (and none deleted: the caller checked the length)."""
    rem = len(std) % 4
    if rem == 1:
        raise ValueError("not base64url")
    # The last character of a 2- or 3-character tail carries 4 or 2 unused low bits;
    # they must be zero (checked directly: re-encoding the segment cost more than the
    # decode itself on a 342-character RS256 signature).
    if rem and _B64_VALUE[std[-1]] & (0x0F if rem == 2 else 0x03):
        raise ValueError("non-canonical base64url")
    try:
        return binascii.a2b_base64(std + _PADDING[rem] if rem else std, strict_mode=True)
    except binascii.Error:
        raise ValueError("not base64url") from None


def _b64json(segment: bytes, decode: Callable[[bytes], bytes] = b64decode) -> dict[str, Any]:
    """A base64url JSON object (a JOSE header or JWT claims set); `jwt.malformed` otherwise.

    orjson rather than `json`: ~4x faster on this per-token path, and stricter where it
    matters: invalid UTF-8, lone surrogates, NaN/Infinity, integers beyond 64 bits and
    nesting deeper than 1024 are errors instead of values (or a RecursionError).
    """
    if not segment:
        raise JwtRefusal("jwt.malformed")
    try:
        doc = orjson.loads(decode(segment))
    except ValueError:  # orjson.JSONDecodeError is a ValueError
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

SignatureCheck = Callable[[PublicKey, bytes, bytes], bool]

# The key family of each concrete key class. `isinstance` against cryptography's ABCs
# costs ~0.3 µs per call (ABCMeta), a tenth of our own share of an RS256 verification;
# the classes are few, so their answers are remembered.
_KEY_KIND: dict[type, str | None] = {}


def key_kind(key: object) -> str | None:
    """"RSA", "EC" or "OKP" (Ed25519) for a `cryptography` public key; None otherwise."""
    cls = type(key)
    try:
        return _KEY_KIND[cls]
    except KeyError:
        kind = ("RSA" if isinstance(key, rsa.RSAPublicKey) else "EC" if isinstance(key, ec.EllipticCurvePublicKey)
                else "OKP" if isinstance(key, ed25519.Ed25519PublicKey) else None)
        _KEY_KIND[cls] = kind
        return kind


def _rsa_check(pad: padding.AsymmetricPadding, h: hashes.HashAlgorithm | utils.Prehashed) -> SignatureCheck:
    def check(key: PublicKey, signing_input: bytes, sig: bytes) -> bool:
        if key_kind(key) != "RSA":
            return False
        try:
            cast(rsa.RSAPublicKey, key).verify(sig, signing_input, pad, h)
        except InvalidSignature:
            return False
        return True
    return check


def _ec_check(curve: str, size: int, algorithm: ec.ECDSA) -> SignatureCheck:
    def check(key: PublicKey, signing_input: bytes, sig: bytes) -> bool:
        if key_kind(key) != "EC":
            return False
        key = cast(ec.EllipticCurvePublicKey, key)
        if key.curve.name != curve or len(sig) != 2 * size:
            return False
        # RFC 7518 §3.4: R || S, each `size` octets; r = s = 0 (CVE-2022-21449) fails in OpenSSL.
        der = utils.encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
        try:
            key.verify(der, signing_input, algorithm)
        except InvalidSignature:
            return False
        return True
    return check


def _eddsa_check(key: PublicKey, signing_input: bytes, sig: bytes) -> bool:
    if key_kind(key) != "OKP":
        return False
    try:
        cast(ed25519.Ed25519PublicKey, key).verify(sig, signing_input)
    except InvalidSignature:
        return False
    return True


#: The signature check of each allowed `alg`, chosen once per token by a dict lookup.
SIGNATURE_CHECKS: dict[str, SignatureCheck] = {
    **{alg: _rsa_check(pad, h) for alg, (pad, h) in _RSA_PARAMS.items()},
    **{alg: _ec_check(curve, size, _ECDSA[alg]) for alg, (curve, size) in _EC_CURVE.items()},
    "EdDSA": _eddsa_check, "Ed25519": _eddsa_check,
}
assert frozenset(SIGNATURE_CHECKS) == ALLOWED_ALGORITHMS

_PREHASHED_SHA256 = utils.Prehashed(hashes.SHA256())
#: The same checks for the SHA-256 algorithms, given the SHA-256 of the signing input
#: instead of the input: the verifier hashes header.payload anyway (its cache key), so
#: the primitive need not hash it again.
PREHASHED_SHA256_CHECKS: dict[str, SignatureCheck] = {
    "RS256": _rsa_check(_RSA_PARAMS["RS256"][0], _PREHASHED_SHA256),
    "PS256": _rsa_check(_RSA_PARAMS["PS256"][0], _PREHASHED_SHA256),
    "ES256": _ec_check(*_EC_CURVE["ES256"], ec.ECDSA(_PREHASHED_SHA256)),
}


def verify_signature(alg: str, key: PublicKey, signing_input: bytes, sig: bytes) -> bool:
    """Check a JWS signature with `cryptography` directly (RFC 7515 §5.2 step 8).

    Why not joserfc's `jwt.decode`: it re-parses the token and resolves the key per
    call, which measured 2-6x the cost of the signature itself (docs/benchmarks.md);
    keys are imported and validated once, with joserfc, when the JWKS is loaded. The
    key type (and curve) must fit the algorithm, so an `alg` header can never pick a
    primitive the key was not meant for (RFC 8725 §3.1). Unknown algorithms: False.
    """
    check = SIGNATURE_CHECKS.get(alg)
    return check is not None and check(key, signing_input, sig)


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

    def fresh(self) -> bool:
        """Loaded less than `jwks_ttl_seconds` ago."""
        return self._clock() - self._fetched_at < self.cfg.jwks_ttl_seconds

    async def key_for(self, kid: str | None) -> list[tuple[PublicKey, str | None]]:
        if self.keys is None:
            await self.refresh(forced=False)
        elif not self.fresh() and (
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


_MAX_HEADERS = 64


class KeysNeeded(Exception):
    """`JwtVerifier.verify_now` cannot go on before `source.key_for(kid)` is awaited."""

    def __init__(self, source: JwksCache, kid: str | None) -> None:
        super().__init__(source.cfg.issuer)
        self.source, self.kid = source, kid


@dataclass(slots=True)
class _Cached:
    principal: Principal
    exp: float
    sig: bytes  # the signature's text: a hit needs the same one


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
        # What a JOSE header says (alg, kid, typ), by the header segment's text, once it
        # passed the checks that do not depend on the issuer: an issuer's tokens share a
        # handful of headers, so this skips a base64url and JSON decode and those checks
        # per cold token. Refused headers are not kept; issuer checks run on every token.
        # Bounded: cleared when full, so a flood of distinct headers costs only misses.
        self._headers: dict[bytes, tuple[str, str | None, str | None]] = {}

    def add_issuer(self, source: JwksCache) -> None:
        """Trust one more issuer with its own key source (e.g. the gateway's own
        authorization server, whose keys come in-process rather than over HTTP)."""
        self.issuers[source.cfg.issuer] = source
        self._max_bytes = max(self._max_bytes, source.cfg.max_token_bytes)
        self._all_algorithms = self._all_algorithms | frozenset(source.cfg.algorithms)

    async def verify(self, token: bytes) -> Principal:
        """The token's Principal; raises `JwtRefusal` with the reason otherwise."""
        try:
            return self._verify(token, None)
        except KeysNeeded as need:
            return await self.resume(token, need)

    async def resume(self, token: bytes, need: KeysNeeded) -> Principal:
        """Finish a verification `verify_now` stopped with `need`: get the keys, verify."""
        return self._verify(token, await need.source.key_for(need.kid))

    def verify_now(self, token: bytes) -> Principal:
        """`verify` without waiting: the same checks and answers, except that it raises
        `KeysNeeded` where the issuer's keys must first be fetched or refreshed (then
        await `resume`). The request path calls this first: no coroutine per token."""
        return self._verify(token, None)

    def _verify(self, token: bytes, fetched: list[tuple[PublicKey, str | None]] | None) -> Principal:
        if len(token) > self._max_bytes:
            raise JwtRefusal("jwt.too_large")
        # The cache key is the SHA-256 of what the signature covers (header "." payload),
        # and a hit also needs the same signature text: one hash serves the cache, the
        # credential id (ECDSA signatures are malleable, the signed part is not) and, for
        # the SHA-256 algorithms, the signature check itself.
        dot = token.rfind(b".")
        digest = hashlib.sha256(token[:dot]).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit.exp and hit.sig == token[dot + 1:]:
                return hit.principal
            if now >= hit.exp:
                del self._cache[digest]
        # One translation of the whole token to the standard base64 alphabet (see
        # `b64decode`), rather than one per segment. A token with "+", "/" or "=" in it
        # is malformed; it takes the per-segment path, which refuses it at the same step
        # (and with the same reason) as before.
        std = token.translate(_TO_STD, b"+/=")
        clean = len(std) == len(token)
        decode = _decode_translated if clean else b64decode
        parts = (std if clean else token).split(b".")
        if len(parts) != 3:
            raise JwtRefusal("jwt.malformed")
        head, body, sig_b64 = parts
        hdr = self._headers.get(head) if clean else None
        if hdr is None:
            hdr = _header_facts(_b64json(head, decode), self._all_algorithms)
            if clean:
                if len(self._headers) >= _MAX_HEADERS:
                    self._headers.clear()
                self._headers[head] = hdr
        alg, kid, typ = hdr
        if not sig_b64:
            raise JwtRefusal("jwt.malformed")
        claims = _b64json(body, decode)
        iss = claims.get("iss")
        source = self.issuers.get(iss) if type(iss) is str else None
        if source is None:
            raise JwtRefusal("jwt.unknown_issuer")
        icfg = source.cfg
        if len(token) > icfg.max_token_bytes:
            raise JwtRefusal("jwt.too_large")
        if alg not in icfg.algorithms:
            raise JwtRefusal("jwt.alg_not_allowed")
        if icfg.require_typ is not None and typ not in ("at+jwt", "application/at+jwt"):
            raise JwtRefusal("jwt.bad_typ")  # RFC 9068 §4
        # The usual case inline (keys loaded, fresh, kid known); `key_for` does the rest:
        # first fetch, background refresh when stale, forced refresh on an unknown kid.
        keys = fetched
        if keys is None:
            ks = source.keys
            keys = ks.by_kid.get(kid) if ks is not None and kid is not None and source.fresh() else None
            if keys is None:
                raise KeysNeeded(source, kid)
        try:
            sig = decode(sig_b64)
        except ValueError:
            raise JwtRefusal("jwt.malformed") from None
        # Exactly two dots (three parts), so `dot` ends the payload: `digest` is the
        # SHA-256 of the signing input (RFC 7515 §5.2 step 8).
        check = PREHASHED_SHA256_CHECKS.get(alg)
        if check is not None:
            signed = digest
        else:
            check, signed = SIGNATURE_CHECKS[alg], token[:dot]  # every allowed alg has a check
        for key, declared in keys:
            if alg_fits_key(alg, declared) and check(key, signed, sig):
                break
        else:
            raise JwtRefusal("jwt.bad_signature")
        principal, exp = _claims_principal(claims, icfg, now, digest)
        if self.cfg.cache_size:
            self._cache[digest] = _Cached(principal, exp + icfg.leeway_seconds, token[dot + 1:])
            if len(self._cache) > self.cfg.cache_size:
                del self._cache[next(iter(self._cache))]
        return principal


def _header_facts(header: dict[str, Any], allowed: frozenset[str]) -> tuple[str, str | None, str | None]:
    """(alg, kid, lower-cased typ) of a JOSE header that passes the issuer-independent
    checks (RFC 8725 §3.1, RFC 7515 §4.1.11, RFC 9449 §4.2); `JwtRefusal` otherwise.
    Keys named by `jku`/`x5u`/`x5c`/`jwk` are not read at all (RFC 8725 §3.10)."""
    alg = header.get("alg")
    if type(alg) is not str or alg not in allowed:
        raise JwtRefusal("jwt.alg_not_allowed")  # `none` in any spelling stops here
    if header.get("crit") is not None:
        # We understand no extension parameters: any crit is unsupported (RFC 7515 §4.1.11).
        raise JwtRefusal("jwt.crit_unsupported")
    typ = header.get("typ")
    if typ is not None and type(typ) is not str:
        raise JwtRefusal("jwt.bad_typ")
    t = typ.lower() if typ else None
    if t in ("dpop+jwt", "application/dpop+jwt"):
        raise JwtRefusal("jwt.dpop_proof_as_token")
    kid = header.get("kid")
    if kid is not None and type(kid) is not str:
        raise JwtRefusal("jwt.malformed")
    return alg, kid, t


def _claims_principal(claims: dict[str, Any], icfg: JwtIssuerConfig, now: float,
                      signed_hash: bytes) -> tuple[Principal, float]:
    """Check the verified claims (RFC 7519 §4.1, RFC 9068 §2.2) and map them to the
    Principal; returns it with `exp`."""
    get: Callable[..., Any] = claims.get
    leeway = icfg.leeway_seconds
    exp = get("exp")
    if exp is None:
        raise JwtRefusal("jwt.missing_exp")
    if type(exp) not in _NUMBER_TYPES:
        raise JwtRefusal("jwt.malformed")
    expires = float(exp)
    if now >= expires + leeway:
        raise JwtRefusal("jwt.expired", "The access token has expired.")
    nbf = get("nbf")
    if nbf is not None and (type(nbf) not in _NUMBER_TYPES or now + leeway < nbf):
        raise JwtRefusal("jwt.not_yet_valid")
    iat = get("iat")
    if iat is not None and (type(iat) not in _NUMBER_TYPES or now + leeway < iat):
        raise JwtRefusal("jwt.issued_in_future")
    if get("iss") != icfg.issuer:  # exact, again, on the verified claims
        raise JwtRefusal("jwt.unknown_issuer")
    auds = audiences(get("aud"))
    if icfg.audience not in auds:
        raise JwtRefusal("jwt.bad_audience")
    if "nonce" in claims or "at_hash" in claims:
        raise JwtRefusal("jwt.id_token")  # an ID token is not an access token
    sub, tenant = subject_and_tenant(claims, icfg.tenant_claim, "jwt")
    scopes, roles = scopes_and_roles(claims, icfg.roles_claim)
    client = get("client_id", get("azp"))
    if type(client) is not str:
        client = None
    jti = get("jti")
    jkt, x5t = confirmation(get("cnf"), "jwt")
    auth_time = get("auth_time")
    # From a tuple in Principal's field order (0.35 µs against 1.4 µs with keywords
    # here); tests/unit/test_jwt.py checks every field of the result by name.
    principal = Principal._make((
        sub, tenant,
        jti if type(jti) is str and len(jti) <= 128 else "sha256:" + signed_hash[:12].hex(),  # credential_id
        "jwt", scopes, roles, client,
        None,  # rate_limit: per credential only for API keys
        jkt, x5t,
        # limit_key: rate limits follow the client (or subject) across its tokens, per issuer.
        f"jwt:{icfg.issuer}:{client}" if client is not None else f"jwt:{icfg.issuer}:sub:{sub}",
        None,  # signing_key_id: RFC 9421 keys are bound to API keys and clients, not tokens
        auds, str_claim(get("acr")), str_list_claim(get("amr")),
        float(auth_time) if type(auth_time) in _NUMBER_TYPES else None,
    ))
    return principal, expires


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


_NUMBER_TYPES = (int, float)
