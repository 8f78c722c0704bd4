"""JOSE conformance: published attack and interoperability vectors through Portcullis' own JWS/JWK code.

Vector sets (copied into ``tests/vectors``; sources and licences in the ``SOURCE.md`` files there;
the operator's summary is ``docs/conformance.md``):

- Project Wycheproof ``json_web_signature_test.json`` and ``json_web_key_test.json``: compact JWS
  tokens, each with the JWK (Set) to verify it with;
- Project Wycheproof ECDSA P-256/SHA-256 in IEEE P1363 form (``r || s``, the JWS ES256 encoding,
  RFC 7518 §3.4), Ed25519, RSASSA-PKCS1-v1_5 2048/SHA-256 (RS256) and RSASSA-PSS 2048/SHA-256/
  MGF1-SHA-256/salt 32 (PS256): raw signatures over raw messages;
- RFC 8037 Appendix A (Ed25519 JWS and the RFC 7638 thumbprint of its key), RFC 7520 §4.1-4.4 and
  the RFC 8037 example as JSON (the JOSE cookbook).

The path. The Wycheproof JWS payloads are arbitrary octets ("foo", empty, zeros), not JWT claims sets,
so `JwtVerifier.verify` refuses every one of them as ``jwt.malformed`` (or ``jwt.unknown_issuer``)
before it looks at the signature: a verdict about the payload, not about the JWS. The JWS vectors go
through `verify_jws` instead: `JwtVerifier.verify`'s JWS steps in the same order and with the same
functions (`_b64json` for the header, `b64decode`, the algorithm allowlist, `IssuerKeys.candidates`,
`verify_signature`), keys imported by `import_keys` as from the issuer's JWKS; only the claims steps
are left out. `TestJwtVerifierAgrees` runs every JWS vector through `JwtVerifier.verify` as well and
checks it refuses, with the same reason wherever the refusal comes before the payload is read.

Expected outcome of each case: Wycheproof ``valid`` is accepted and ``invalid`` refused, except:

- `POLICY_REFUSED`: valid, but refused by design (HMAC and ``none`` are never allowed; strict base64url);
- `ACCEPTABLE`: the decision for each ``acceptable`` case, with its reason;
- `KNOWN_BUGS`: invalid cases we accept today: ``xfail(strict=True)``, reported, not fixed here.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from joserfc.jwk import KeySet

from portcullis.credentials import rfc9449
from portcullis.credentials.jwt import (
    ALLOWED_ALGORITHMS,
    IssuerKeys,
    JwtConfig,
    JwtIssuerConfig,
    JwtRefusal,
    JwtVerifier,
    _b64json,
    alg_fits_key,
    b64decode,
    import_keys,
    verify_signature,
)
from portcullis.credentials.rfc9449 import jwk_thumbprint

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
WYCHEPROOF = VECTORS / "wycheproof"
JOSE = VECTORS / "jose"

JWS: Final = "json_web_signature_test.json"
JWK: Final = "json_web_key_test.json"
ECDSA: Final = "ecdsa_secp256r1_sha256_p1363_test.json"
ED25519: Final = "ed25519_test.json"
RSA_PKCS1: Final = "rsa_signature_2048_sha256_test.json"
RSA_PSS: Final = "rsa_pss_2048_sha256_mgf1_32_test.json"

ACCEPTED: Final = "accepted"

# joserfc warns about the 1024-bit key of JWK tcId 8 while import_keys drops it, as it should.
pytestmark = pytest.mark.filterwarnings("ignore:Key size should be:joserfc.jwk.SecurityWarning")
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


def _json(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


@functools.cache
def wycheproof(name: str) -> dict[str, Any]:
    return _json(WYCHEPROOF / name)


# --- Decisions ---------------------------------------------------------------------------------

HMAC_NEVER = ("HMAC is never allowed: an issuer's public key must never verify a MAC (RFC 8725 §3.1, §3.2); "
              "`oct` keys are dropped from the JWKS as well")


@dataclass(frozen=True)
class Refused:
    """A case Wycheproof calls valid (or acceptable) that we refuse, with the audit reason we give."""

    reason: str
    why: str


POLICY_REFUSED: dict[tuple[str, int], Refused] = {
    (JWS, 1): Refused("jwt.alg_not_allowed", "HS256. " + HMAC_NEVER),
    (JWS, 348): Refused("jwt.alg_not_allowed", "HS256 (RFC 7520 Figure 35). " + HMAC_NEVER),
    (JWS, 352): Refused("jwt.alg_not_allowed", "HS256 (RFC 7520 Figure 35). " + HMAC_NEVER),
    (JWS, 357): Refused("jwt.alg_not_allowed", "HS256. " + HMAC_NEVER),
    (JWS, 358): Refused("jwt.alg_not_allowed", "HS256 (MAC starting with zero bytes). " + HMAC_NEVER),
    (JWS, 359): Refused("jwt.alg_not_allowed", "HS256 (MAC starting with 0xff bytes). " + HMAC_NEVER),
    (JWS, 372): Refused("jwt.malformed", "a '?' inside the header segment: not base64url (RFC 7515 §2); we decode "
                                         "strictly rather than skip foreign characters (and the alg is HS256)"),
    (JWS, 373): Refused("jwt.alg_not_allowed", "HS256 (and a '?' inside the payload segment, not base64url). "
                        + HMAC_NEVER),
    (JWS, 376): Refused("jwt.alg_not_allowed", "HS256 (spaces in the header JSON are fine by us). " + HMAC_NEVER),
    (JWS, 377): Refused("jwt.alg_not_allowed", "HS256 (tab/newline in the header JSON are fine by us). "
                        + HMAC_NEVER),
    (JWK, 2): Refused("jwt.alg_not_allowed", "HS256 with an `oct` key set. " + HMAC_NEVER),
    (JWK, 13): Refused("jwt.alg_not_allowed", "HS256 with a long `oct` key. " + HMAC_NEVER),
    (JWK, 14): Refused("jwt.alg_not_allowed", "HS384 with a long `oct` key. " + HMAC_NEVER),
    (JWK, 15): Refused("jwt.alg_not_allowed", "HS512 with a long `oct` key. " + HMAC_NEVER),
    # A key is for the one algorithm it declares (RFC 7517 §4.4, RFC 8725 §3.1): Wycheproof calls these valid,
    # but they are signed with another algorithm than the key's own `alg`.
    (JWS, 346): Refused("jwt.bad_signature", "PS384 signature by a key that declares alg PS256"),
    (JWS, 350): Refused("jwt.bad_signature", "PS384 signature by a key that declares alg PS256 (key_ops set)"),
    (JWS, 347): Refused("jwt.unknown_kid", "the key declares alg ES521, which is not a JWS algorithm: dropped"),
    (JWS, 351): Refused("jwt.unknown_kid", "the key declares alg ES521, which is not a JWS algorithm: dropped "
                                           "(key_ops set)"),
}


@dataclass(frozen=True)
class Decision:
    """Our decision for a Wycheproof ``acceptable`` case."""

    accept: bool
    why: str


ACCEPTABLE: dict[tuple[str, int], Decision] = {
    (RSA_PKCS1, 8): Decision(False, "DigestInfo without the NULL parameter: refused. OpenSSL (through `cryptography`) "
                                    "accepts only the encoding RFC 8017 §9.2 lists for SHA-256 (with NULL), which "
                                    "every RS256 signer emits; one encoding per signature"),
}

# Found by these vectors and fixed: the JWK `alg` member is now enforced (alg_fits_key), and keys declaring
# an algorithm we do not allow are dropped (JWS tcIds 332-340 refused; JWK tcIds 19, 20 dropped, see
# DROPPED_KEYS). What remains known and unfixed:
# (The ROCA key, JWK tcId 7, was the last one: it is now dropped by a fingerprint check.)
KNOWN_BUGS: dict[tuple[str, int], str] = {}

# Keys that import_keys must drop (by the first tcId of their group); every other public key is imported.
DROPPED_KEYS: dict[tuple[str, int], str] = {
    (JWS, 353): "RSA key with use=enc",
    (JWS, 354): "EC key with use=enc",
    (JWS, 355): "RSA key with key_ops=[encrypt] (joserfc refuses the verify operation)",
    (JWS, 356): "EC key with key_ops=[encrypt] (joserfc refuses the verify operation)",
    (JWK, 6): "RSA key with use=enc, alg RSA1_5",
    (JWK, 8): "1024-bit RSA key (below 2048, RFC 7518 §3.3)",
    (JWK, 9): "RSA public exponent 1 (cryptography refuses it)",
    (JWK, 21): "EC key with use=enc",
    (JWK, 22): "EC point not on P-256",
    (JWK, 23): "crv P-384 with P-256-sized coordinates",
    (JWK, 24): "kty RSA with EC members",
    (JWK, 7): "RSA modulus with the ROCA fingerprint (CVE-2017-15361): factorable",
    (JWK, 19): "P-256 key declaring alg ES521 (not a JWS algorithm)",
    (JWK, 20): "P-256 key declaring alg ES224 (not a JWS algorithm)",
    (JWS, 347): "P-256 key declaring alg ES521 (not a JWS algorithm)",
    (JWS, 351): "P-256 key declaring alg ES521 (not a JWS algorithm), with key_ops",
}

# The DPoP `jwk` header import (rfc9449._public_key) on the same public keys: refused where import_keys drops
# a key for what the key *is*; `use`, `key_ops` and `alg` are the holder's own description of its key, and a
# DPoP proof is signed by that holder, so they are not checked there (decision, not a bug: JWK tcIds 19 and 20
# are accepted there too). A weak (ROCA, JWK tcId 7) DPoP key is accepted as well: the holder's own risk.
DPOP_ACCEPTS_ALTHOUGH_DROPPED: dict[tuple[str, int], str] = {
    (JWS, 353): "use=enc is not checked for a DPoP key",
    (JWS, 354): "use=enc is not checked for a DPoP key",
    (JWS, 355): "key_ops is not checked for a DPoP key",
    (JWS, 356): "key_ops is not checked for a DPoP key",
    (JWK, 6): "use=enc is not checked for a DPoP key",
    (JWK, 21): "use=enc is not checked for a DPoP key",
    (JWK, 19): "a JWK `alg` member is not checked for a DPoP key (the proof's own alg is allowlisted)",
    (JWK, 20): "a JWK `alg` member is not checked for a DPoP key (the proof's own alg is allowlisted)",
    (JWS, 347): "a JWK `alg` member is not checked for a DPoP key (the proof's own alg is allowlisted)",
    (JWS, 351): "a JWK `alg` member is not checked for a DPoP key (the proof's own alg is allowlisted)",
    (JWK, 7): "no ROCA check for a DPoP key: a weak key is its own holder's risk",
}


def expected(name: str, test: dict[str, Any]) -> str | None:
    """The outcome a case must have: ACCEPTED, a refusal reason, or None for "refused, any reason"."""
    key = (name, test["tcId"])
    if key in POLICY_REFUSED:
        return POLICY_REFUSED[key].reason
    if test["result"] == "acceptable":
        return ACCEPTED if ACCEPTABLE[key].accept else None
    return ACCEPTED if test["result"] == "valid" else None


def check(name: str, test: dict[str, Any], outcome: str) -> None:
    want = expected(name, test)
    label = f"{name} tcId {test['tcId']} ({test['result']}: {test['comment']})"
    if want is None:
        assert outcome != ACCEPTED, f"{label} was accepted"
    else:
        assert outcome == want, f"{label}: {outcome}, expected {want}"


def cases(name: str) -> Iterator[Any]:
    """pytest params (group index, test), one per tcId, with the known bugs marked xfail(strict)."""
    for index, group in enumerate(wycheproof(name)["testGroups"]):
        for test in group["tests"]:
            bug = KNOWN_BUGS.get((name, test["tcId"]))
            marks = [pytest.mark.xfail(strict=True, raises=AssertionError, reason=bug)] if bug else []
            yield pytest.param(index, test, id=f"tc{test['tcId']}", marks=marks)


# --- The JWS steps of JwtVerifier.verify ---------------------------------------------------------


def verify_jws(jws: str, keys: IssuerKeys, algorithms: frozenset[str] = ALLOWED_ALGORITHMS) -> str:
    """ACCEPTED, or the audit reason `JwtVerifier.verify` gives, for a compact JWS whose payload is any octets.

    The steps and their order are `JwtVerifier.verify`'s, with an issuer allowing every algorithm we allow;
    the claims steps (payload as a JSON claims set, iss, exp, aud, ...) are left out.
    """
    token = jws.encode("utf-8")
    parts = token.split(b".")
    if len(parts) != 3:
        return "jwt.malformed"
    try:
        header = _b64json(parts[0])
    except JwtRefusal as refusal:
        return refusal.reason
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in algorithms:
        return "jwt.alg_not_allowed"
    if not parts[2]:
        return "jwt.malformed"
    try:
        b64decode(parts[1])  # any octets; JwtVerifier requires a JSON claims set here
    except ValueError:
        return "jwt.malformed"
    if "crit" in header:
        return "jwt.crit_unsupported"
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        return "jwt.malformed"
    candidates = keys.candidates(kid)
    if kid is not None and not candidates:
        return "jwt.unknown_kid"
    try:
        sig = b64decode(parts[2])
    except ValueError:
        return "jwt.malformed"
    signing_input = parts[0] + b"." + parts[1]
    if any(verify_signature(alg, k, signing_input, sig) for k, declared in candidates if alg_fits_key(alg, declared)):
        return ACCEPTED
    return "jwt.bad_signature"


def jwk_set(group: dict[str, Any], part: str) -> dict[str, Any]:
    """A group's "public" or "private" member as a JWK Set (JWS groups hold one JWK, JWK groups a set)."""
    doc = group.get(part)
    if doc is None:
        return {"keys": []}
    return doc if "keys" in doc else {"keys": [doc]}


