"""HTTP Message Signatures (RFC 9421): verify signed requests, sign responses.

The `http_message_signatures` library parses the fields, re-creates the signature
base (RFC 9421 §2.5) and runs the cryptography (§3.3). What it leaves to the caller
is written here, in a fixed order, each refusal with its own audit reason:

1. Bounds (field sizes, number of signatures and of covered components), then the
   Signature-Input and Signature dictionaries (§4.1, §4.2), parsed once to choose
   which signature to verify (§3.2 step 1.1) and to read its parameters.
2. The key by `keyid` from the configured keys only; the algorithm is the key's, and
   an `alg` parameter must agree with it (§3.2 step 6.4).
3. Application requirements (§3.2.1): covered components, `created`/`expires`
   against the injected clock, a `nonce`.
4. The cryptographic check, by the library.
5. Content-Digest recomputed over the body (RFC 9530 §2), then the nonce recorded
   (replay: RFC 9421 §7.2.2) — last, so only a fully valid request consumes it.

Used from the library: Structured Field parsing (its `http_sf`), the component
resolver and signature base, the algorithms, `HTTPMessageVerifier`/`HTTPMessageSigner`
and `MappingKeyResolver`. Written here, because the library leaves it to the caller
or does not fit: the policy and the choice of signature, `created`/`expires` against
an injected clock (the library reads the wall clock), the nonce cache, Content-Digest
checking (the library refuses a digest field naming any algorithm it does not know),
and a message view built from raw ASGI parts.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import http_sf
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key
from http_message_signatures import (
    HTTPMessageSignaturesException,
    HTTPMessageSigner,
    HTTPMessageVerifier,
    HTTPSignatureComponentResolver,
    MappingKeyResolver,
    SigningKey,
    VerificationKey,
)
from http_message_signatures.algorithms import (
    ECDSA_P256_SHA256,
    ED25519,
    HMAC_SHA256,
    RSA_PSS_SHA512,
    RSA_V1_5_SHA256,
    HTTPSignatureAlgorithm,
)
from http_message_signatures.signatures import SignatureVerifyWarning
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Alg = Literal["ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "rsa-v1_5-sha256", "hmac-sha256"]

# RFC 9421 §6.2.2 registry names → the library's implementations of §3.3.
_ALGORITHMS: dict[str, type[HTTPSignatureAlgorithm]] = {
    "ed25519": ED25519, "ecdsa-p256-sha256": ECDSA_P256_SHA256, "rsa-pss-sha512": RSA_PSS_SHA512,
    "rsa-v1_5-sha256": RSA_V1_5_SHA256, "hmac-sha256": HMAC_SHA256,
}
MAX_SIGNATURES = 8           # labels per message (§4.3 allows several; we verify one)
MAX_COVERED_COMPONENTS = 32  # per signature
MIN_HMAC_SECRET_BYTES = 32   # §3.3.3 leaves the size open; 256 bits matches SHA-256
MIN_RSA_BITS = 2048          # §3.2.1: "Requiring keys to be of a certain size"
# RFC 9421 §2.3: the signature parameters this version defines; anything else is refused.
_SIGNATURE_PARAMS = frozenset({"alg", "created", "expires", "keyid", "nonce", "tag"})
# The two algorithms RFC 9530's hash algorithm registry lists as "Active".
_DIGESTS: dict[str, Callable[[bytes], Any]] = {"sha-256": hashlib.sha256, "sha-512": hashlib.sha512}
_DIGEST_SIZES = {"sha-256": 32, "sha-512": 64}
_AUTHORITY = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::[0-9]{0,5})?")
_METHOD = re.compile(r"[A-Z][A-Z0-9!#$%&'*+.^_`|~-]{0,31}")


class SignatureRefusal(Exception):
    """A signature is refused; `reason` is the audit reason code (``sig.*``)."""

    def __init__(self, reason: str, detail: str = "The request signature is not valid.") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


def content_digest(body: bytes, alg: str = "sha-256") -> bytes:
    """The Content-Digest field value for `body` (RFC 9530 §2): ``sha-256=:<base64>:``."""
    if alg not in _DIGESTS:
        raise ValueError(f"digest algorithm {alg!r} is not supported; use sha-256 or sha-512")
    return f"{alg}=:{base64.b64encode(_DIGESTS[alg](body).digest()).decode('ascii')}:".encode("ascii")


def _check_content_digest(value: str, body: bytes) -> None:
    """Refuse unless every sha-256/sha-512 member of `value` matches `body`, and there is one.

    Why not the library's `ContentDigest.verify`: it refuses the whole field when any
    member names an algorithm it does not know, where RFC 9530 §2 says "A recipient MAY
    ignore any or all digests" — a sender may add a newer algorithm beside sha-256.
    """
    def duplicate(key: str, context: str) -> None:
        if context == "dictionary":
            raise ValueError(f"algorithm {key!r} twice")  # which one would count?

    try:
        members = http_sf.parse(value.encode("latin-1"), tltype="dictionary", on_duplicate_key=duplicate)
    except (ValueError, UnicodeEncodeError):
        raise SignatureRefusal("sig.digest_malformed") from None
    if not isinstance(members, dict):
        raise SignatureRefusal("sig.digest_malformed")
    checked = 0
    for alg, member in members.items():
        if alg not in _DIGESTS:
            continue
        digest = member[0] if isinstance(member, tuple) else None
        if not isinstance(digest, bytes) or len(digest) != _DIGEST_SIZES[alg]:
            raise SignatureRefusal("sig.digest_malformed")
        if not hmac.compare_digest(digest, _DIGESTS[alg](body).digest()):
            raise SignatureRefusal("sig.digest_mismatch")
        checked += 1
    if not checked:
        # Only algorithms we do not accept (unknown, or deprecated ones such as md5): nothing vouches for the body.
        raise SignatureRefusal("sig.digest_unsupported")


def _component(text: str) -> tuple[str, frozenset[tuple[str, Any]]]:
    """A component identifier (``@method``, ``content-type`` or a serialized item such as
    ``"content-digest";key="sha-256"``) as (name, parameters) — identity ignores the
    parameters' order (RFC 9421 §2)."""
    try:
        raw = text if text.startswith('"') else http_sf.ser(text)
        item = http_sf.parse(raw.encode("ascii"), tltype="item")
    except (ValueError, UnicodeEncodeError):
        raise ValueError(f"{text!r} is not a component identifier") from None
    if not isinstance(item, tuple) or not isinstance(item[0], str) or not isinstance(item[1], dict):
        raise ValueError(f"{text!r} is not a component identifier")
    name, params = item[0], item[1]
    # RFC 9421 §2.1: field names are lower-cased; §3.1: @signature-params is never listed.
    if not name or name != name.lower() or name == "@signature-params":
        raise ValueError(f"{text!r} is not a component identifier a signature can cover")
    return name, frozenset(params.items())


