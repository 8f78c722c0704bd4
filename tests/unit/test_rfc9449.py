"""DPoP proofs at the resource server (RFC 9449): the RFC's own example proof, the RFC 7638
thumbprint example, proofs made by an independent client library, and an attack suite in
which each case expects its own refusal reason. Real keys throughout, no mocks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from pathlib import Path
from typing import Any

import pytest
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry
from pydantic import ValidationError

from portcullis.credentials.rfc9449 import (
    DpopConfig,
    DpopNonces,
    DpopRefusal,
    DpopResult,
    DpopVerifier,
    ReplayCache,
    access_token_hash,
    dpop_challenge,
    jwk_thumbprint,
    normalize_htu,
    proof_from_headers,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "rfc9449"
RFC9449_4_1 = json.loads((VECTORS / "section_4_1_proof.json").read_text(encoding="utf-8"))

NOW = 1_800_000_000
URL = "https://api.example.com/v1/orders"
TOKEN = b"Kz~8qAB1-yxHc_9fJ3.wXqE7lMuTg4rN0pVdS6aLbK2"
SECRET = b"n" * 32

EC = ECKey.generate_key("P-256")
EC384 = ECKey.generate_key("P-384")
RSA = RSAKey.generate_key(2048)
ED = OKPKey.generate_key("Ed25519")
OTHER_EC = ECKey.generate_key("P-256")


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def b64s(data: bytes) -> str:
    return b64(data).decode()


def public(key: Any) -> dict[str, Any]:
    return {k: v for k, v in key.as_dict(private=False).items() if k != "kid"}


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"jti": secrets.token_urlsafe(16), "htm": "GET", "htu": URL, "iat": NOW,
                            "ath": access_token_hash(TOKEN)}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, head: dict[str, Any], body: dict[str, Any]) -> bytes:
    """JWS compact, signed with joserfc's implementation of `head["alg"]`; the header is
    whatever the test says (joserfc's own header checks would stop the attacks)."""
    signing_input = b64(json.dumps(head).encode()) + b"." + b64(json.dumps(body).encode())
    return signing_input + b"." + b64(JWSRegistry.algorithms[head["alg"]].sign(signing_input, key))


def make(key: Any = EC, alg: str = "ES256", body: dict[str, Any] | None = None, jwk: Any = None,
         **header: Any) -> bytes:
    """A proof signed by `key`, carrying `jwk` (default: `key`'s public JWK)."""
    head: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": public(key) if jwk is None else jwk, **header}
    return sign(key, {k: v for k, v in head.items() if v is not None}, claims() if body is None else body)


def forge(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"\x00" * 64) -> bytes:
    return b".".join([b64(json.dumps(header).encode()), b64(json.dumps(body).encode()), b64(signature)])


def verifier(clock: list[float] | None = None, nonces: DpopNonces | None = None, **kw: Any) -> DpopVerifier:
    now = clock if clock is not None else [float(NOW)]
    return DpopVerifier(DpopConfig(**kw), clock=lambda: now[0], nonces=nonces)


def verify(v: DpopVerifier, proof: bytes, *, method: str = "GET", url: str = URL,
           access_token: bytes | None = TOKEN, expected_jkt: str | None = None) -> DpopResult:
    return v.verify(proof, method=method, url=url, access_token=access_token, expected_jkt=expected_jkt)


def refused(v: DpopVerifier, proof: bytes, **kw: Any) -> DpopRefusal:
    with pytest.raises(DpopRefusal) as exc:
        verify(v, proof, **kw)
    return exc.value


EC_JKT = jwk_thumbprint(public(EC))


# --- RFC vectors ------------------------------------------------------------------------------


class TestRfc9449Example:
    """RFC 9449 §4.1: the example proof of a token request."""

    proof = RFC9449_4_1["proof"].encode()

    def _verify(self, v: DpopVerifier) -> DpopResult:
        return v.verify(self.proof, method=RFC9449_4_1["htm"], url=RFC9449_4_1["htu"], access_token=None,
                        expected_jkt=None)

    def test_accepted_with_the_clock_at_its_iat(self) -> None:
        res = self._verify(verifier([RFC9449_4_1["iat"]]))
        assert res.jkt == RFC9449_4_1["jwk_thumbprint_sha256"]
        assert res.jti == "-BwC3ESc6acc2lTc"
        assert res.iat == RFC9449_4_1["iat"]

    def test_stale_with_the_real_clock(self) -> None:
        v = DpopVerifier(DpopConfig(), clock=time.time)
        with pytest.raises(DpopRefusal) as exc:
            self._verify(v)
        assert exc.value.reason == "dpop.stale"

    def test_second_use_is_a_replay(self) -> None:
        v = verifier([RFC9449_4_1["iat"]])
        self._verify(v)
        with pytest.raises(DpopRefusal) as exc:
            self._verify(v)
        assert exc.value.reason == "dpop.replay"

    def test_bound_to_its_key_by_cnf_jkt(self) -> None:
        v = verifier([RFC9449_4_1["iat"]])
        with pytest.raises(DpopRefusal) as exc:
            v.verify(self.proof, method="POST", url=RFC9449_4_1["htu"], access_token=None, expected_jkt=EC_JKT)
        assert exc.value.reason == "dpop.key_mismatch"
        assert exc.value.error == "invalid_token"
        res = v.verify(self.proof, method="POST", url=RFC9449_4_1["htu"], access_token=None,
                       expected_jkt=RFC9449_4_1["jwk_thumbprint_sha256"])
        assert res.jkt == RFC9449_4_1["jwk_thumbprint_sha256"]

    def test_other_method_or_uri(self) -> None:
        v = verifier([RFC9449_4_1["iat"]])
        for method, url, reason in [("GET", RFC9449_4_1["htu"], "dpop.htm_mismatch"),
                                    ("post", RFC9449_4_1["htu"], "dpop.htm_mismatch"),
                                    ("POST", "https://server.example.com/authorize", "dpop.htu_mismatch")]:
            with pytest.raises(DpopRefusal) as exc:
                v.verify(self.proof, method=method, url=url, access_token=None, expected_jkt=None)
            assert exc.value.reason == reason


# RFC 7638 §3.1: the example RSA key and its SHA-256 thumbprint.
RFC7638_KEY: dict[str, str] = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV"
         "4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0"
         "zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-"
         "csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}


class TestThumbprint:
    def test_rfc7638_example(self) -> None:
        assert jwk_thumbprint(RFC7638_KEY) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"

    def test_only_required_members_count(self) -> None:
        bare = {k: RFC7638_KEY[k] for k in ("e", "kty", "n")}
        assert jwk_thumbprint(bare) == jwk_thumbprint({**RFC7638_KEY, "use": "sig", "key_ops": ["verify"]})

    def test_matches_joserfc(self) -> None:
        for key in (EC, EC384, ED, RSA):
            assert jwk_thumbprint(public(key)) == key.thumbprint()

    def test_other_key_types_refused(self) -> None:
        for jwk in ({"kty": "oct", "k": "c2VjcmV0"}, {"kty": "EC", "crv": "P-256", "x": "AAAA"}, {}, {"kty": 1}):
            with pytest.raises(ValueError):
                jwk_thumbprint(jwk)


def test_access_token_hash() -> None:
    # §4.2: base64url(SHA-256(ASCII(token))).
    assert access_token_hash(TOKEN) == b64s(hashlib.sha256(TOKEN).digest())
    assert len(access_token_hash(b"x")) == 43


# --- An independent client library (requests-oauth2client / jwskate) -------------------------


@pytest.fixture
def roc() -> Any:
    return pytest.importorskip("requests_oauth2client")


class TestIndependentClient:
    """Proofs made by requests-oauth2client's `DPoPKey` (signing with jwskate), not by us."""

    @pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA"])
    def test_proofs_verify(self, roc: Any, alg: str) -> None:
        key = roc.DPoPKey.generate(alg=alg)
        proof = key.proof(htm="POST", htu=URL + "?page=2#frag", ath=access_token_hash(TOKEN))
        v = DpopVerifier(DpopConfig(), clock=time.time)
        res = v.verify(str(proof).encode(), method="POST", url=URL + "?page=2", access_token=TOKEN,
                       expected_jkt=key.dpop_jkt)
        assert res.jkt == key.dpop_jkt == jwk_thumbprint(dict(key.public_jwk))
        with pytest.raises(DpopRefusal) as exc:
            v.verify(str(proof).encode(), method="POST", url=URL, access_token=TOKEN, expected_jkt=key.dpop_jkt)
        assert exc.value.reason == "dpop.replay"

    def test_ath_agrees(self, roc: Any) -> None:
        binapy = pytest.importorskip("binapy")
        assert access_token_hash(TOKEN) == binapy.BinaPy(TOKEN.decode()).to("sha256").to("b64u").decode()

    def test_a_request_signed_by_its_auth_handler(self, roc: Any) -> None:
        requests = pytest.importorskip("requests")
        key = roc.DPoPKey.generate(alg="ES256")
        token = roc.DPoPToken(access_token=TOKEN.decode(), _dpop_key=key)
        req = token(requests.Request("DELETE", "https://API.example.com:443/v1/orders?id=7").prepare())
        scheme, _, presented = req.headers["Authorization"].partition(" ")
        assert scheme == "DPoP"
        v = DpopVerifier(DpopConfig(), clock=time.time)
        res = v.verify(req.headers["DPoP"].encode(), method="DELETE", url=URL + "?id=7",
                       access_token=presented.encode(), expected_jkt=key.dpop_jkt)
        assert res.jkt == key.dpop_jkt

    def test_server_nonce_round_trip(self, roc: Any) -> None:
        requests = pytest.importorskip("requests")
        nonces = DpopNonces(SECRET, 300)
        v = DpopVerifier(DpopConfig(require_nonce=True), clock=time.time, nonces=nonces)
        key = roc.DPoPKey.generate(alg="ES256")
        ath = access_token_hash(TOKEN)
        with pytest.raises(DpopRefusal) as exc:
            v.verify(str(key.proof(htm="GET", htu=URL, ath=ath)).encode(), method="GET", url=URL,
                     access_token=TOKEN, expected_jkt=key.dpop_jkt)
        assert exc.value.use_dpop_nonce and exc.value.error == "use_dpop_nonce"
        # The 401 the gateway would send (RFC 9449 §9), read by the client library.
        resp = requests.Response()
        resp.status_code = 401
        for name, value in (v.challenge(exc.value.error, exc.value.detail), nonces.header()):
            resp.headers[name.decode()] = value.decode()
        key.handle_rs_provided_dpop_nonce(resp)
        proof = key.proof(htm="GET", htu=URL, ath=ath)
        assert proof.claims["nonce"] == resp.headers["DPoP-Nonce"]
        res = v.verify(str(proof).encode(), method="GET", url=URL, access_token=TOKEN, expected_jkt=key.dpop_jkt)
        assert res.jkt == key.dpop_jkt


# --- Good proofs ----------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg"), [(EC, "ES256"), (RSA, "RS256"), (RSA, "PS256"), (ED, "EdDSA"),
                                          (ED, "Ed25519")])