def published(group: dict[str, Any]) -> dict[str, Any]:
    """What the issuer publishes: the public keys, or, for the HMAC groups that have none, the `oct` keys
    themselves (a misconfigured JWKS: import_keys must drop them)."""
    return jwk_set(group, "public") if "public" in group else jwk_set(group, "private")


@functools.cache
def group_keys(name: str, index: int) -> IssuerKeys:
    return import_keys(published(wycheproof(name)["testGroups"][index]))


def first_tcid(group: dict[str, Any]) -> int:
    tcid: int = group["tests"][0]["tcId"]
    return tcid


def group_params(name: str) -> Iterator[Any]:
    for index, group in enumerate(wycheproof(name)["testGroups"]):
        yield pytest.param(index, id=f"{group['comment']}-tc{first_tcid(group)}")


def key_count(keys: IssuerKeys) -> int:
    return sum(len(v) for v in keys.by_kid.values())


def public_entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The JWKs of a set that are asymmetric public keys: the only ones import_keys may take."""
    return [k for k in doc["keys"] if k.get("kty") != "oct" and not any(m in k for m in PRIVATE_MEMBERS)]


def joserfc_thumbprint(jwk: dict[str, Any]) -> str:
    tp: str = KeySet.import_key_set({"keys": [jwk]}).keys[0].thumbprint()
    return tp


# --- Wycheproof JSON Web Signature ------------------------------------------------------------------


@pytest.mark.parametrize(("index", "test"), list(cases(JWS)))
def test_wycheproof_jws(index: int, test: dict[str, Any]) -> None:
    check(JWS, test, verify_jws(test["jws"], group_keys(JWS, index)))


@pytest.mark.parametrize("index", list(group_params(JWS)))
def test_wycheproof_jws_keys(index: int) -> None:
    """Private and `oct` keys never enter the key set; the public signing keys do, unless marked for encryption."""
    group = wycheproof(JWS)["testGroups"][index]
    private = jwk_set(group, "private")
    assert public_entries(private) == []
    assert key_count(import_keys(private)) == 0
    imported = key_count(group_keys(JWS, index))
    want = 0 if (JWS, first_tcid(group)) in DROPPED_KEYS else len(public_entries(published(group)))
    assert imported == want
    if imported:
        jwk = group["public"]
        assert jwk_thumbprint(jwk) == joserfc_thumbprint(jwk)


# --- Wycheproof JSON Web Key --------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "test"), list(cases(JWK)))
def test_wycheproof_jwk(index: int, test: dict[str, Any]) -> None:
    group = wycheproof(JWK)["testGroups"][index]
    keys = group_keys(JWK, index)
    # The keys themselves: private and `oct` keys never imported, public ones unless dropped for a reason.
    private = jwk_set(group, "private")
    assert key_count(import_keys(private)) == len(public_entries(private))  # the mixed set's EC key is public
    public = public_entries(published(group))
    dropped = (JWK, first_tcid(group)) in DROPPED_KEYS
    assert key_count(keys) == (0 if dropped else len(public))
    if not dropped:
        for jwk in public:
            assert jwk_thumbprint(jwk) == joserfc_thumbprint(jwk)
    # And the JWS made with it.
    check(JWK, test, verify_jws(test["jws"], keys))


def _public_jwks() -> Iterator[Any]:
    for name in (JWS, JWK):
        for group in wycheproof(name)["testGroups"]:
            for jwk in jwk_set(group, "public")["keys"]:
                yield pytest.param(name, first_tcid(group), jwk, id=f"{name.split('_')[2]}-tc{first_tcid(group)}")


@pytest.mark.parametrize(("name", "tcid", "jwk"), list(_public_jwks()))
def test_dpop_key_import(name: str, tcid: int, jwk: dict[str, Any]) -> None:
    """The strict DPoP `jwk` import refuses what import_keys drops for what the key is, and its thumbprint
    of an accepted key is joserfc's."""
    try:
        rfc9449._public_key(jwk)
        accepted = True
    except ValueError:
        accepted = False
    want = (name, tcid) not in DROPPED_KEYS or (name, tcid) in DPOP_ACCEPTS_ALTHOUGH_DROPPED
    assert accepted == want
    if accepted:
        assert jwk_thumbprint(jwk) == joserfc_thumbprint(jwk)