def _component_text(name: str, params: dict[str, Any]) -> str:
    return name if not params else http_sf.ser((name, params))


# A derived component is implied by a wider one the signature covers: @target-uri
# (RFC 9421 §2.2.2) is scheme, authority, path and query; @request-target (§2.2.5)
# is path and query. Requiring "@path" is then met by a signer that covers
# "@target-uri" — the library's default signer does exactly that.
_IMPLIED_BY = {"@authority": ("@target-uri",), "@scheme": ("@target-uri",),
               "@path": ("@target-uri", "@request-target"), "@query": ("@target-uri", "@request-target")}


def _covers(covered: set[tuple[str, frozenset[tuple[str, Any]]]], name: str) -> bool:
    return any((n, frozenset()) in covered for n in (name, *_IMPLIED_BY.get(name, ())))


class SignatureKeyConfig(BaseModel):
    """One partner key: `key_id` (the signature's `keyid`), its algorithm, and exactly one
    key source — a PEM public key (inline or file) for asymmetric algorithms, or a base64
    shared secret of at least 32 bytes for hmac-sha256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(min_length=1, max_length=256)
    alg: Alg
    public_key_pem: str | None = None
    public_key_file: str | None = None
    secret_b64: str | None = None

    @model_validator(mode="after")
    def _valid_key(self) -> SignatureKeyConfig:
        self.load_key()
        return self

    def load_key(self) -> VerificationKey:
        """The verification key (secret bytes for HMAC); ValueError naming the problem."""
        sources = [s is not None for s in (self.public_key_pem, self.public_key_file, self.secret_b64)]
        if sum(sources) != 1:
            raise ValueError(f"key {self.key_id!r}: give exactly one of public_key_pem, public_key_file, secret_b64")
        if self.alg == "hmac-sha256":
            if self.secret_b64 is None:
                # A public key used as an HMAC secret is the classic key-confusion attack (cf. RFC 8725
                # §3.1): a shared secret must be configured as one, never taken from a PEM.
                raise ValueError(f"key {self.key_id!r}: hmac-sha256 needs secret_b64, not a public key")
            try:
                secret = base64.b64decode(self.secret_b64, validate=True)
            except binascii.Error:
                raise ValueError(f"key {self.key_id!r}: secret_b64 is not valid base64") from None
            if len(secret) < MIN_HMAC_SECRET_BYTES:
                raise ValueError(f"key {self.key_id!r}: the hmac-sha256 secret is {len(secret)} bytes; "
                                 f"at least {MIN_HMAC_SECRET_BYTES} are required")
            return secret
        if self.secret_b64 is not None:
            raise ValueError(f"key {self.key_id!r}: {self.alg} is asymmetric; give public_key_pem or "
                             "public_key_file, not secret_b64")
        if self.public_key_file is not None:
            try:
                pem = Path(self.public_key_file).read_bytes()
            except OSError as exc:
                raise ValueError(f"key {self.key_id!r}: cannot read {self.public_key_file!r}: {exc.strerror}") from None
        else:
            pem = (self.public_key_pem or "").encode("ascii", "replace")
        try:
            key = load_pem_public_key(pem)
        except (ValueError, TypeError):
            raise ValueError(f"key {self.key_id!r}: not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
        _check_key_type(self.alg, key, self.key_id)
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey)):
            raise ValueError(f"key {self.key_id!r}: unsupported key type")  # pragma: no cover - checked above
        return key


def _check_key_type(alg: str, key: object, key_id: str) -> None:
    """§3.2 step 8: "If the key material is appropriate for the algorithm" — else refuse now, at load."""
    if alg == "ed25519":
        ok = isinstance(key, (ed25519.Ed25519PublicKey, ed25519.Ed25519PrivateKey))
    elif alg == "ecdsa-p256-sha256":
        ok = (isinstance(key, (ec.EllipticCurvePublicKey, ec.EllipticCurvePrivateKey))
              and isinstance(key.curve, ec.SECP256R1))
    else:
        ok = isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey))
        if isinstance(key, (rsa.RSAPublicKey, rsa.RSAPrivateKey)) and key.key_size < MIN_RSA_BITS:
            raise ValueError(f"key {key_id!r}: RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} required")
    if not ok:
        raise ValueError(f"key {key_id!r}: a {type(key).__name__} cannot be used with {alg}")


class SignaturePolicy(BaseModel):
    """What a request signature must satisfy beyond verifying (RFC 9421 §3.2.1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    required_components: list[str] = Field(default_factory=lambda: ["@method", "@authority", "@path"],
                                            max_length=MAX_COVERED_COMPONENTS)
    query_required_when_present: bool = True
    content_digest_required_with_body: bool = True
    require_created: bool = True
    max_age_seconds: int = Field(default=300, ge=1, le=86400)
    clock_skew_seconds: int = Field(default=30, ge=0, le=600)
    require_nonce: bool = True
    # The library refuses a signature without keyid, and guessing a key by trial would
    # let any configured key vouch for any request.
    require_keyid: Literal[True] = True
    allowed_algs: list[Alg] | None = Field(default=None, min_length=1)
    max_signature_header_bytes: int = Field(default=8192, ge=256, le=65536)
    label: str | None = Field(default=None, min_length=1, max_length=64)

    @field_validator("required_components")
    @classmethod
    def _components(cls, v: list[str]) -> list[str]:
        for text in v:
            _component(text)
        if len({_component(t) for t in v}) != len(v):
            raise ValueError("a required component is listed twice")
        return v

    @model_validator(mode="after")
    def _nonce_window(self) -> SignaturePolicy:
        if self.require_nonce and not self.require_created:
            # A nonce is remembered for max_age + skew, which stops replays only while
            # `created` limits how long the signature is accepted.
            raise ValueError("require_nonce needs require_created")
        return self


class NonceCache:
    """Nonces seen per key, each remembered for `ttl_seconds` (RFC 9421 §7.2.2).

    Bounded: at most `max_entries`; when full, the oldest is dropped even if live
    (counted in `evicted_live` — a replay window for that nonce, the price of a memory
    bound; size it above max_age times peak signed requests per second). Entries are
    appended in time order, so expired ones are at the front: every operation is
    amortised O(1). Keys are a 16-byte hash, so memory per entry does not depend on
    the sizes of keyid and nonce.
    """

    def __init__(self, ttl_seconds: float, max_entries: int = 100_000) -> None:
        if ttl_seconds <= 0 or max_entries < 1:
            raise ValueError("ttl_seconds and max_entries must be positive")
        self.ttl = float(ttl_seconds)
        self.max_entries = max_entries
        self.evicted_live = 0
        self._entries: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seen(self, key_id: str, nonce: str, now: float) -> bool:
        """True if (key_id, nonce) was recorded and has not expired (a replay); else record it."""
        entries = self._entries
        while entries:
            first = next(iter(entries.values()))
            if first > now:
                break
            entries.popitem(last=False)
        k = hashlib.blake2b(f"{len(key_id)}:{key_id}{nonce}".encode(), digest_size=16).digest()
        until = entries.get(k)
        if until is not None and until > now:
            return True
        entries[k] = now + self.ttl
        entries.move_to_end(k)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
            self.evicted_live += 1
        return False


@dataclass(frozen=True, slots=True)
class SignatureResult:
    """A verified request signature.

    `covered` lists the component identifiers in signed order (bare names, or the
    serialized item when it has parameters, e.g. ``"content-digest";key="sha-256"``).
    `signature`, `method` and `target_uri` let a response signature cover this one
    (`ResponseSigner.sign(request_signature=...)`, RFC 9421 §2.4).
    """

    key_id: str
    label: str
    alg: str
    covered: tuple[str, ...]
    created: int | None
    expires: int | None
    nonce: str | None
    tag: str | None
    signature: bytes
    method: str
    target_uri: str


class _Fields:
    """Header lines in wire order, in the shape the library's resolver reads: `items()`
    yields every line (it combines repeats per RFC 9421 §2.1 itself); writes replace."""

    def __init__(self, lines: list[tuple[str, str]]) -> None:
        self.lines = lines

    def items(self) -> list[tuple[str, str]]:
        return list(self.lines)

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name for name, _ in self.lines))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(n.lower() == name.lower() for n, _ in self.lines)

    def __getitem__(self, name: str) -> str:
        values = [v for n, v in self.lines if n.lower() == name.lower()]
        if not values:
            raise KeyError(name)
        return ", ".join(values)

    def __setitem__(self, name: str, value: str) -> None:
        del self[name]
        self.lines.append((name, value))

    def __delitem__(self, name: str) -> None:
        self.lines = [(n, v) for n, v in self.lines if n.lower() != name.lower()]