def test_each_default_algorithm(key: Any, alg: str) -> None:
    v = verifier()
    res = verify(v, make(key, alg), expected_jkt=jwk_thumbprint(public(key)))
    assert res.jkt == key.thumbprint()
    assert res.iat == NOW


def test_algorithm_outside_the_allowlist() -> None:
    proof = make(EC384, "ES384")
    assert refused(verifier(), proof).reason == "dpop.alg_not_allowed"
    assert verify(verifier(algorithms=["ES384"]), proof).jkt == EC384.thumbprint()


def test_no_access_token_no_ath_needed() -> None:
    assert verify(verifier(), make(body=claims(ath=None)), access_token=None).jkt


def test_typ_with_media_type_prefix() -> None:
    # RFC 7515 §4.1.9: "application/" may be present; media types compare case-insensitively.
    assert verify(verifier(), make(typ="application/DPoP+JWT")).jkt


# --- Attacks, each with its reason -----------------------------------------------------------


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "dpop", "", 1, None])
def test_typ_wrong_or_missing(typ: Any) -> None:
    head: dict[str, Any] = {"alg": "ES256", "jwk": public(EC)}
    if typ is not None:
        head["typ"] = typ
    assert refused(verifier(), sign(EC, head, claims())).reason == "dpop.bad_typ"


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
def test_alg_none_any_spelling(alg: str) -> None:
    proof = b".".join([b64(json.dumps({"typ": "dpop+jwt", "alg": alg, "jwk": public(EC)}).encode()),
                       b64(json.dumps(claims()).encode()), b""])
    assert refused(verifier(), proof).reason == "dpop.malformed"  # no signature at all
    proof += b"AA"
    assert refused(verifier(), proof).reason == "dpop.alg_not_allowed"