# --- Wycheproof signature primitives through verify_signature ----------------------------------------


def _b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def primitive_jwk(group: dict[str, Any]) -> dict[str, Any]:
    """The group's public key as a JWK; a few ECDSA groups give only the coordinates."""
    jwk: dict[str, Any] | None = group.get("publicKeyJwk") or group.get("keyJwk")
    if jwk is not None:
        return jwk
    pub = group["publicKey"]
    assert pub["curve"] == "secp256r1"
    return {"kty": "EC", "crv": "P-256", "x": _b64u(int(pub["wx"], 16).to_bytes(32, "big")),
            "y": _b64u(int(pub["wy"], 16).to_bytes(32, "big"))}


@functools.cache
def primitive_key(name: str, index: int) -> IssuerKeys:
    return import_keys({"keys": [primitive_jwk(wycheproof(name)["testGroups"][index])]})


PRIMITIVES = {ECDSA: ("ES256",), ED25519: ("EdDSA", "Ed25519"), RSA_PKCS1: ("RS256",), RSA_PSS: ("PS256",)}


def _primitive_cases() -> Iterator[Any]:
    for name in PRIMITIVES:
        for param in cases(name):
            index, test = param.values
            yield pytest.param(name, index, test, id=f"{name.removesuffix('_test.json')}-{param.id}",
                               marks=param.marks)