@dataclass
class _Request:
    """A request as the library's component resolver reads it (requests-like)."""

    method: str
    url: str
    headers: _Fields


@dataclass
class _Response:
    """A response as the library reads it; `request` answers `;req` components (§2.4)."""

    status_code: int
    headers: _Fields
    request: _Request | None


class _Verifier(HTTPMessageVerifier):
    """The library's verifier, minus its wall-clock checks: `created` and `expires` are
    enforced before it runs, against the injected clock and the policy's skew."""

    # We choose the signature by label (§3.2 step 1.1), then hold it to the whole policy
    # (known key, coverage, freshness): relabelling, which the library warns about since
    # labels are not signed, gains an attacker nothing.
    allow_label_only_selection = True

    def validate_created_and_expires(self, sig_input: Any, max_age: Any = None) -> None:
        return None


def _combine(lines: list[str]) -> str:
    """RFC 9421 §2.1 / RFC 9110 §5.3: trim each line, join repeated lines with ", "."""
    return ", ".join(v.strip(" \t") for v in lines)


@dataclass(frozen=True, slots=True)
class _Key:
    cfg: SignatureKeyConfig
    verifier: _Verifier


class RequestSignatureVerifier:
    """Verifies one RFC 9421 signature per request against the configured keys and policy."""

    def __init__(self, keys: dict[str, SignatureKeyConfig] | list[SignatureKeyConfig],
                 policy: SignaturePolicy | None = None, clock: Callable[[], float] = time.time,
                 nonces: NonceCache | None = None) -> None:
        self.policy = policy = policy or SignaturePolicy()
        if isinstance(keys, dict):
            for name, cfg in keys.items():
                if name != cfg.key_id:
                    raise ValueError(f"key {name!r} is configured with key_id {cfg.key_id!r}")
            configs = list(keys.values())
        else:
            configs = list(keys)
        if len({c.key_id for c in configs}) != len(configs):
            raise ValueError("a key_id appears twice")
        self._keys = {
            c.key_id: _Key(c, _Verifier(signature_algorithm=_ALGORITHMS[c.alg],
                                        key_resolver=MappingKeyResolver(public_keys={c.key_id: c.load_key()},
                                                                        private_keys={})))
            for c in configs
        }
        self._clock = clock
        window = policy.max_age_seconds + policy.clock_skew_seconds
        if nonces is None:
            nonces = NonceCache(window)
        elif nonces.ttl < window:
            raise ValueError(f"the nonce cache must remember nonces for at least max_age + skew ({window} s)")
        self.nonces = nonces
        self._required = [(text, _component(text)) for text in policy.required_components]

    def verify(self, method: str, scheme: str, authority: str, path: str, query: str,  # noqa: PLR0917 - the ASGI scope's parts
               headers: list[tuple[bytes, bytes]], body: bytes | None) -> SignatureResult:
        """The verified signature of this request, or `SignatureRefusal`.

        `headers` are raw ASGI pairs (lower-case names, repeats allowed); `path` is the
        request path as received (percent-encoded), `query` the query string without
        ``?`` ("" when there is none); `body` the content as received, None if absent.
        """
        policy = self.policy
        now = self._clock()
        lines: dict[str, list[str]] = {"signature-input": [], "signature": [], "content-digest": []}
        fields: list[tuple[str, str]] = []
        for raw_name, raw_value in headers:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            fields.append((name, value))
            if name in lines:
                lines[name].append(value)
        if not lines["signature-input"] and not lines["signature"]:
            raise SignatureRefusal("sig.missing", "The request must be signed (RFC 9421).")
        # §4.3: several signatures may share the fields; bound before parsing anything.
        sig_input_text = _combine(lines["signature-input"])
        sig_text = _combine(lines["signature"])
        digest_text = _combine(lines["content-digest"])
        limit = policy.max_signature_header_bytes
        if len(sig_input_text) > limit or len(sig_text) > limit or len(digest_text) > limit:
            raise SignatureRefusal("sig.too_large")
        # §3.2 step 1.2: a Signature without its Signature-Input (or the reverse) is an error.
        sig_inputs = _parse_dictionary(sig_input_text)
        signatures = _parse_dictionary(sig_text)
        if len(sig_inputs) > MAX_SIGNATURES or len(signatures) > MAX_SIGNATURES:
            raise SignatureRefusal("sig.too_large")
        if not sig_inputs or sig_inputs.keys() != signatures.keys():
            raise SignatureRefusal("sig.malformed")
        for label, member in sig_inputs.items():
            # §4.1: each member is an Inner List of component identifiers with parameters;
            # §4.2: each signature a Byte Sequence. The library checks every member too.
            inner = member[0] if isinstance(member, tuple) else None
            sig_member = signatures[label]
            sig_value = sig_member[0] if isinstance(sig_member, tuple) else None
            if not isinstance(inner, list) or not isinstance(sig_value, bytes) or not sig_value:
                raise SignatureRefusal("sig.malformed")
            if len(inner) > MAX_COVERED_COMPONENTS:
                raise SignatureRefusal("sig.too_large")
            _check_param_types(member[1] if isinstance(member, tuple) else {})

        label = self._choose(sig_inputs)
        inner_list, params = _inner(sig_inputs[label])
        sig_bytes = _byte_sequence(signatures[label])
        if set(params) - _SIGNATURE_PARAMS:
            raise SignatureRefusal("sig.malformed")  # §2.3: parameters we cannot interpret

        # §3.2 step 5: the key comes from configuration by keyid, or verification fails.
        key_id = params.get("keyid")
        if not isinstance(key_id, str):
            raise SignatureRefusal("sig.keyid_missing")
        key = self._keys.get(key_id)
        if key is None:
            raise SignatureRefusal("sig.unknown_key")
        # §3.2 step 6.4: "If the algorithms are not the same, the verifier MUST fail the verification."
        alg = params.get("alg")
        if alg is not None and alg != key.cfg.alg:
            raise SignatureRefusal("sig.alg_mismatch")
        if policy.allowed_algs is not None and key.cfg.alg not in policy.allowed_algs:
            raise SignatureRefusal("sig.alg_not_allowed")  # §3.2.1: "Prohibiting the use of certain algorithms"

        created, expires, nonce = params.get("created"), params.get("expires"), params.get("nonce")
        self._check_times(created, expires, now)
        if nonce is None and policy.require_nonce:
            raise SignatureRefusal("sig.nonce_missing")  # §3.2.1: "Enforcing uniqueness of the nonce parameter."

        covered = self._check_coverage(inner_list, query, body, bool(lines["content-digest"]))

        if not _METHOD.fullmatch(method) or scheme.lower() not in ("http", "https") \
                or not _AUTHORITY.fullmatch(authority) or not path.startswith("/") or "#" in path + query \
                or "?" in path:
            raise SignatureRefusal("sig.malformed")
        target_uri = f"{scheme.lower()}://{authority}{path}" + (f"?{query}" if query else "")
        chained = any(c.partition(";")[0].strip('"') in ("signature", "signature-input") for c in covered)
        if len(sig_inputs) > 1 and not chained:
            # Show the library only the chosen signature: with several it wants a signed
            # `tag` to choose by, or warns on each request. Nothing else can refer to the
            # other members, so the signature base is unchanged.
            only = {"signature-input": http_sf.ser({label: sig_inputs[label]}),
                    "signature": http_sf.ser({label: signatures[label]})}
            fields = [(n, v) for n, v in fields if n not in only] + list(only.items())
        message = _Request(method, target_uri, _Fields(fields))
        try:
            # The library's own URL grammar (RFC 3986): refuse here what it cannot resolve.
            _resolver(message)
        except HTTPMessageSignaturesException:
            raise SignatureRefusal("sig.malformed") from None
        try:
            # §3.2 steps 7-9 by the library. Having passed the checks above, a refusal
            # means the message is not the one signed: a wrong signature or key, or a
            # covered field that this message does not carry.
            if len(sig_inputs) > 1 and chained:
                # §4.3: this signature covers another one's fields, so the library sees them
                # all and is told which to verify. Its label-only warning is silenced here
                # (process-wide while it runs, but this path is rare).
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", SignatureVerifyWarning)
                    results = key.verifier.verify(message, max_age=None, expect_label=label)
            else:
                results = key.verifier.verify(message, max_age=None)
        except HTTPMessageSignaturesException:
            raise SignatureRefusal("sig.bad_signature") from None
        if len(results) != 1 or results[0].label != label or results[0].parameters.get("keyid") != key_id:
            raise SignatureRefusal("sig.bad_signature")  # the library verified something else; never trust it

        if lines["content-digest"]:
            # Checked whenever present: a signature covers the content only through a
            # digest of it (RFC 9530), and an unsigned digest that does not match marks
            # a corrupt message either way.
            _check_content_digest(digest_text, body or b"")
        if nonce is not None and self.nonces.seen(key_id, nonce, now):
            raise SignatureRefusal("sig.replay")
        return SignatureResult(
            key_id=key_id, label=label, alg=key.cfg.alg, covered=tuple(covered),
            created=created if isinstance(created, int) else None,
            expires=expires if isinstance(expires, int) else None,
            nonce=nonce if isinstance(nonce, str) else None,
            tag=params["tag"] if isinstance(params.get("tag"), str) else None,
            signature=sig_bytes, method=method, target_uri=target_uri,
        )

    def _choose(self, sig_inputs: dict[str, Any]) -> str:
        """§3.2 step 1.1: the configured label, else the first signature whose keyid we know."""
        if self.policy.label is not None:
            if self.policy.label not in sig_inputs:
                raise SignatureRefusal("sig.missing", "The request has no signature with the expected label.")
            return self.policy.label
        keyids = [_inner(m)[1].get("keyid") for m in sig_inputs.values()]
        for label, kid in zip(sig_inputs, keyids, strict=True):
            if isinstance(kid, str) and kid in self._keys:
                return label
        if any(not isinstance(kid, str) for kid in keyids):
            raise SignatureRefusal("sig.keyid_missing")
        raise SignatureRefusal("sig.unknown_key")

    def _check_times(self, created: object, expires: object, now: float) -> None:
        """§2.3 `created`/`expires` against the clock (§3.2.1 maximum age, expiry).

        `created` may be up to `clock_skew_seconds` ahead of us; its age is at most
        `max_age_seconds`. So a signature is acceptable until now + skew + max_age at
        the latest — exactly as long as the nonce cache remembers its nonce.
        """
        policy = self.policy
        if created is None:
            if policy.require_created:
                raise SignatureRefusal("sig.created_missing")
        else:
            assert isinstance(created, int)  # _check_param_types
            if created > now + policy.clock_skew_seconds:
                raise SignatureRefusal("sig.created_in_future")
            if now - created > policy.max_age_seconds:
                raise SignatureRefusal("sig.expired", "The request signature has expired.")
        if expires is not None:
            assert isinstance(expires, int)
            # §3.2.1: "Rejection of signatures past the expiration time in the expires time stamp."
            if now > expires + policy.clock_skew_seconds:
                raise SignatureRefusal("sig.expired", "The request signature has expired.")

    def _check_coverage(self, inner_list: list[Any], query: str, body: bytes | None,
                        has_digest: bool) -> list[str]:
        """The covered components against the policy (§3.2.1; §7.2.1 Insufficient Coverage)."""
        covered: set[tuple[str, frozenset[tuple[str, Any]]]] = set()
        texts = []
        for entry in inner_list:
            name, params = entry if isinstance(entry, tuple) else (entry, {})
            if not isinstance(name, str) or not isinstance(params, dict):
                raise SignatureRefusal("sig.malformed")
            text = _component_text(name, params)
            try:
                ident = _component(text)
            except ValueError:
                raise SignatureRefusal("sig.malformed") from None
            if ident in covered:
                raise SignatureRefusal("sig.malformed")  # §2.5: a component may appear only once
            covered.add(ident)
            texts.append(text)
        for text, (name, params) in self._required:
            if (name, params) not in covered and (params or not _covers(covered, name)):
                raise SignatureRefusal("sig.component_missing", f"The signature must cover {text}.")
        if query and self.policy.query_required_when_present and not _covers(covered, "@query"):
            raise SignatureRefusal("sig.query_not_covered", "The signature must cover @query.")
        if body and self.policy.content_digest_required_with_body:
            if not has_digest:
                raise SignatureRefusal("sig.digest_missing", "A request with content needs Content-Digest.")
            # Whole field (optionally ;sf) or a member by ;key — any covered digest
            # value is then checked against the body after verification.
            if not any(n == "content-digest" and {p for p, _ in ps} <= {"sf", "key"} for n, ps in covered):
                raise SignatureRefusal("sig.digest_not_covered", "The signature must cover content-digest.")
        return texts