@pytest.mark.parametrize("secret", ["jwk-json", "x-coordinate", "pem"])
def test_hs256_keyed_with_the_embedded_public_key(secret: str) -> None:
    jwk = public(EC)
    from cryptography.hazmat.primitives import serialization

    mac_key = {"jwk-json": json.dumps(jwk).encode(),
               "x-coordinate": base64.urlsafe_b64decode(jwk["x"] + "="),
               "pem": EC.get_op_key("verify").public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo)}[secret]
    head, body = {"typ": "dpop+jwt", "alg": "HS256", "jwk": jwk}, claims()
    signing_input = b64(json.dumps(head).encode()) + b"." + b64(json.dumps(body).encode())
    proof = signing_input + b"." + b64(hmac.new(mac_key, signing_input, hashlib.sha256).digest())
    assert refused(verifier(), proof).reason == "dpop.alg_not_allowed"


@pytest.mark.parametrize("algs", [["HS256"], ["none"], ["ES256", "HS512"], [], ["ES256", "ES256"]])
def test_config_never_allows_none_or_hmac(algs: list[str]) -> None:
    with pytest.raises(ValidationError):
        DpopConfig(algorithms=algs)


def test_config_rejects_unknown_fields() -> None:
    with pytest.raises(ValidationError):
        DpopConfig(leeway=5)  # type: ignore[call-arg]


