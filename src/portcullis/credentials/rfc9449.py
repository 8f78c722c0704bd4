"""DPoP proofs checked at the resource server (RFC 9449, OAuth 2.0 Demonstrating Proof of Possession).

A DPoP-bound access token (``Authorization: DPoP <token>``, RFC 9449 §7.1) is usable only
together with a ``DPoP`` header: a JWT signed by the client's private key, carrying the
public key in its ``jwk`` header and naming the request it was made for. `DpopVerifier`
checks one such proof; the caller checks the access token (`portcullis.credentials.jwt`)
and passes its ``cnf.jkt`` as ``expected_jkt``.

RFC 9449 §4.3: "To validate a DPoP proof, the receiving server MUST ensure the following"
(numbers below are that list's), and "These checks may be performed in any order." Ours
are in this fixed order, each refusal with its own audit reason:

====================  ===============================================================
reason                check
====================  ===============================================================
dpop.missing          no proof at all
dpop.multiple         (1) "There is not more than one DPoP HTTP request header field."
                      A comma in the value is two values joined (RFC 9110 §5.3).
dpop.too_large        `DpopConfig.max_proof_bytes`, before any parsing
dpop.malformed        (2) "...a single and well-formed JWT": three base64url segments,
                      JSON objects without duplicate members or NaN/Infinity
dpop.crit_unsupported no ``crit`` header: we understand no extension (RFC 7515 §4.1.11)
dpop.bad_typ          (4) "The typ JOSE Header Parameter has the value dpop+jwt."
dpop.alg_not_allowed  (5) "...a registered asymmetric digital signature algorithm ...,
                      is not none, is supported by the application, and is acceptable
                      per local policy." (`none` in any spelling and HS* never are)
dpop.no_jwk           §4.2: the ``jwk`` header is REQUIRED
dpop.private_key      (7) "The jwk JOSE Header Parameter does not contain a private key."
                      (``d``, ``p``, ``q``, ``dp``, ``dq``, ``qi``, ``oth``, ``k``/``oct``)
dpop.bad_jwk          not an RSA (2048-8192 bits), EC P-256/384/521 or Ed25519 public key
dpop.bad_signature    (6) "The JWT signature verifies with the public key contained in
                      the jwk JOSE Header Parameter." (key type/curve must fit `alg`)
dpop.missing_jti      (3) §4.2 ``jti`` is REQUIRED; dpop.bad_jti: longer than 256
dpop.htm_mismatch     (8) "The htm claim matches the HTTP method of the current request."
dpop.htu_mismatch     (9) "The htu claim matches the HTTP URI value for the HTTP request
                      in which the JWT was received, ignoring any query and fragment
                      parts." Both sides go through `normalize_htu`.
dpop.missing_iat      (3) §4.2 ``iat`` is REQUIRED (a NumericDate)
dpop.stale            (11) "The creation time of the JWT ... is within an acceptable
dpop.future           window (see Section 11.1)": [now - max_age - skew, now + skew]
dpop.ath_missing      (12) "ensure that the value of the ath claim equals the hash of
dpop.ath_mismatch     that access token"
dpop.nonce_required   (10) "If the server provided a nonce value to the client, the nonce
dpop.bad_nonce        claim matches the server-provided nonce value." Both set
                      `use_dpop_nonce`: answer with a fresh ``DPoP-Nonce`` (§8, §9).
dpop.key_mismatch     (12) "confirm that the public key to which the access token is
                      bound matches the public key from the DPoP proof" (``cnf.jkt``,
                      RFC 9449 §6.1, an RFC 7638 thumbprint)
dpop.replay           §11.1: a proof's ``jti`` is remembered, per key, for as long as
                      the proof could be accepted; a second use is refused
====================  ===============================================================

The key binding is checked before the proof is recorded as used, so only proofs that
were accepted fill the replay cache: a client without a valid access token cannot
flood it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.credentials.jwt import (
    MIN_RSA_BITS,
    PublicKey,
    b64decode,
    check_algorithms,
    verify_signature,
)

log = logging.getLogger("portcullis.dpop")

Clock = Callable[[], float]

DEFAULT_ALGORITHMS = ("ES256", "EdDSA", "Ed25519", "RS256", "PS256")
MAX_JTI_CHARS = 256


class DpopConfig(BaseModel):
    """DPoP proof checks at the resource server."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS), min_length=1)
    iat_max_age_seconds: int = Field(default=60, ge=1, le=3600)
    clock_skew_seconds: int = Field(default=30, ge=0, le=300)
    require_nonce: bool = False
    nonce_lifetime_seconds: int = Field(default=300, ge=1, le=86400)
    max_proof_bytes: int = Field(default=4096, ge=512, le=65536)
    jti_cache_size: int = Field(default=100_000, ge=1, le=10_000_000)

    @field_validator("algorithms")
    @classmethod
    def _algs(cls, v: list[str]) -> list[str]:
        # RFC 9449 §4.2: alg "MUST NOT be none or an identifier for a symmetric algorithm
        # (Message Authentication Code (MAC))."
        return check_algorithms(v)