@pytest.mark.parametrize(("name", "index", "test"), list(_primitive_cases()))
def test_wycheproof_signature(name: str, index: int, test: dict[str, Any]) -> None:
    ((key, _),) = primitive_key(name, index).candidates(None)  # imported through the JWKS path
    msg, sig = bytes.fromhex(test["msg"]), bytes.fromhex(test["sig"])
    for alg in PRIMITIVES[name]:  # Ed25519: the RFC 8037 name and the RFC 9864 one
        check(name, test, ACCEPTED if verify_signature(alg, key, msg, sig) else "refused")


# --- Non-canonical base64url (the property of Wycheproof JWS tcId 374) ------------------------------


def _reencoded(segment: str) -> str:
    """The same octets with a non-zero pad bit in the last character (RFC 4648 §3.5)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) ^ 1]


def test_wycheproof_374_payload_is_refused_by_algorithm() -> None:
    """tcId 374 ("ModifiedUnusedBitsInPayload", payload "AB") is refused, but only because it is HS256."""
    case = next(t for g in wycheproof(JWS)["testGroups"] for t in g["tests"] if t["tcId"] == 374)
    assert case["jws"].split(".")[1] == "AB"
    assert verify_jws(case["jws"], IssuerKeys({})) == "jwt.alg_not_allowed"


# Found by these vectors and fixed: b64decode accepted non-zero pad bits (RFC 4648 §3.5), so a token had up to
# 16 spellings that verified, each with its own `sha256:` credential id (a revocation bypass). Now refused, and
# for ECDSA the credential id hashes the signed part (header.payload), which malleability cannot change either.
@pytest.mark.parametrize("tcid", [18, 33, 272])
def test_noncanonical_signature_encoding_is_refused(tcid: int) -> None:
    """tcId 374's mutation applied to the signature of an accepted ES256 / RS256 / PS256 vector."""
    index, case = next((i, t) for i, g in enumerate(wycheproof(JWS)["testGroups"]) for t in g["tests"]
                       if t["tcId"] == tcid)
    keys = group_keys(JWS, index)
    assert verify_jws(case["jws"], keys) == ACCEPTED
    head, payload, sig = case["jws"].split(".")
    assert verify_jws(f"{head}.{payload}.{_reencoded(sig)}", keys) == "jwt.malformed"