def test_alg_not_a_string() -> None:
    assert refused(verifier(), forge({"typ": "dpop+jwt", "alg": ["ES256"], "jwk": public(EC)}, claims())).reason == \
        "dpop.alg_not_allowed"


@pytest.mark.parametrize("jwk", [None, "a-key", ["k"]])
def test_jwk_missing(jwk: Any) -> None:
    head: dict[str, Any] = {"typ": "dpop+jwt", "alg": "ES256"}
    if jwk is not None:
        head["jwk"] = jwk
    assert refused(verifier(), sign(EC, head, claims())).reason == "dpop.no_jwk"


@pytest.mark.parametrize("key", [EC, RSA, ED], ids=["EC", "RSA", "OKP"])
def test_jwk_with_the_private_key(key: Any) -> None:
    alg = {"EC": "ES256", "RSA": "RS256", "OKP": "EdDSA"}[key.key_type]
    private = key.as_dict(private=True)
    assert "d" in private
    assert refused(verifier(), make(key, alg, jwk=private)).reason == "dpop.private_key"


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_any_private_member(member: str) -> None:
    assert refused(verifier(), make(jwk={**public(EC), member: "AAAA"})).reason == "dpop.private_key"


def test_symmetric_jwk() -> None:
    assert refused(verifier(), make(jwk={"kty": "oct", "alg": "ES256"})).reason == "dpop.private_key"


def test_jwk_of_one_key_signed_by_another() -> None:
    proof = make(OTHER_EC, "ES256", jwk=public(EC))
    assert refused(verifier(), proof).reason == "dpop.bad_signature"


def test_key_type_must_fit_alg() -> None:
    # An EC key named with RS256, and an RSA key named with ES256: verify_signature refuses both.
    assert refused(verifier(), make(RSA, "RS256", jwk=public(EC))).reason == "dpop.bad_signature"
    assert refused(verifier(), make(EC, "ES256", jwk=public(RSA))).reason == "dpop.bad_signature"


@pytest.mark.parametrize("jwk", [
    {"kty": "EC", "crv": "P-256", "x": "AAAA", "y": "AAAA"},                     # short coordinates
    {"kty": "EC", "crv": "P-256", "x": b64s(b"\x01" * 32), "y": b64s(b"\x02" * 32)},  # not on the curve
    {"kty": "EC", "crv": "secp256k1", "x": b64s(b"\x01" * 32), "y": b64s(b"\x02" * 32)},
    {"kty": "OKP", "crv": "Ed448", "x": b64s(b"\x01" * 57)},
    {"kty": "OKP", "crv": "X25519", "x": b64s(b"\x01" * 32)},
    {"kty": "RSA", "n": b64s(b"\xc1" * 128), "e": "AQAB"},                      # 1024-bit
    {"kty": "RSA", "n": b64s(b"\xc1" * 1040), "e": "AQAB"},                     # 8320-bit
    {"kty": "RSA", "n": b64s(b"\xc1" * 256), "e": b64s(b"\x01" * 33)},          # 264-bit exponent
    {"kty": "RSA", "n": b64s(b"\xc1" * 256), "e": "AQAA"},                      # even exponent
    {"kty": "RSA", "e": "AQAB"},
    {"kty": "Unknown"},
    {},
])
def test_unusable_jwk(jwk: dict[str, Any]) -> None:
    assert refused(verifier(), make(jwk=jwk)).reason == "dpop.bad_jwk"


def test_non_canonical_key_encoding() -> None:
    # One key, two spellings of `x` (different unused low bits) would give two thumbprints.
    jwk = public(ED)
    last = jwk["x"][-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) ^ 1]
    assert base64.urlsafe_b64decode(jwk["x"][:-1] + twin + "=") == base64.urlsafe_b64decode(jwk["x"] + "=")
    proof = make(ED, "EdDSA", jwk={**jwk, "x": jwk["x"][:-1] + twin})
    assert refused(verifier(), proof).reason == "dpop.bad_jwk"