class DpopRefusal(Exception):
    """A DPoP proof is refused; `reason` is the audit reason code.

    `use_dpop_nonce`: the client must retry with a proof carrying a fresh server nonce;
    answer with ``error="use_dpop_nonce"`` and a ``DPoP-Nonce`` header (RFC 9449 §8, §9).
    """

    def __init__(self, reason: str, detail: str = "The DPoP proof is not valid.", *,
                 use_dpop_nonce: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail
        self.use_dpop_nonce = use_dpop_nonce

    @property
    def error(self) -> str:
        """The `error` for the ``WWW-Authenticate: DPoP`` challenge (RFC 9449 §7.1, §9, §12.2)."""
        if self.use_dpop_nonce:
            return "use_dpop_nonce"
        if self.reason == "dpop.key_mismatch":
            return "invalid_token"  # §7.1 example: error="invalid_token", "Invalid DPoP key binding"
        return "invalid_dpop_proof"


def _refuse(reason: str, **kw: Any) -> NoReturn:
    raise DpopRefusal(reason, **kw)


@dataclass(frozen=True, slots=True)
class DpopResult:
    """An accepted proof: the key's RFC 7638 thumbprint, the proof's `jti` and `iat`."""

    jkt: str
    jti: str
    iat: float


def _b64encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- RFC 7638 JWK thumbprint ------------------------------------------------------------

# RFC 7638 §3.2 (RSA, EC) and RFC 8037 §2 (OKP): the required members, in lexicographic order.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK, base64url (the ``jkt`` of RFC 9449 §6.1).

    RFC 7638 §3: the JSON object of the required members only, "with no whitespace or
    line breaks before or after any syntactic elements" and "ordered lexicographically by
    the Unicode code points of the member names". ValueError for other key types.
    """
    kty = jwk.get("kty")
    members = _THUMBPRINT_MEMBERS.get(kty) if isinstance(kty, str) else None
    if members is None:
        raise ValueError("thumbprints are for RSA, EC and OKP keys")
    required = {}
    for name in members:
        value = jwk.get(name)
        if not isinstance(value, str) or not value:
            raise ValueError(f"JWK member {name!r} missing")
        required[name] = value
    canonical = json.dumps(required, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return _b64encode(hashlib.sha256(canonical.encode("utf-8")).digest())


def access_token_hash(token: bytes) -> str:
    """RFC 9449 §4.2 ``ath``: "the base64url encoding ... of the SHA-256 hash of the ASCII
    encoding of the associated access token's value"."""
    return _b64encode(hashlib.sha256(token).digest())


# --- htu normalization (RFC 9449 §4.3, RFC 3986 §6.2.2 / §6.2.3) ---------------------------

_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_CTL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


def _pct_normalize(s: str) -> str:
    """RFC 3986 §6.2.2.1 upper-case hex in percent-encodings; §6.2.2.2 decode unreserved."""
    if "%" in _PCT.sub("", s):
        raise ValueError("bad percent-encoding")

    def fix(m: re.Match[str]) -> str:
        ch = chr(int(m[1], 16))
        return ch if ch in _UNRESERVED else "%" + m[1].upper()

    return _PCT.sub(fix, s)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4 on an absolute path (§6.2.2.3), segment by segment."""
    segments = path.split("/")[1:]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg in (".", ".."):
            if seg == ".." and out:
                out.pop()
            if i == last:
                out.append("")  # "/a/b/.." -> "/a/"
        else:
            out.append(seg)
    return "/" + "/".join(out)


def normalize_htu(url: str) -> str:
    """An http(s) URI as RFC 9449 §4.3 compares ``htu``: "servers SHOULD employ syntax-based
    normalization (Section 6.2.2 of [RFC3986]) and scheme-based normalization (Section
    6.2.3 of [RFC3986])", "ignoring any query and fragment parts".

    Scheme and host in lower case, percent-encodings with upper-case hex and unreserved
    characters decoded, dot segments removed, the default port dropped, an empty path as
    "/", query and fragment dropped. ValueError for anything that is not an absolute
    http(s) URI with a host (userinfo, control characters and bad ports included).
    """
    if _CTL_OR_SPACE.search(url):
        raise ValueError("control character or space in URI")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("not an http(s) URI")
    if "@" in parts.netloc:
        raise ValueError("userinfo in URI")  # RFC 9110 §4.2.4: not in http(s) URIs
    host = parts.hostname  # lower-cased by urlsplit, IPv6 without brackets
    if not host:
        raise ValueError("no host")
    port = parts.port  # ValueError when not a number in range; None for "host:" (§6.2.3)
    host = _pct_normalize(host.lower())
    if ":" in host:
        host = f"[{host}]"
    authority = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    path = _remove_dot_segments(_pct_normalize(parts.path)) if parts.path else "/"
    return f"{scheme}://{authority}{path}"


# --- Server nonces (RFC 9449 §8, §9) -------------------------------------------------------

_NONCE_CONTEXT = b"portcullis dpop-nonce v1\x00"


class DpopNonces:
    """Stateless server nonces: ``base64url(issue time || HMAC-SHA256(secret, time)[:16])``.

    No state to share: every gateway process holding the same `secret` issues the same
    nonce within a second and accepts the others' nonces. RFC 9449 §8.1: "nonce =
    1*NQCHAR"; base64url is within NQCHAR. A nonce is accepted from its issue second to
    `lifetime` seconds after it (and up to `skew` seconds early, for processes whose
    clocks differ slightly).
    """

    def __init__(self, secret: bytes, lifetime: int = 300, clock: Clock = time.time, *, skew: int = 5) -> None:
        if len(secret) < 32:
            raise ValueError("the nonce secret must be at least 32 bytes")
        if lifetime < 1:
            raise ValueError("lifetime must be positive")
        self._secret = secret
        self.lifetime = lifetime
        self._clock = clock
        self._skew = skew

    def _tag(self, stamp: bytes) -> bytes:
        return hmac.new(self._secret, _NONCE_CONTEXT + stamp, hashlib.sha256).digest()[:16]

    def issue(self) -> str:
        stamp = max(0, math.floor(self._clock())).to_bytes(8, "big")
        return _b64encode(stamp + self._tag(stamp))

    def header(self) -> tuple[bytes, bytes]:
        """A ``DPoP-Nonce`` response header with a fresh nonce (RFC 9449 §9)."""
        return (b"dpop-nonce", self.issue().encode("ascii"))

    def valid(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) != 32 or not nonce.isascii():
            return False
        try:
            raw = b64decode(nonce.encode("ascii"))
        except ValueError:
            return False
        stamp, tag = raw[:8], raw[8:]
        if not hmac.compare_digest(tag, self._tag(stamp)):
            return False
        age = self._clock() - int.from_bytes(stamp, "big")
        return -self._skew <= age <= self.lifetime


# --- Replay cache (RFC 9449 §11.1) ---------------------------------------------------------


class ReplayCache:
    """`(jkt, jti)` pairs seen, each kept for `ttl` seconds, at most `size` of them.

    When full of live entries the oldest is evicted (and counted in `evicted_live`):
    a bounded memory wins over refusing every new proof, which anyone able to send
    accepted proofs could otherwise force. Size it above peak proofs/s x ttl.
    """

    def __init__(self, size: int, ttl: float) -> None:
        self.size = size
        self.ttl = ttl
        self.evicted_live = 0
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def purge(self, now: float) -> None:
        while self._seen:
            key, expires = next(iter(self._seen.items()))
            if expires >= now:
                break
            del self._seen[key]

    def seen(self, key: tuple[str, str], now: float) -> bool:
        self.purge(now)
        expires = self._seen.get(key)
        return expires is not None and expires >= now

    def add(self, key: tuple[str, str], now: float) -> None:
        self._seen[key] = now + self.ttl
        self._seen.move_to_end(key)
        while len(self._seen) > self.size:
            _, expires = self._seen.popitem(last=False)
            if expires >= now:
                if not self.evicted_live:
                    log.warning("DPoP replay cache full: evicting unexpired entries; raise jti_cache_size")
                self.evicted_live += 1


# --- The verifier ---------------------------------------------------------------------------

_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
_EC_CURVES: dict[str, tuple[ec.EllipticCurve, int]] = {
    "P-256": (ec.SECP256R1(), 32), "P-384": (ec.SECP384R1(), 48), "P-521": (ec.SECP521R1(), 66)}
_MAX_NUMERIC_DATE = 2**53
_MAX_RSA_BITS = 8192
_MAX_RSA_E_BITS = 256  # NIST SP 800-56B's upper bound for public exponents


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        raise ValueError("duplicate member")  # RFC 7515 §5.2 step 4 / RFC 7519 §7.2 step 10
    return doc


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _json_segment(segment: bytes) -> dict[str, Any]:
    if not segment:
        _refuse("dpop.malformed")
    try:
        doc = json.loads(b64decode(segment).decode("utf-8"), object_pairs_hook=_reject_duplicates,
                         parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise DpopRefusal("dpop.malformed") from None
    if not isinstance(doc, dict):
        _refuse("dpop.malformed")
    return doc


def _key_member(jwk: Mapping[str, Any], name: str, size: int | None = None) -> int:
    """A base64url key member as an integer; canonical encoding only, so one key has one
    thumbprint (the member strings are what RFC 7638 hashes)."""
    value = jwk.get(name)
    if not isinstance(value, str):
        raise ValueError(f"{name} missing")
    raw = b64decode(value.encode("ascii"))
    if not raw or _b64encode(raw) != value or (size is not None and len(raw) != size):
        raise ValueError(f"{name} badly encoded")
    return int.from_bytes(raw, "big")


def _public_key(jwk: Mapping[str, Any]) -> PublicKey:
    """The key in a ``jwk`` header (RFC 7517, RFC 7518 §6, RFC 8037 §2); ValueError if it
    is not one we verify with."""
    kty = jwk.get("kty")
    if kty == "EC":
        crv = jwk.get("crv")
        if not isinstance(crv, str) or crv not in _EC_CURVES:
            raise ValueError("unsupported curve")
        curve, size = _EC_CURVES[crv]
        # RFC 7518 §6.2.1.2: coordinates are the full size; public_key() checks the point is on the curve.
        numbers = ec.EllipticCurvePublicNumbers(_key_member(jwk, "x", size), _key_member(jwk, "y", size), curve)
        return numbers.public_key()
    if kty == "RSA":
        e, n = _key_member(jwk, "e"), _key_member(jwk, "n")
        # RFC 7518 §3.3: at least 2048 bits. The upper bounds keep a proof from anyone at
        # the cost of an ordinary verification: a 3000-bit exponent costs 35 times more.
        if not MIN_RSA_BITS <= n.bit_length() <= _MAX_RSA_BITS or not 3 <= e < 2**_MAX_RSA_E_BITS or not e & 1:
            raise ValueError("RSA key size or exponent out of range")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if kty == "OKP":
        if jwk.get("crv") != "Ed25519":
            raise ValueError("unsupported curve")
        x = jwk.get("x")
        if not isinstance(x, str):
            raise ValueError("x missing")
        raw = b64decode(x.encode("ascii"))
        if len(raw) != 32 or _b64encode(raw) != x:
            raise ValueError("x badly encoded")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    raise ValueError("unsupported key type")


def _numeric_date(v: object) -> float | None:
    """RFC 7519 §2 NumericDate, within a sane range; None otherwise."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if not -_MAX_NUMERIC_DATE < v < _MAX_NUMERIC_DATE:
        return None
    return float(v)


def proof_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The one ``DPoP`` request header value; `DpopRefusal` when there is none or more
    than one (RFC 9449 §4.3 point 1)."""
    values = [v for k, v in headers if k.lower() == b"dpop"]
    if not values:
        _refuse("dpop.missing")
    if len(values) > 1:
        _refuse("dpop.multiple")
    return values[0]


class DpopVerifier:
    """Checks DPoP proofs (RFC 9449 §4.3) and remembers the accepted ones (§11.1)."""

    def __init__(self, cfg: DpopConfig, clock: Clock = time.time, nonces: DpopNonces | None = None) -> None:
        if cfg.require_nonce and nonces is None:
            raise ValueError("require_nonce needs a DpopNonces")
        self.cfg = cfg
        self._clock = clock
        self.nonces = nonces
        self._algs = frozenset(cfg.algorithms)
        # A proof is accepted while now is in [iat - skew, iat + max_age + skew]; recorded at
        # the earliest such now, its jti must outlive the latest: max_age + 2 * skew.
        self.replay = ReplayCache(cfg.jti_cache_size, cfg.iat_max_age_seconds + 2 * cfg.clock_skew_seconds)

    def challenge(self, error: str | None = None, description: str | None = None) -> tuple[bytes, bytes]:
        """``WWW-Authenticate: DPoP`` naming this verifier's algorithms (RFC 9449 §7.1)."""
        return dpop_challenge(self.cfg.algorithms, error, description)

    def verify(self, proof: bytes | None, *, method: str, url: str, access_token: bytes | None,
               expected_jkt: str | None) -> DpopResult:
        """Check `proof` for the request `method` `url`.

        `access_token`: the DPoP-bound token presented with it (then ``ath`` is required,
        RFC 9449 §4.2/§7); `expected_jkt`: that token's ``cnf.jkt`` (§6.1). Both None only
        where no token goes with the proof. Raises `DpopRefusal` with the reason.
        """
        cfg = self.cfg
        # §4.3 (1): one DPoP header, one value.
        proof = proof.strip(b" \t") if proof is not None else b""
        if not proof:
            _refuse("dpop.missing")
        if b"," in proof:
            _refuse("dpop.multiple")
        if len(proof) > cfg.max_proof_bytes:
            _refuse("dpop.too_large")

        # §4.3 (2): "a single and well-formed JWT" in JWS Compact Serialization (RFC 7515 §7.1).
        parts = proof.split(b".")
        if len(parts) != 3 or not parts[2]:
            _refuse("dpop.malformed")
        header = _json_segment(parts[0])
        claims = _json_segment(parts[1])
        try:
            sig = b64decode(parts[2])
        except ValueError:
            raise DpopRefusal("dpop.malformed") from None
        if "crit" in header:
            _refuse("dpop.crit_unsupported")  # RFC 7515 §4.1.11: we understand no extension

        # §4.3 (4): typ is dpop+jwt. RFC 7515 §4.1.9: compared case-insensitively, and the
        # "application/" prefix may be present.
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower().removeprefix("application/") != "dpop+jwt":
            _refuse("dpop.bad_typ")

        # §4.3 (5): an allowlisted asymmetric algorithm; `none` and HS* are never in the list.
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algs:
            _refuse("dpop.alg_not_allowed")

        # §4.2: "jwk: ... the public key chosen by the client ... It MUST NOT contain a private key."
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            _refuse("dpop.no_jwk")
        # §4.3 (7); a symmetric (`oct`) key is a secret by definition.
        if jwk.get("kty") == "oct" or any(m in jwk for m in _PRIVATE_MEMBERS):
            _refuse("dpop.private_key")
        try:
            key = _public_key(jwk)
            jkt = jwk_thumbprint(jwk)
        except (ValueError, UnicodeEncodeError):
            raise DpopRefusal("dpop.bad_jwk") from None

        # §4.3 (6): the signature verifies with that key, of the type and curve `alg` names.
        if not verify_signature(alg, key, parts[0] + b"." + parts[1], sig):
            _refuse("dpop.bad_signature")

        # §4.3 (3) and §4.2: jti is required, unique per proof.
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            _refuse("dpop.missing_jti")
        if len(jti) > MAX_JTI_CHARS:
            _refuse("dpop.bad_jti")

        # §4.3 (8): htm matches the method (RFC 9110 §9.1: methods are case-sensitive).
        if claims.get("htm") != method:
            _refuse("dpop.htm_mismatch")

        # §4.3 (9): htu matches the request URI, normalized, without query and fragment.
        htu = claims.get("htu")
        if not isinstance(htu, str):
            _refuse("dpop.htu_mismatch")
        try:
            if normalize_htu(htu) != normalize_htu(url):
                _refuse("dpop.htu_mismatch")
        except ValueError:
            raise DpopRefusal("dpop.htu_mismatch") from None

        # §4.3 (11) and §11.1: "servers MUST only accept DPoP proofs for a limited time".
        iat = _numeric_date(claims.get("iat"))
        if iat is None:
            _refuse("dpop.missing_iat")
        now = self._clock()
        if now - iat > cfg.iat_max_age_seconds + cfg.clock_skew_seconds:
            _refuse("dpop.stale")
        if iat - now > cfg.clock_skew_seconds:
            _refuse("dpop.future")

        # §4.3 (12) and §4.2: with an access token, ath is required and is its hash.
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str):
                _refuse("dpop.ath_missing")
            if not hmac.compare_digest(ath.encode("utf-8"), access_token_hash(access_token).encode("ascii")):
                _refuse("dpop.ath_mismatch")

        # §4.3 (10), §9: a server nonce, when we ask for one (or check it when we gave one).
        nonce = claims.get("nonce")
        if cfg.require_nonce and nonce is None:
            _refuse("dpop.nonce_required", detail="A DPoP nonce is required.", use_dpop_nonce=True)
        if nonce is not None and self.nonces is not None and not self.nonces.valid(nonce):
            _refuse("dpop.bad_nonce", detail="The DPoP nonce is not valid.", use_dpop_nonce=True)

        # §4.3 (12): the key is the one the access token is bound to (cnf.jkt, §6.1).
        if expected_jkt is not None and not hmac.compare_digest(jkt.encode("ascii"), expected_jkt.encode("utf-8")):
            _refuse("dpop.key_mismatch", detail="The DPoP key does not match the access token.")

        # §11.1: one use per proof, remembered per key for as long as the proof is acceptable.
        if self.replay.seen((jkt, jti), now):
            _refuse("dpop.replay")
        self.replay.add((jkt, jti), now)
        return DpopResult(jkt=jkt, jti=jti, iat=iat)