# --- The same vectors through JwtVerifier.verify ------------------------------------------------------

ISS = "https://issuer.example"


async def jwt_verifier_reason(jws: str, jwks: dict[str, Any]) -> str:
    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=ISS, jwks_uri=ISS + "/jwks", audience="https://api.example",
                                             algorithms=sorted(ALLOWED_ALGORITHMS))])
    doc = json.dumps(jwks).encode()
    verifier = JwtVerifier(cfg, fetch=lambda url: doc, clock=lambda: 1_800_000_000.0)
    try:
        await verifier.verify(jws.encode("utf-8"))
    except JwtRefusal as refusal:
        return refusal.reason
    return ACCEPTED


class TestJwtVerifierAgrees:
    """`JwtVerifier.verify` refuses every Wycheproof JWS (none is an access token) and, where it refuses before
    reading the payload, for the same reason as `verify_jws`: the two paths share their header handling."""

    @pytest.mark.parametrize("name", [JWS, JWK])
    def test_every_vector(self, name: str) -> None:
        mismatches = []
        for index, group in enumerate(wycheproof(name)["testGroups"]):
            for test in group["tests"]:
                ours = verify_jws(test["jws"], group_keys(name, index))
                full = asyncio.run(jwt_verifier_reason(test["jws"], published(group)))
                ok = full != ACCEPTED and (
                    full == ours if ours in ("jwt.alg_not_allowed", "jwt.malformed")
                    else full in ("jwt.malformed", "jwt.unknown_issuer") or full == ours)
                if not ok:
                    mismatches.append((test["tcId"], ours, full))
        assert mismatches == []