def test_bit_flips_in_the_signature() -> None:
    proof = make()
    head, body, sig = proof.split(b".")
    raw = base64.urlsafe_b64decode(sig + b"==")
    v = verifier()
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            flipped = bytearray(raw)
            flipped[i] ^= bit
            assert refused(v, head + b"." + body + b"." + b64(bytes(flipped))).reason == "dpop.bad_signature"
    verify(v, proof)  # the original still passes: refusals did not consume its jti


def test_bit_flips_in_header_and_payload() -> None:
    proof = make()
    parts = proof.split(b".")
    v = verifier()
    for idx in (0, 1):
        raw = base64.urlsafe_b64decode(parts[idx] + b"==")
        for i in range(len(raw)):
            flipped = bytearray(raw)
            flipped[i] ^= 0x01
            forged = list(parts)
            forged[idx] = b64(bytes(flipped))
            with pytest.raises(DpopRefusal):
                verify(v, b".".join(forged))
    # A changed claim with the old signature: the classic tamper.
    head, _, sig = parts
    tampered = head + b"." + b64(json.dumps(claims(htm="DELETE")).encode()) + b"." + sig
    assert refused(v, tampered, method="DELETE").reason == "dpop.bad_signature"


def test_htm_mismatch() -> None:
    v = verifier()
    assert refused(v, make(body=claims(htm="POST"))).reason == "dpop.htm_mismatch"
    assert refused(v, make(body=claims(htm="get"))).reason == "dpop.htm_mismatch"
    assert refused(v, make(body=claims(htm=None))).reason == "dpop.htm_mismatch"


@pytest.mark.parametrize("htu", [
    "https://evil.example.com/v1/orders",    # other host
    "https://api.example.com/v1/invoices",   # other path
    "https://api.example.com/v1/orders/",    # trailing slash is another path
    "http://api.example.com/v1/orders",      # other scheme
    "https://api.example.com:8443/v1/orders",  # other port
    "https://api.example.com/v1/Orders",     # paths are case-sensitive
    "https://api.example.com/v1/orders%2F",  # an encoded slash is not a slash
    "api.example.com/v1/orders",             # not absolute
    "https://user@api.example.com/v1/orders",
    "https://api.example.com:99999/v1/orders",
    "https://api.example.com/v1/%zzorders",
])
def test_htu_mismatch(htu: str) -> None:
    assert refused(verifier(), make(body=claims(htu=htu))).reason == "dpop.htu_mismatch"


def test_htu_missing_or_not_a_string() -> None:
    assert refused(verifier(), make(body=claims(htu=None))).reason == "dpop.htu_mismatch"
    assert refused(verifier(), make(body=claims(htu=["https://api.example.com/v1/orders"]))).reason == \
        "dpop.htu_mismatch"


@pytest.mark.parametrize(("htu", "url"), [
    ("https://api.example.com:443/v1/orders", URL),              # default port
    ("HTTPS://API.Example.COM/v1/orders", URL),                  # scheme and host case
    ("https://api.example.com/v1/x/../orders", URL),             # dot segments
    ("https://api.example.com/./v1/./orders", URL),
    ("https://api.example.com/v1/%6Frders", URL),                # %6F is "o", unreserved
    ("https://api.example.com/v1/orders", URL + "?page=2&x=1"),  # query ignored
    ("https://api.example.com/v1/orders?page=2", URL + "#top"),  # (client-side too)
    ("https://api.example.com/v1/orders", "https://api.example.com:443/v1/orders"),
    ("http://api.example.com:80/", "http://api.example.com"),
])
def test_htu_equal_after_normalization(htu: str, url: str) -> None:
    assert verify(verifier(), make(body=claims(htu=htu)), url=url).jkt


def test_iat_window() -> None:
    v = verifier()  # max age 60, skew 30
    assert verify(v, make(body=claims(iat=NOW - 90))).iat == NOW - 90
    assert refused(v, make(body=claims(iat=NOW - 91))).reason == "dpop.stale"
    assert verify(v, make(body=claims(iat=NOW + 30))).iat == NOW + 30
    assert refused(v, make(body=claims(iat=NOW + 31))).reason == "dpop.future"
    assert refused(v, make(body=claims(iat=NOW - 3600))).reason == "dpop.stale"


@pytest.mark.parametrize("iat", [None, "1800000000", True, 2**64, [NOW]])
def test_iat_missing_or_not_a_number(iat: Any) -> None:
    assert refused(verifier(), make(body=claims(iat=iat))).reason == "dpop.missing_iat"


@pytest.mark.parametrize("jti", [None, "", 17])
def test_jti_missing(jti: Any) -> None:
    assert refused(verifier(), make(body=claims(jti=jti))).reason == "dpop.missing_jti"