def _resolver(message: _Request) -> object:
    construct: Callable[[Any], object] = HTTPSignatureComponentResolver
    return construct(message)


def _parse_dictionary(text: str) -> dict[str, Any]:
    """A Signature or Signature-Input value (RFC 9421 §4.1/§4.2: Dictionary, RFC 8941 §3.2)."""
    def duplicate(key: str, context: str) -> None:
        if context == "dictionary":
            # RFC 8941 would keep the last; §4: a label "MUST be unique within a given HTTP message".
            raise ValueError(f"label {key!r} twice")

    try:
        parsed = http_sf.parse(text.encode("latin-1"), tltype="dictionary", on_duplicate_key=duplicate)
    except (ValueError, UnicodeEncodeError):
        raise SignatureRefusal("sig.malformed") from None
    if not isinstance(parsed, dict):
        raise SignatureRefusal("sig.malformed")
    return parsed


def _inner(member: Any) -> tuple[list[Any], dict[str, Any]]:
    if not isinstance(member, tuple) or not isinstance(member[0], list) or not isinstance(member[1], dict):
        raise SignatureRefusal("sig.malformed")
    return member[0], member[1]


def _byte_sequence(member: Any) -> bytes:
    if not isinstance(member, tuple) or not isinstance(member[0], bytes):
        raise SignatureRefusal("sig.malformed")
    return member[0]