# --- RFC 8037 Appendix A and the JOSE cookbook (RFC 7520) ---------------------------------------------

RFC8037 = _json(JOSE / "rfc8037_appendix_a.json")
COOKBOOK = JOSE / "cookbook"


def public_part(jwk: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in jwk.items() if k not in PRIVATE_MEMBERS}


class TestRfc8037AppendixA:
    public = public_part(RFC8037["jwk"])

    def key(self) -> Any:
        ((key, _),) = import_keys({"keys": [self.public]}).candidates(None)
        return key

    def test_a4_signature_verifies_with_the_a2_public_key(self) -> None:
        head, payload, sig = RFC8037["jws_compact"].encode().split(b".")
        assert b64decode(payload) == RFC8037["payload"].encode()
        assert json.loads(b64decode(head)) == RFC8037["protected"]
        assert verify_signature("EdDSA", self.key(), head + b"." + payload, b64decode(sig))
        assert verify_signature("Ed25519", self.key(), head + b"." + payload, b64decode(sig))  # RFC 9864 name

    def test_a4_through_the_jws_steps(self) -> None:
        assert verify_jws(RFC8037["jws_compact"], import_keys({"keys": [self.public]})) == ACCEPTED

    def test_a4_altered_is_refused(self) -> None:
        head, payload, sig = RFC8037["jws_compact"].encode().split(b".")
        raw = bytearray(b64decode(sig))
        raw[0] ^= 1
        assert not verify_signature("EdDSA", self.key(), head + b"." + payload, bytes(raw))
        assert not verify_signature("EdDSA", self.key(), head + b"." + payload + b"x", b64decode(sig))
        assert not verify_signature("ES256", self.key(), head + b"." + payload, b64decode(sig))  # key type fits alg

    def test_a3_thumbprint(self) -> None:
        assert jwk_thumbprint(self.public) == RFC8037["jwk_thumbprint_sha256"]
        # Only the required members count (RFC 7638 §3.2): the private key has the same thumbprint.
        assert jwk_thumbprint(RFC8037["jwk"]) == RFC8037["jwk_thumbprint_sha256"]

    def test_a1_private_key_is_never_imported(self) -> None:
        assert key_count(import_keys({"keys": [RFC8037["jwk"]]})) == 0

    def test_dpop_import_accepts_the_key(self) -> None:
        assert rfc9449._public_key(self.public) is not None