def test_jti_too_long() -> None:
    assert verify(verifier(), make(body=claims(jti="j" * 256))).jti == "j" * 256
    assert refused(verifier(), make(body=claims(jti="j" * 257))).reason == "dpop.bad_jti"


def test_replayed_jti() -> None:
    v = verifier()
    proof = make()
    verify(v, proof)
    assert refused(v, proof).reason == "dpop.replay"
    # A new proof reusing the jti under the same key is the same replay.
    jti = json.loads(base64.urlsafe_b64decode(proof.split(b".")[1] + b"==").decode())["jti"]
    assert refused(v, make(body=claims(jti=jti, iat=NOW + 1))).reason == "dpop.replay"
    # Under another key, the jti is that key's own.
    verify(v, make(OTHER_EC, body=claims(jti=jti)))


def test_ath_missing_or_wrong() -> None:
    v = verifier()
    assert refused(v, make(body=claims(ath=None))).reason == "dpop.ath_missing"
    assert refused(v, make(body=claims(ath=access_token_hash(b"another-token")))).reason == "dpop.ath_mismatch"
    assert refused(v, make(body=claims(ath=7))).reason == "dpop.ath_missing"
    assert refused(v, make(body=claims(ath="é"))).reason == "dpop.ath_mismatch"


def test_expected_jkt_mismatch() -> None:
    v = verifier()
    ref = refused(v, make(), expected_jkt=jwk_thumbprint(public(OTHER_EC)))
    assert ref.reason == "dpop.key_mismatch"
    assert ref.error == "invalid_token"
    assert verify(v, make(), expected_jkt=EC_JKT).jkt == EC_JKT


def test_key_mismatch_does_not_consume_the_jti() -> None:
    v = verifier()
    proof = make()
    refused(v, proof, expected_jkt=jwk_thumbprint(public(OTHER_EC)))
    assert len(v.replay) == 0
    verify(v, proof, expected_jkt=EC_JKT)


def test_oversized_proof() -> None:
    big = make(body=claims(pad="x" * 4096))
    assert refused(verifier(), big).reason == "dpop.too_large"
    verify(verifier(max_proof_bytes=16384), big)


def test_two_proofs_comma_joined() -> None:
    joined = make() + b", " + make()
    assert refused(verifier(), joined).reason == "dpop.multiple"
    assert refused(verifier(), make() + b",").reason == "dpop.multiple"


@pytest.mark.parametrize("proof", [None, b"", b"   "])
def test_no_proof(proof: bytes | None) -> None:
    with pytest.raises(DpopRefusal) as exc:
        verifier().verify(proof, method="GET", url=URL, access_token=TOKEN, expected_jkt=None)
    assert exc.value.reason == "dpop.missing"


def test_proof_from_headers() -> None:
    one = make()
    assert proof_from_headers([(b"authorization", b"DPoP x"), (b"DPoP", one)]) == one
    with pytest.raises(DpopRefusal) as exc:
        proof_from_headers([(b"dpop", one), (b"dpop", make())])
    assert exc.value.reason == "dpop.multiple"
    with pytest.raises(DpopRefusal) as exc:
        proof_from_headers([(b"authorization", b"DPoP x")])
    assert exc.value.reason == "dpop.missing"


@pytest.mark.parametrize("proof", [
    b"abc", b"a.b", b"a.b.c.d", b"..", b"e30.e30.", b"e30.e30.AA",   # e30 = {}
    b"W10.e30.AA",                                                    # header is a list
    b"e30.bm90LWpzb24.AA",                                            # payload not JSON
    b"e3.e30.AA",                                                     # bad base64url
    b"e30=.e30.AA",                                                   # padding
])
def test_malformed(proof: bytes) -> None:
    assert refused(verifier(), proof).reason in ("dpop.malformed", "dpop.bad_typ")


def test_duplicate_members_and_nan() -> None:
    head = b64(b'{"typ":"dpop+jwt","alg":"ES256","alg":"none"}')
    assert refused(verifier(), head + b"." + b64(b"{}") + b".AA").reason == "dpop.malformed"
    good_head = b64(json.dumps({"typ": "dpop+jwt", "alg": "ES256", "jwk": public(EC)}).encode())
    assert refused(verifier(), good_head + b"." + b64(b'{"iat":NaN}') + b".AA").reason == "dpop.malformed"


def test_crit_header() -> None:
    proof = forge({"typ": "dpop+jwt", "alg": "ES256", "jwk": public(EC), "crit": ["exp"], "exp": 1}, claims())
    assert refused(verifier(), proof).reason == "dpop.crit_unsupported"