# --- The challenge (RFC 9449 §7.1) -----------------------------------------------------------

_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # RFC 9110 §5.6.2
_NQSCHAR = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # RFC 6750 §3: error / error_description


def dpop_challenge(algs: Sequence[str], error: str | None = None,
                   description: str | None = None) -> tuple[bytes, bytes]:
    """A ``WWW-Authenticate: DPoP`` header (RFC 9449 §7.1).

    `algs`: "A space-delimited list of the JWS alg (Algorithm) header values ([RFC7515])
    the resource server supports"; `error` and `error_description` as in RFC 6750 §3
    (``invalid_token``, ``invalid_dpop_proof``, ``use_dpop_nonce``, ...). Values outside
    RFC 6750's character set raise ValueError rather than corrupt the header.
    """
    if not algs or not all(_TOKEN.fullmatch(a) for a in algs):
        raise ValueError("algs must be JOSE algorithm names")
    parts = ['algs="' + " ".join(algs) + '"']
    for name, value in (("error", error), ("error_description", description)):
        if value:
            if not _NQSCHAR.fullmatch(value):
                raise ValueError(f"{name} has characters a quoted-string here may not carry")
            parts.append(f'{name}="{value}"')
    return (b"www-authenticate", ("DPoP " + ", ".join(parts)).encode("ascii"))