COOKBOOK_JWS = {
    "jws/4_1.rsa_v15_signature.json": ACCEPTED,
    "jws/4_2.rsa-pss_signature.json": ACCEPTED,
    "jws/4_3.ecdsa_signature.json": ACCEPTED,
    "jws/4_4.hmac-sha2_integrity_protection.json": "jwt.alg_not_allowed",  # HMAC_NEVER
    "curve25519/jws.json": ACCEPTED,
}


@pytest.mark.parametrize(("path", "want"), list(COOKBOOK_JWS.items()))
def test_jose_cookbook(path: str, want: str) -> None:
    doc = _json(COOKBOOK / path)
    jwk = doc["input"]["key"]
    keys = import_keys({"keys": [public_part(jwk)]})
    assert key_count(import_keys({"keys": [jwk]})) == 0  # as published, with its private part: dropped
    assert key_count(keys) == (0 if jwk["kty"] == "oct" else 1)
    assert verify_jws(doc["output"]["compact"], keys) == want
    if jwk["kty"] != "oct":
        assert jwk_thumbprint(jwk) == joserfc_thumbprint(public_part(jwk))


def test_cookbook_ed25519_is_rfc8037_a4() -> None:
    assert _json(COOKBOOK / "curve25519/jws.json")["output"]["compact"] == RFC8037["jws_compact"]


# --- The decision tables match the vector files -------------------------------------------------------


def _all_tests() -> dict[tuple[str, int], dict[str, Any]]:
    names = [JWS, JWK, *PRIMITIVES]
    return {(n, t["tcId"]): t for n in names for g in wycheproof(n)["testGroups"] for t in g["tests"]}


def test_tables_name_real_cases() -> None:
    tests = _all_tests()
    for key in POLICY_REFUSED:
        assert tests[key]["result"] in ("valid", "acceptable"), key
    for key in ACCEPTABLE:
        assert tests[key]["result"] == "acceptable", key
    for key in KNOWN_BUGS:
        assert tests[key]["result"] == "invalid", key
    assert {k for k, t in tests.items() if t["result"] == "acceptable"} == set(ACCEPTABLE)
    groups = {(n, first_tcid(g)) for n in (JWS, JWK) for g in wycheproof(n)["testGroups"]}
    assert set(DROPPED_KEYS) <= groups
    assert set(DPOP_ACCEPTS_ALTHOUGH_DROPPED) <= set(DROPPED_KEYS)


def test_vector_counts() -> None:
    """The files are the ones docs/conformance.md describes (a changed copy changes these)."""
    for name, total in ((JWS, 401), (JWK, 26), (ECDSA, 262), (ED25519, 151), (RSA_PKCS1, 259), (RSA_PSS, 108)):
        doc = wycheproof(name)
        assert doc["numberOfTests"] == total == sum(len(g["tests"]) for g in doc["testGroups"])