# --- Server nonces --------------------------------------------------------------------------


class TestNonces:
    def test_required_and_missing(self) -> None:
        clock = [float(NOW)]
        nonces = DpopNonces(SECRET, 300, lambda: clock[0])
        v = verifier(clock, nonces, require_nonce=True)
        ref = refused(v, make())
        assert ref.reason == "dpop.nonce_required"
        assert ref.use_dpop_nonce
        assert ref.error == "use_dpop_nonce"
        verify(v, make(body=claims(nonce=nonces.issue())))

    def test_stale_nonce(self) -> None:
        clock = [float(NOW)]
        nonces = DpopNonces(SECRET, 300, lambda: clock[0])
        v = verifier(clock, nonces, require_nonce=True)
        old = nonces.issue()
        clock[0] += 301
        ref = refused(v, make(body=claims(nonce=old, iat=int(clock[0]))))
        assert (ref.reason, ref.use_dpop_nonce) == ("dpop.bad_nonce", True)

    @pytest.mark.parametrize("forged", ["forged", "", 12345, b64s(b"\x00" * 24), "A" * 32, "é" * 32])
    def test_forged_nonce(self, forged: Any) -> None:
        nonces = DpopNonces(SECRET, 300, lambda: float(NOW))
        v = verifier(None, nonces, require_nonce=True)
        ref = refused(v, make(body=claims(nonce=forged)))
        assert (ref.reason, ref.use_dpop_nonce) == ("dpop.bad_nonce", True)

    def test_nonce_of_another_secret_or_tampered(self) -> None:
        now = lambda: float(NOW)  # noqa: E731
        ours, theirs = DpopNonces(SECRET, 300, now), DpopNonces(b"t" * 32, 300, now)
        assert not ours.valid(theirs.issue())
        raw = bytearray(base64.urlsafe_b64decode(ours.issue() + "=="))
        raw[7] ^= 1  # move the time stamp by a second, keep the tag
        assert not ours.valid(b64s(bytes(raw)))

    def test_nonce_checked_when_given_even_if_not_required(self) -> None:
        nonces = DpopNonces(SECRET, 300, lambda: float(NOW))
        v = verifier(None, nonces)
        assert refused(v, make(body=claims(nonce="forged"))).reason == "dpop.bad_nonce"
        verify(v, make())

    def test_lifetime(self) -> None:
        clock = [float(NOW)]
        nonces = DpopNonces(SECRET, 300, lambda: clock[0])
        n = nonces.issue()
        for dt, ok in [(0, True), (1, True), (299.5, True), (300, True), (300.5, False), (301, False),
                       (-5, True), (-6, False)]:
            clock[0] = NOW + dt
            assert nonces.valid(n) is ok, dt

    def test_processes_sharing_the_secret_agree(self) -> None:
        a = DpopNonces(SECRET, 300, lambda: float(NOW))
        b = DpopNonces(SECRET, 300, lambda: NOW + 10.0)
        assert b.valid(a.issue())
        assert a.issue() == DpopNonces(SECRET, 300, lambda: NOW + 0.9).issue()

    def test_nonce_syntax(self) -> None:
        # RFC 9449 §8.1: nonce = 1*NQCHAR (%x21 / %x23-5B / %x5D-7E)
        n = DpopNonces(SECRET).issue()
        assert all(c not in '"\\' and 0x21 <= ord(c) <= 0x7E for c in n)

    def test_setup_errors(self) -> None:
        with pytest.raises(ValueError):
            DpopNonces(b"short")
        with pytest.raises(ValueError):
            DpopVerifier(DpopConfig(require_nonce=True))


# --- The replay cache -----------------------------------------------------------------------


class TestReplayCache:
    def test_bounded(self) -> None:
        v = verifier(jti_cache_size=3)
        for _ in range(5):
            verify(v, make())
        assert len(v.replay) == 3
        assert v.replay.evicted_live == 2

    def test_entries_expire_after_ttl(self) -> None:
        clock = [float(NOW)]
        v = verifier(clock)
        assert v.replay.ttl == 60 + 2 * 30
        for _ in range(3):
            verify(v, make())
        clock[0] += 120
        v.replay.purge(clock[0])
        assert len(v.replay) == 3  # still live at exactly ttl
        clock[0] += 1
        verify(v, make(body=claims(iat=int(clock[0]))))
        assert len(v.replay) == 1
        assert v.replay.evicted_live == 0

    def test_jti_remembered_as_long_as_the_proof_is_acceptable(self) -> None:
        # Recorded at the earliest moment it is acceptable (iat = now + skew), the proof must
        # still be a replay at the last moment its iat is acceptable (now = iat + max_age + skew).
        clock = [float(NOW)]
        v = verifier(clock)
        proof = make(body=claims(iat=NOW + 30))
        verify(v, proof)
        for t in (NOW + 1, NOW + 60, NOW + 119, NOW + 120):
            clock[0] = t
            assert refused(v, proof).reason == "dpop.replay", t
        clock[0] = NOW + 121
        assert refused(v, proof).reason == "dpop.stale"

    def test_unit(self) -> None:
        cache = ReplayCache(size=2, ttl=10)
        cache.add(("k", "a"), 0)
        assert cache.seen(("k", "a"), 10)
        assert not cache.seen(("k", "a"), 10.5)
        assert len(cache) == 0