def _check_param_types(params: Any) -> None:
    """§2.3: created/expires are Integers, alg/keyid/nonce/tag Strings."""
    if not isinstance(params, dict):
        raise SignatureRefusal("sig.malformed")
    for name, value in params.items():
        if name in ("created", "expires") and (type(value) is not int or value < 0):
            raise SignatureRefusal("sig.malformed")
        if name in ("alg", "keyid", "nonce", "tag") and not isinstance(value, str):
            raise SignatureRefusal("sig.malformed")


def _load_signing_key(alg: str, key: SigningKey | str, key_id: str) -> SigningKey:
    """The signing key checked against `alg`: secret bytes (≥ 32) for HMAC, else a
    private key object or its PEM."""
    if alg == "hmac-sha256":
        if not isinstance(key, bytes) or len(key) < MIN_HMAC_SECRET_BYTES:
            raise ValueError(f"key {key_id!r}: hmac-sha256 needs a secret of at least {MIN_HMAC_SECRET_BYTES} bytes")
        return key
    if isinstance(key, (bytes, str)):
        try:
            loaded = load_pem_private_key(key.encode("ascii") if isinstance(key, str) else key, password=None)
        except (ValueError, TypeError):
            raise ValueError(f"key {key_id!r}: not an unencrypted PEM private key") from None
        if not isinstance(loaded, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise ValueError(f"key {key_id!r}: a {type(loaded).__name__} cannot be used with {alg}")
        key = loaded
    _check_key_type(alg, key, key_id)
    return key


class ResponseSigner:
    """Signs responses so partners can verify what they received (RFC 9421 §2.2.9 @status,
    Appendix B.2.4): covers ``@status``, ``content-type`` (when present) and
    ``content-digest``, with ``created``, ``keyid`` and ``alg``."""

    def __init__(self, key_id: str, private_key: SigningKey | str, alg: Alg, *, label: str = "portcullis",
                 digest_alg: Literal["sha-256", "sha-512"] = "sha-256",
                 clock: Callable[[], float] = time.time) -> None:
        self.key_id = key_id
        self.alg = alg
        self.label = label
        self.digest_alg = digest_alg
        self._clock = clock
        self._signer = HTTPMessageSigner(
            signature_algorithm=_ALGORITHMS[alg],
            key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: _load_signing_key(alg, private_key,
                                                                                                    key_id)}))

    def sign(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes,
             request_signature: SignatureResult | None = None) -> list[tuple[bytes, bytes]]:
        """The ``content-digest``, ``signature-input`` and ``signature`` fields to send.

        The caller replaces any fields of those names in the response with these (the
        digest is of `body` as sent). With `request_signature`, the response also covers
        the request's signature (``"signature";req;key=<label>``, RFC 9421 §2.4), tying
        it to the request it answers.
        """
        digest = content_digest(body, self.digest_alg).decode("ascii")
        drop = {"content-digest", "signature-input", "signature"}
        lines = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in headers]
        lines = [(n, v) for n, v in lines if n not in drop] + [("content-digest", digest)]
        components = ["@status"]
        if any(n == "content-type" for n, _ in lines):
            components.append("content-type")  # covering an absent field cannot be verified (§2.5)
        components.append("content-digest")
        request = None
        if request_signature is not None:
            sig_field = http_sf.ser({request_signature.label: (request_signature.signature, {})})
            request = _Request(request_signature.method, request_signature.target_uri,
                               _Fields([("signature", sig_field)]))
            components.append(f'"signature";req;key={http_sf.ser(request_signature.label)}')
        message = _Response(status, _Fields(lines), request)
        self._signer.sign(message, key_id=self.key_id, created=datetime.fromtimestamp(self._clock(), tz=UTC),
                          label=self.label, include_alg=True, covered_component_ids=components,
                          use_existing_digest=True)
        out = message.headers
        return [(b"content-digest", digest.encode("ascii")),
                (b"signature-input", out["signature-input"].encode("ascii")),
                (b"signature", out["signature"].encode("ascii"))]