# --- The challenge --------------------------------------------------------------------------


class TestChallenge:
    def test_algs_only(self) -> None:
        # RFC 9449 §7.1 example: WWW-Authenticate: DPoP algs="ES256 PS256"
        assert dpop_challenge(["ES256", "PS256"]) == (b"www-authenticate", b'DPoP algs="ES256 PS256"')

    def test_with_error(self) -> None:
        name, value = dpop_challenge(["ES256"], "use_dpop_nonce", "Resource server requires nonce in DPoP proof")
        assert name == b"www-authenticate"
        assert value == (b'DPoP algs="ES256", error="use_dpop_nonce", '
                         b'error_description="Resource server requires nonce in DPoP proof"')

    def test_from_the_verifier(self) -> None:
        _, value = verifier().challenge("invalid_dpop_proof")
        assert value == b'DPoP algs="ES256 EdDSA Ed25519 RS256 PS256", error="invalid_dpop_proof"'

    @pytest.mark.parametrize(("algs", "error", "description"), [
        ([], None, None), (["ES 256"], None, None), (['ES256"'], None, None),
        (["ES256"], 'bad"', None), (["ES256"], None, "back\\slash"), (["ES256"], None, "line\r\nX-Injected: 1"),
        (["ES256"], None, "é"),
    ])
    def test_refuses_what_a_quoted_string_cannot_carry(self, algs: list[str], error: str | None,
                                                       description: str | None) -> None:
        with pytest.raises(ValueError):
            dpop_challenge(algs, error, description)


def test_refusal_error_codes() -> None:
    assert DpopRefusal("dpop.bad_signature").error == "invalid_dpop_proof"
    assert DpopRefusal("dpop.key_mismatch").error == "invalid_token"
    assert DpopRefusal("dpop.nonce_required", use_dpop_nonce=True).error == "use_dpop_nonce"


# --- normalize_htu --------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "expected"), [
    ("https://api.example.com/v1/orders", "https://api.example.com/v1/orders"),
    ("HTTPS://API.EXAMPLE.COM:443/v1/orders?x=1#y", "https://api.example.com/v1/orders"),
    ("http://example.com", "http://example.com/"),
    ("http://example.com:80", "http://example.com/"),
    ("http://example.com:", "http://example.com/"),
    ("http://example.com:0080/a", "http://example.com/a"),
    ("https://example.com:80/a", "https://example.com:80/a"),
    ("http://example.com:443/a", "http://example.com:443/a"),
    ("http://[::1]:8080/a", "http://[::1]:8080/a"),
    ("http://[2001:DB8::1]/a", "http://[2001:db8::1]/a"),
    ("https://e.com/a/b/c/./../../g", "https://e.com/a/g"),
    ("https://e.com/a/b/..", "https://e.com/a/"),
    ("https://e.com/a/.", "https://e.com/a/"),
    ("https://e.com/../../a", "https://e.com/a"),
    ("https://e.com/a//b", "https://e.com/a//b"),
    ("https://e.com/%7euser/%2fx%3a", "https://e.com/~user/%2Fx%3A"),
    ("https://e.com/%2E%2E/a/%2e/b", "https://e.com/a/b"),
    ("https://e.com/caf%C3%A9", "https://e.com/caf%C3%A9"),
    ("https://%65xample.com/", "https://example.com/"),
])
def test_normalize_htu(url: str, expected: str) -> None:
    assert normalize_htu(url) == expected


@pytest.mark.parametrize("url", [
    "ftp://example.com/", "example.com/a", "/a/b", "https:///a", "https://user:pw@example.com/",
    "https://example.com:x/", "https://example.com:70000/", "https://example.com/%", "https://example.com/%G0",
    "https://exa mple.com/", "https://example.com/a\tb", "https://example.com/\x00",
])
def test_normalize_htu_refuses(url: str) -> None:
    with pytest.raises(ValueError):
        normalize_htu(url)
