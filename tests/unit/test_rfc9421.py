"""RFC 9421 HTTP Message Signatures: Appendix B conformance, round trips with the
library as an independent client-side signer, an attack suite (one test per attack,
each with its audit reason), the nonce cache, and signed responses.

Real keys (RFC 9421 Appendix B.1, in tests/vectors/rfc9421) and real signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from http_message_signatures import (
    ContentDigest,
    HTTPMessageSignaturesException,
    HTTPMessageSigner,
    HTTPMessageVerifier,
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
from pydantic import ValidationError

from portcullis.credentials.rfc9421 import (
    Alg,
    NonceCache,
    RequestSignatureVerifier,
    ResponseSigner,
    SignatureKeyConfig,
    SignaturePolicy,
    SignatureRefusal,
    SignatureResult,
    content_digest,
)

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "rfc9421"
APPENDIX_B: dict[str, Any] = json.loads((VECTORS / "appendix-b.json").read_text())["rfc9421_appendix_b"]
SHARED_SECRET = base64.b64decode(APPENDIX_B["shared_secret_b64"])
NOW = 1_800_000_000
URL = "https://api.example.com/v1/orders?limit=5&sort=desc"
BODY = b'{"item": "widget", "qty": 2}'
DEFAULT_COMPONENTS = ("@method", "@authority", "@path", "@query")

ALGS: tuple[Alg, ...] = ("ed25519", "ecdsa-p256-sha256", "rsa-pss-sha512", "rsa-v1_5-sha256", "hmac-sha256")
ALGORITHMS: dict[str, type[HTTPSignatureAlgorithm]] = {
    "ed25519": ED25519, "ecdsa-p256-sha256": ECDSA_P256_SHA256, "rsa-pss-sha512": RSA_PSS_SHA512,
    "rsa-v1_5-sha256": RSA_V1_5_SHA256, "hmac-sha256": HMAC_SHA256,
}
# RFC 9421 Appendix B.1: key id (as the RFC names it) and file stem per algorithm.
KEY_FILES = {"ed25519": "test-key-ed25519", "ecdsa-p256-sha256": "test-key-ecc-p256",
             "rsa-pss-sha512": "test-key-rsa-pss", "rsa-v1_5-sha256": "test-key-rsa"}
KEY_IDS = {**KEY_FILES, "hmac-sha256": "test-shared-secret"}


def private_key(alg: str) -> SigningKey:
    if alg == "hmac-sha256":
        return SHARED_SECRET
    key = serialization.load_pem_private_key((VECTORS / f"{KEY_FILES[alg]}.key").read_bytes(), password=None)
    assert isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey))
    return key


def key_config(alg: str) -> SignatureKeyConfig:
    if alg == "hmac-sha256":
        return SignatureKeyConfig(key_id=KEY_IDS[alg], alg="hmac-sha256", secret_b64=APPENDIX_B["shared_secret_b64"])
    return SignatureKeyConfig.model_validate(
        {"key_id": KEY_IDS[alg], "alg": alg, "public_key_file": str(VECTORS / f"{KEY_FILES[alg]}.pem")})


ALL_KEYS = [key_config(alg) for alg in ALGS]


# --- the client side: the library signing a requests-like object ---------------------

@dataclass
class ClientRequest:
    """What a partner's HTTP client holds (the library's message interface); `requests`
    is not installed here, so this stands in for `requests.Request(...).prepare()`."""

    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class ClientResponse:
    status_code: int
    headers: dict[str, str]
    request: ClientRequest | None = None


class _AnyDigest(ContentDigest):
    """Lets a client send whatever Content-Digest it likes (the library's own signer
    refuses unknown digest algorithms, which is what an attacker would not do)."""

    @classmethod
    def prepare(cls, headers: Any, body: bytes | None, *, use_existing_digest: bool) -> None:
        return None


class _RawDigestSigner(HTTPMessageSigner):
    content_digest_class = _AnyDigest


def sign(alg: str = "ed25519", *, key_id: str | None = None, key: SigningKey | None = None,
         method: str = "POST", url: str = URL, headers: dict[str, str] | None = None,
         body: bytes | None = BODY, components: tuple[str, ...] = DEFAULT_COMPONENTS,
         created: int = NOW, expires: int | None = None, nonce: str | None = "nonce-1",
         include_alg: bool = True, label: str = "sig1", digest: bool = True,
         raw_digest: bool = False) -> ClientRequest:
    """A request signed by the library, as a partner would send it."""
    kid = key_id or KEY_IDS[alg]
    request = ClientRequest(method, url, {"content-type": "application/json", **(headers or {})})
    signer_class = _RawDigestSigner if raw_digest else HTTPMessageSigner
    signer = signer_class(signature_algorithm=ALGORITHMS[alg],
                          key_resolver=MappingKeyResolver(public_keys={}, private_keys={kid: key or private_key(alg)}))
    signer.sign(request, key_id=kid, created=datetime.fromtimestamp(created, UTC),
                expires=datetime.fromtimestamp(expires, UTC) if expires is not None else None,
                nonce=nonce, label=label, include_alg=include_alg, covered_component_ids=components,
                body=body if digest and body is not None and not raw_digest else None)
    return request


def raw_headers(request: ClientRequest) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()]


def verifier(policy: SignaturePolicy | None = None, now: float = NOW,
             keys: list[SignatureKeyConfig] | None = None, nonces: NonceCache | None = None,
             ) -> RequestSignatureVerifier:
    return RequestSignatureVerifier(ALL_KEYS if keys is None else keys, policy or SignaturePolicy(),
                                    clock=lambda: now, nonces=nonces)


def check(request: ClientRequest, *, body: bytes | None = BODY, v: RequestSignatureVerifier | None = None,
          headers: list[tuple[bytes, bytes]] | None = None, parts: dict[str, str] | None = None) -> SignatureResult:
    """Verify `request` from raw parts, as the gateway sees it; `parts` override the URL's."""
    url = urlsplit(request.url)
    given = {"method": request.method, "scheme": url.scheme, "authority": url.netloc, "path": url.path,
             "query": url.query, **(parts or {})}
    return (v or verifier()).verify(given["method"], given["scheme"], given["authority"], given["path"],
                                    given["query"], raw_headers(request) if headers is None else headers, body)


def refused(reason: str, request: ClientRequest, *, body: bytes | None = BODY,
            v: RequestSignatureVerifier | None = None, headers: list[tuple[bytes, bytes]] | None = None,
            parts: dict[str, str] | None = None) -> None:
    with pytest.raises(SignatureRefusal) as info:
        check(request, body=body, v=v, headers=headers, parts=parts)
    assert info.value.reason == reason


# --- RFC 9421 Appendix B conformance ---------------------------------------------------

def appendix_b_request(case: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    req = APPENDIX_B["request"]
    headers = [(k.lower().encode(), v.encode()) for k, v in req["headers"].items()]
    headers += [(b"signature-input", APPENDIX_B[case]["signature_input"].encode()),
                (b"signature", APPENDIX_B[case]["signature"].encode())]
    return headers, req["body"].encode()


# The Appendix B examples carry no nonce and cover neither the query nor the digest;
# this policy asks for what they do carry, and the clock stands at their `created`.
APPENDIX_POLICY = SignaturePolicy(required_components=["@authority"], query_required_when_present=False,
                                  content_digest_required_with_body=False, require_nonce=False)


@pytest.mark.parametrize(("case", "label", "key_id", "covered"), [
    ("b25_hmac_sha256", "sig-b25", "test-shared-secret", ("date", "@authority", "content-type")),
    ("b26_ed25519", "sig-b26", "test-key-ed25519",
     ("date", "@method", "@path", "@authority", "content-type", "content-length")),
])
def test_rfc9421_appendix_b_signatures_verify(case: str, label: str, key_id: str, covered: tuple[str, ...]) -> None:
    headers, body = appendix_b_request(case)
    v = verifier(APPENDIX_POLICY, now=1618884473)
    result = v.verify("POST", "https", "example.com", "/foo", "param=Value&Pet=dog", headers, body)
    assert result.key_id == key_id
    assert result.label == label
    assert result.covered == covered
    assert result.created == 1618884473
    assert result.nonce is None
    # The example's Content-Digest (sha-512, not covered here) was recomputed and matches.


@pytest.mark.parametrize("case", ["b25_hmac_sha256", "b26_ed25519"])
def test_rfc9421_appendix_b_tampered_date_fails(case: str) -> None:
    headers, body = appendix_b_request(case)
    headers = [(n, b"Tue, 20 Apr 2021 02:07:56 GMT" if n == b"date" else v) for n, v in headers]
    with pytest.raises(SignatureRefusal) as info:
        verifier(APPENDIX_POLICY, now=1618884473).verify(
            "POST", "https", "example.com", "/foo", "param=Value&Pet=dog", headers, body)
    assert info.value.reason == "sig.bad_signature"


def test_rfc9421_appendix_b_example_is_too_old_under_default_age() -> None:
    headers, body = appendix_b_request("b26_ed25519")
    with pytest.raises(SignatureRefusal) as info:
        verifier(APPENDIX_POLICY, now=1618884473 + 301).verify(
            "POST", "https", "example.com", "/foo", "param=Value&Pet=dog", headers, body)
    assert info.value.reason == "sig.expired"


@pytest.mark.parametrize("alg", ALGS)
def test_round_trip_with_library_signer(alg: Alg) -> None:
    request = sign(alg)
    result = check(request)
    assert result.key_id == KEY_IDS[alg]
    assert result.alg == alg
    assert result.label == "sig1"
    assert result.covered == (*DEFAULT_COMPONENTS, "content-digest")
    assert (result.created, result.nonce, result.expires) == (NOW, "nonce-1", None)
    assert result.target_uri == URL


def test_library_default_components_satisfy_policy() -> None:
    # The library's signer covers @target-uri by default: that is @authority, @path and @query (§2.2.2).
    request = sign(components=("@method", "@authority", "@target-uri"))
    assert check(request).covered == ("@method", "@authority", "@target-uri", "content-digest")


def test_get_without_body_or_query() -> None:
    request = sign(method="GET", url="https://api.example.com/v1/orders", body=None,
                   components=("@method", "@authority", "@path"))
    assert check(request, body=None).covered == ("@method", "@authority", "@path")


def test_request_target_covers_path_and_query() -> None:
    request = sign(components=("@method", "@authority", "@request-target"))
    assert check(request).covered[2] == "@request-target"


def test_no_alg_parameter_uses_the_keys_algorithm() -> None:
    # §3.2 step 6.1: the algorithm is known from configuration; `alg` is optional.
    assert check(sign("rsa-pss-sha512", include_alg=False)).alg == "rsa-pss-sha512"


def test_several_signatures_verify_the_first_with_a_known_key() -> None:
    # RFC 9421 §4.3: two signatures in one Signature-Input and one Signature field.
    first = sign("ecdsa-p256-sha256", key_id="partner-unknown", key=private_key("ecdsa-p256-sha256"), label="a")
    second = sign("ed25519", label="b")
    headers = [(n, v) for n, v in raw_headers(first) if n not in (b"signature-input", b"signature")]
    for name in ("Signature-Input", "Signature"):
        headers.append((name.lower().encode(), f"{first.headers[name]}, {second.headers[name]}".encode()))
    assert check(first, headers=headers).label == "b"
    # With the label configured, that one is verified (and the unknown key refused).
    refused("sig.unknown_key", first, headers=headers, v=verifier(SignaturePolicy(label="a")))
    refused("sig.missing", first, headers=headers, v=verifier(SignaturePolicy(label="c")))


# --- attacks -------------------------------------------------------------------------------

def test_no_signature_headers() -> None:
    request = sign()
    headers = [(n, v) for n, v in raw_headers(request) if n not in (b"signature", b"signature-input")]
    refused("sig.missing", request, headers=headers)


@pytest.mark.parametrize("garbage", [
    b"sig1=(((",                                   # not a Structured Field
    b'sig1=:AAAA:',                                # a Byte Sequence, not an Inner List
    b'sig1=("@method";created=1',                  # unterminated
    b'sig2=("@method");created=1800000000;keyid="test-key-ed25519"',  # label not in Signature
    b'sig1=("@method");created="yesterday";keyid="test-key-ed25519"',  # created not an Integer
    b'sig1=("@method");created=1800000000;keyid=test-key-ed25519',  # keyid a Token, not a String
    b'sig1=("@method" "@method");created=1800000000;keyid="test-key-ed25519";nonce="n"',
    b'sig1=("@Method");created=1800000000;keyid="test-key-ed25519";nonce="n"',
    b'sig1=(@method);created=1800000000;keyid="test-key-ed25519";nonce="n"',
    b'sig1=("@method");created=1800000000;keyid="test-key-ed25519";nonce="n";extra="x"',
    b'\xff\xfe',
])
def test_garbage_signature_input(garbage: bytes) -> None:
    request = sign()
    headers = [(n, garbage if n == b"signature-input" else v) for n, v in raw_headers(request)]
    refused("sig.malformed", request, headers=headers)


def test_signature_without_signature_input() -> None:
    request = sign()
    refused("sig.malformed", request, headers=[(n, v) for n, v in raw_headers(request) if n != b"signature-input"])


def test_empty_signature_value() -> None:
    request = sign()
    refused("sig.malformed", request,
            headers=[(n, b"sig1=::" if n == b"signature" else v) for n, v in raw_headers(request)])


@pytest.mark.parametrize(("part", "value"), [
    ("method", "PUT"), ("path", "/v1/orders/all"), ("authority", "api.example.org"),
    ("query", "limit=500&sort=desc"), ("scheme", "http"),
])
def test_signature_over_a_different_request(part: str, value: str) -> None:
    components = (*DEFAULT_COMPONENTS, "@scheme")
    refused("sig.bad_signature", sign(components=components), parts={part: value})


def test_required_component_left_out() -> None:
    refused("sig.component_missing", sign(components=("@method", "@authority", "@query")))


def test_required_field_component_from_policy() -> None:
    policy = SignaturePolicy(required_components=[*DEFAULT_COMPONENTS, "content-type"])
    refused("sig.component_missing", sign(), v=verifier(policy))
    assert check(sign(components=(*DEFAULT_COMPONENTS, "content-type")), v=verifier(policy))


def test_query_not_covered() -> None:
    refused("sig.query_not_covered", sign(components=("@method", "@authority", "@path")))


def test_query_param_alone_does_not_cover_the_query() -> None:
    components = ("@method", "@authority", "@path", '"@query-param";name="limit"')
    refused("sig.query_not_covered", sign(components=components))


def test_body_without_covered_content_digest() -> None:
    request = sign(raw_digest=True, headers={"content-digest": content_digest(BODY).decode()})
    refused("sig.digest_not_covered", request)


def test_body_without_content_digest() -> None:
    refused("sig.digest_missing", sign(digest=False))


def test_content_digest_not_matching_body() -> None:
    refused("sig.digest_mismatch", sign(), body=b'{"item": "widget", "qty": 2000}')


def test_content_digest_sha512_accepted_and_checked() -> None:
    digest = content_digest(BODY, "sha-512").decode()
    components = (*DEFAULT_COMPONENTS, "content-digest")
    assert check(sign(raw_digest=True, headers={"content-digest": digest}, components=components))
    refused("sig.digest_mismatch", sign(raw_digest=True, headers={"content-digest": digest}, components=components),
            body=BODY + b" ")


def test_content_digest_with_only_an_unknown_algorithm() -> None:
    fake = "sha-999=:" + base64.b64encode(hashlib.sha3_256(BODY).digest()).decode() + ":"
    request = sign(raw_digest=True, headers={"content-digest": fake},
                   components=(*DEFAULT_COMPONENTS, "content-digest"))
    refused("sig.digest_unsupported", request)
    md5 = "md5=:" + base64.b64encode(hashlib.md5(BODY).digest()).decode() + ":"
    refused("sig.digest_unsupported", sign(raw_digest=True, headers={"content-digest": md5},
                                           components=(*DEFAULT_COMPONENTS, "content-digest")))


def test_unknown_digest_algorithm_beside_sha256_is_ignored() -> None:
    # RFC 9530 §2: "A recipient MAY ignore any or all digests."
    mixed = "sha-999=:AAAA:, " + content_digest(BODY).decode()
    request = sign(raw_digest=True, headers={"content-digest": mixed},
                   components=(*DEFAULT_COMPONENTS, "content-digest"))
    assert check(request).key_id == "test-key-ed25519"


def test_malformed_content_digest() -> None:
    for bad in ("sha-256=:AAAA:", "sha-256=\"text\"", "sha-256=:" + base64.b64encode(b"x" * 32).decode()
                + ":, sha-256=:" + base64.b64encode(b"y" * 32).decode() + ":", "(((("):
        request = sign(raw_digest=True, headers={"content-digest": bad},
                       components=(*DEFAULT_COMPONENTS, "content-digest"))
        refused("sig.digest_malformed", request)


def test_digest_member_by_key_counts_as_covered() -> None:
    request = sign(raw_digest=True, headers={"content-digest": content_digest(BODY).decode()},
                   components=(*DEFAULT_COMPONENTS, '"content-digest";key="sha-256"'))
    assert check(request).covered[-1] == '"content-digest";key="sha-256"'


def test_created_too_old() -> None:
    refused("sig.expired", sign(created=NOW - 301))
    assert check(sign(created=NOW - 300))


def test_created_in_future() -> None:
    refused("sig.created_in_future", sign(created=NOW + 31))
    assert check(sign(created=NOW + 30))  # within clock skew


def test_expires_passed() -> None:
    refused("sig.expired", sign(created=NOW - 60, expires=NOW - 31))
    assert check(sign(created=NOW - 60, expires=NOW - 30)).expires == NOW - 30


def test_created_missing() -> None:
    request = sign()
    sig_input = request.headers["Signature-Input"].replace(f";created={NOW}", "")
    refused("sig.created_missing", request,
            headers=[(n, sig_input.encode() if n == b"signature-input" else v) for n, v in raw_headers(request)])


def test_missing_nonce() -> None:
    refused("sig.nonce_missing", sign(nonce=None))
    assert check(sign(nonce=None), v=verifier(SignaturePolicy(require_nonce=False))).nonce is None


def test_replayed_nonce() -> None:
    v = verifier()
    request = sign(nonce="once")
    assert check(request, v=v).nonce == "once"
    refused("sig.replay", request, v=v)
    # A fresh signature re-using the nonce is a replay too; the same nonce under another key is not.
    refused("sig.replay", sign(nonce="once", created=NOW - 1), v=v)
    assert check(sign("ecdsa-p256-sha256", nonce="once"), v=v)


def test_failed_request_does_not_consume_its_nonce() -> None:
    v = verifier()
    request = sign(nonce="keep")
    refused("sig.digest_mismatch", request, body=b"tampered", v=v)
    assert check(request, v=v).nonce == "keep"


def test_unknown_keyid() -> None:
    refused("sig.unknown_key", sign(key_id="someone-else"))


def test_keyid_missing() -> None:
    request = sign()
    sig_input = request.headers["Signature-Input"].replace(';keyid="test-key-ed25519"', "")
    refused("sig.keyid_missing", request,
            headers=[(n, sig_input.encode() if n == b"signature-input" else v) for n, v in raw_headers(request)])


def test_alg_parameter_mismatching_the_key() -> None:
    # An ECDSA signature labelled alg="ecdsa-p256-sha256" under the Ed25519 key's keyid.
    refused("sig.alg_mismatch", sign("ecdsa-p256-sha256", key_id="test-key-ed25519"))


def test_hmac_key_with_asymmetric_alg_label() -> None:
    forged = ed25519.Ed25519PrivateKey.generate()
    refused("sig.alg_mismatch", sign("ed25519", key_id="test-shared-secret", key=forged))


def test_public_key_as_hmac_secret() -> None:
    # Key confusion: HMAC keyed with the (public) Ed25519 PEM, under that key's keyid.
    public_pem = (VECTORS / "test-key-ed25519.pem").read_bytes()
    refused("sig.alg_mismatch", sign("hmac-sha256", key_id="test-key-ed25519", key=public_pem))
    refused("sig.bad_signature", sign("hmac-sha256", key_id="test-key-ed25519", key=public_pem, include_alg=False))


def test_alg_not_allowed_by_policy() -> None:
    policy = SignaturePolicy(allowed_algs=["ed25519", "ecdsa-p256-sha256"])
    refused("sig.alg_not_allowed", sign("rsa-v1_5-sha256"), v=verifier(policy))
    assert check(sign("ed25519"), v=verifier(policy))


@pytest.mark.parametrize("alg", ALGS)
def test_bit_flip_in_signature(alg: str) -> None:
    request = sign(alg)
    label, _, value = request.headers["Signature"].partition("=")
    sig = bytearray(base64.b64decode(value.strip(":")))
    sig[len(sig) // 2] ^= 0x01
    flipped = f"{label}=:{base64.b64encode(bytes(sig)).decode()}:".encode()
    refused("sig.bad_signature", request,
            headers=[(n, flipped if n == b"signature" else v) for n, v in raw_headers(request)])


def test_oversized_signature_header() -> None:
    request = sign()
    huge = b"sig1=:" + base64.b64encode(b"\x00" * 7000) + b":"
    refused("sig.too_large", request,
            headers=[(n, huge if n == b"signature" else v) for n, v in raw_headers(request)])
    refused("sig.too_large", request, headers=[*raw_headers(request), (b"signature-input", b"x" * 8200)])
    big_digest = b", ".join(b"x%d=:AAAA:" % i for i in range(800))
    refused("sig.too_large", request, headers=[*raw_headers(request), (b"content-digest", big_digest)])


def test_too_many_signatures() -> None:
    request = sign()
    headers = raw_headers(request)
    sig_input = request.headers["Signature-Input"].split("=", 1)[1]
    signature = request.headers["Signature"].split("=", 1)[1]
    for i in range(8):
        headers += [(b"signature-input", f"x{i}={sig_input}".encode()), (b"signature", f"x{i}={signature}".encode())]
    refused("sig.too_large", request, headers=headers)


def test_too_many_covered_components() -> None:
    many = tuple(f"x-h{i}" for i in range(33))
    request = sign(headers={f"x-h{i}": "v" for i in range(33)}, components=(*DEFAULT_COMPONENTS, *many))
    refused("sig.too_large", request)


def test_repeated_header_lines_are_combined() -> None:
    # The client signed one field "a, b"; on the wire it arrives as two lines (RFC 9110 §5.3).
    request = sign(headers={"x-tenant": "a, b"}, components=(*DEFAULT_COMPONENTS, "x-tenant"))
    lines = [(n, v) for n, v in raw_headers(request) if n != b"x-tenant"]
    two_lines = [*lines, (b"x-tenant", b"a"), (b"x-tenant", b" b ")]
    assert check(request, headers=two_lines).covered[-2:] == ("x-tenant", "content-digest")
    # Order matters: the lines combine to "b, a", which was not signed.
    refused("sig.bad_signature", request, headers=[*lines, (b"x-tenant", b"b"), (b"x-tenant", b"a")])


def test_signature_fields_split_across_lines() -> None:
    # The same two signatures as separate field lines: combined before parsing (RFC 9421 §4.3).
    first = sign("ecdsa-p256-sha256", key_id="partner-unknown", key=private_key("ecdsa-p256-sha256"), label="a")
    second = sign("ed25519", label="b")
    headers = raw_headers(first) + [(n, v) for n, v in raw_headers(second) if n in (b"signature-input", b"signature")]
    assert check(second, headers=headers).label == "b"


def test_signature_covering_another_signature() -> None:
    # RFC 9421 §4.3: a second signer (here a proxy) covers the first signature's value.
    request = sign("ecdsa-p256-sha256", key_id="partner-unknown", key=private_key("ecdsa-p256-sha256"), label="a")
    HTTPMessageSigner(
        signature_algorithm=ED25519,
        key_resolver=MappingKeyResolver(public_keys={}, private_keys={"test-key-ed25519": private_key("ed25519")}),
    ).sign(request, key_id="test-key-ed25519", created=datetime.fromtimestamp(NOW, UTC), nonce="proxy", label="b",
           covered_component_ids=(*DEFAULT_COMPONENTS, '"signature";key="a"', "content-digest"),
           append_if_signature_exists=True, body=BODY, use_existing_digest=True)
    assert check(request).covered[-2:] == ('"signature";key="a"', "content-digest")
    # The covered signature changed: the proxy's signature no longer verifies.
    headers = raw_headers(request)
    tampered = [(n, v.replace(b"a=:", b"a=:AAAA") if n == b"signature" else v) for n, v in headers]
    refused("sig.bad_signature", request, headers=tampered)


def test_duplicate_label_across_lines() -> None:
    first = sign("ed25519", nonce="n1")
    second = sign("ed25519", nonce="n2")
    headers = raw_headers(first) + [(n, v) for n, v in raw_headers(second) if n in (b"signature-input", b"signature")]
    refused("sig.malformed", first, headers=headers)


def test_signature_by_a_different_key_with_the_same_keyid() -> None:
    impostor = ed25519.Ed25519PrivateKey.generate()
    refused("sig.bad_signature", sign("ed25519", key=impostor))
    impostor_ec = ec.generate_private_key(ec.SECP256R1())
    refused("sig.bad_signature", sign("ecdsa-p256-sha256", key=impostor_ec))


def test_covered_field_missing_from_message() -> None:
    request = sign(headers={"x-request-id": "42"}, components=(*DEFAULT_COMPONENTS, "x-request-id"))
    refused("sig.bad_signature", request, headers=[(n, v) for n, v in raw_headers(request) if n != b"x-request-id"])


@pytest.mark.parametrize(("part", "value"), [
    ("method", "get"), ("scheme", "ftp"), ("authority", "user@api.example.com"), ("authority", ""),
    ("path", "v1/orders"), ("path", "/v1/or ders"), ("query", "a=1#frag"),
])
def test_malformed_request_target(part: str, value: str) -> None:
    refused("sig.malformed", sign(), parts={part: value})


# --- configuration ---------------------------------------------------------------------------

def test_key_config_errors_name_the_problem() -> None:
    ed_pem = (VECTORS / "test-key-ed25519.pem").read_text()
    ec_pem = (VECTORS / "test-key-ecc-p256.pem").read_text()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"alg": "hmac-sha256", "secret_b64": base64.b64encode(b"x" * 31).decode()}, "31 bytes"),
        ({"alg": "hmac-sha256", "secret_b64": "not base64!"}, "not valid base64"),
        ({"alg": "hmac-sha256", "public_key_pem": ed_pem}, "needs secret_b64"),
        ({"alg": "ed25519", "secret_b64": APPENDIX_B["shared_secret_b64"]}, "asymmetric"),
        ({"alg": "ed25519", "public_key_pem": ec_pem}, "cannot be used with ed25519"),
        ({"alg": "ecdsa-p256-sha256", "public_key_pem": ed_pem}, "cannot be used with ecdsa-p256-sha256"),
        ({"alg": "rsa-pss-sha512", "public_key_pem": "-----BEGIN PUBLIC KEY-----\nnope\n"}, "not a PEM public key"),
        ({"alg": "ed25519", "public_key_file": "/nonexistent/key.pem"}, "cannot read"),
        ({"alg": "ed25519", "public_key_pem": ed_pem, "public_key_file": "x"}, "exactly one"),
        ({"alg": "ed25519"}, "exactly one"),
        ({"alg": "hs256", "public_key_pem": ed_pem}, "alg"),
        ({"alg": "ed25519", "public_key_pem": ed_pem, "extra": 1}, "extra"),
    ]
    for fields, message in cases:
        with pytest.raises(ValidationError, match=message):
            SignatureKeyConfig.model_validate({"key_id": "k", **fields})


def test_small_rsa_key_refused() -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = small.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValidationError, match="1024 bits"):
        SignatureKeyConfig(key_id="k", alg="rsa-pss-sha512", public_key_pem=pem)


def test_policy_validation() -> None:
    with pytest.raises(ValidationError, match="component"):
        SignaturePolicy(required_components=["@Method"])
    with pytest.raises(ValidationError, match="component"):
        SignaturePolicy(required_components=["@signature-params"])
    with pytest.raises(ValidationError, match="twice"):
        SignaturePolicy(required_components=["@method", '"@method"'])
    with pytest.raises(ValidationError, match="require_created"):
        SignaturePolicy(require_created=False)
    with pytest.raises(ValidationError):
        SignaturePolicy.model_validate({"require_keyid": False})
    assert SignaturePolicy(require_created=False, require_nonce=False).require_created is False


def test_verifier_configuration_errors() -> None:
    with pytest.raises(ValueError, match="at least max_age"):
        verifier(nonces=NonceCache(ttl_seconds=60))
    with pytest.raises(ValueError, match="configured with key_id"):
        RequestSignatureVerifier({"other": key_config("ed25519")})
    with pytest.raises(ValueError, match="twice"):
        RequestSignatureVerifier([key_config("ed25519"), key_config("ed25519")])
    assert RequestSignatureVerifier({"test-key-ed25519": key_config("ed25519")}).nonces.ttl == 330


def test_hand_built_signature_without_created() -> None:
    # The library's signer always adds `created`, so this signature base is built by hand
    # (RFC 9421 §2.5) and MACed with the B.1.5 secret (§3.3.3).
    params = '("@method" "@authority" "@path" "@query");keyid="test-shared-secret";nonce="by-hand"'
    base = ('"@method": GET\n"@authority": api.example.com\n"@path": /v1/orders\n"@query": ?limit=5\n'
            f'"@signature-params": {params}')
    mac = base64.b64encode(hmac.new(SHARED_SECRET, base.encode(), hashlib.sha256).digest()).decode()
    headers = [(b"signature-input", f"hand={params}".encode()), (b"signature", f"hand=:{mac}:".encode())]
    lenient = verifier(SignaturePolicy(require_created=False, require_nonce=False))
    result = lenient.verify("GET", "https", "api.example.com", "/v1/orders", "limit=5", headers, None)
    assert (result.created, result.nonce, result.label) == (None, "by-hand", "hand")
    with pytest.raises(SignatureRefusal) as info:
        verifier().verify("GET", "https", "api.example.com", "/v1/orders", "limit=5", headers, None)
    assert info.value.reason == "sig.created_missing"


# --- the nonce cache ---------------------------------------------------------------------------

def test_nonce_cache_ttl_eviction() -> None:
    cache = NonceCache(ttl_seconds=10, max_entries=100)
    assert cache.seen("k", "n1", now=100.0) is False
    assert cache.seen("k", "n1", now=109.9) is True
    assert cache.seen("k", "n2", now=105.0) is False
    assert cache.seen("k", "n1", now=110.0) is False  # expired: recorded afresh
    assert cache.seen("k", "n1", now=119.0) is True
    assert cache.seen("k", "n3", now=1000.0) is False
    assert len(cache) == 1  # every expired entry was dropped on the way


def test_nonce_cache_is_bounded() -> None:
    cache = NonceCache(ttl_seconds=1000, max_entries=3)
    for i in range(5):
        assert cache.seen("k", f"n{i}", now=float(i)) is False
    assert len(cache) == 3
    assert cache.evicted_live == 2
    assert cache.seen("k", "n4", now=5.0) is True
    assert cache.seen("k", "n0", now=5.0) is False  # the oldest was dropped to stay within the bound


def test_nonce_cache_separates_keys() -> None:
    cache = NonceCache(ttl_seconds=10)
    assert cache.seen("ab", "c", 0.0) is False
    assert cache.seen("a", "bc", 0.0) is False  # no ambiguity from concatenation
    assert cache.seen("ab", "c", 1.0) is True


def test_nonce_cache_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        NonceCache(ttl_seconds=0)
    with pytest.raises(ValueError, match="positive"):
        NonceCache(ttl_seconds=10, max_entries=0)


# --- content digest and response signatures -----------------------------------------------

def test_content_digest_values() -> None:
    body = APPENDIX_B["request"]["body"].encode()
    # RFC 9421 Appendix B.2's request carries the sha-512 Content-Digest of its body.
    assert content_digest(body, "sha-512").decode() == APPENDIX_B["request"]["headers"]["Content-Digest"]
    assert content_digest(body) == b"sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()) + b":"
    with pytest.raises(ValueError, match="not supported"):
        content_digest(body, "md5")


def library_verify(response: ClientResponse, alg: str, public: VerificationKey, body: bytes,
                   components: tuple[str, ...] = ("@status", "content-type", "content-digest")) -> None:
    HTTPMessageVerifier(
        signature_algorithm=ALGORITHMS[alg],
        key_resolver=MappingKeyResolver(public_keys={"portcullis-1": public}, private_keys={}),
    ).verify(response, require_components=components, body=body)


def public_key(alg: str) -> VerificationKey:
    if alg == "hmac-sha256":
        return SHARED_SECRET
    key = serialization.load_pem_public_key((VECTORS / f"{KEY_FILES[alg]}.pem").read_bytes())
    assert isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey))
    return key


@pytest.mark.parametrize("alg", ALGS)
def test_response_signature_verifies_with_the_library(alg: Alg) -> None:
    signer = ResponseSigner("portcullis-1", private_key(alg), alg)
    body = b'{"id": 7, "status": "created"}'
    headers = [(b"content-type", b"application/json"), (b"content-digest", b"sha-256=:stale:"), (b"x-other", b"1")]
    added = signer.sign(201, headers, body)
    assert [n for n, _ in added] == [b"content-digest", b"signature-input", b"signature"]
    # The caller replaces the response's fields of those names with the returned ones.
    kept = [(n, v) for n, v in headers if n not in {n for n, _ in added}]
    sent = {n.decode(): v.decode() for n, v in [*kept, *added]}
    assert sent["content-digest"] == content_digest(body).decode()
    assert '("@status" "content-type" "content-digest")' in sent["signature-input"]
    assert f'keyid="portcullis-1";alg="{alg}"' in sent["signature-input"]
    library_verify(ClientResponse(201, sent), alg, public_key(alg), body)
    # What the partner received must be what was signed.
    with pytest.raises(HTTPMessageSignaturesException):
        library_verify(ClientResponse(200, sent), alg, public_key(alg), body)
    with pytest.raises(HTTPMessageSignaturesException):
        library_verify(ClientResponse(201, sent), alg, public_key(alg), body + b" ")


def test_response_signature_bound_to_the_request_signature() -> None:
    request = sign()
    result = check(request)
    signer = ResponseSigner("portcullis-1", (VECTORS / "test-key-ecc-p256.key").read_bytes(), "ecdsa-p256-sha256")
    added = dict(signer.sign(200, [(b"content-type", b"application/json")], b"{}", request_signature=result))
    assert b'"signature";req;key="sig1"' in added[b"signature-input"]
    sent = {"content-type": "application/json", **{n.decode(): v.decode() for n, v in added.items()}}
    components = ("@status", "content-type", "content-digest", '"signature";req;key="sig1"')
    library_verify(ClientResponse(200, sent, request), "ecdsa-p256-sha256", public_key("ecdsa-p256-sha256"),
                   b"{}", components)
    # Presented with another request (another signature), the response does not verify.
    other = sign(nonce="other")
    with pytest.raises(HTTPMessageSignaturesException):
        library_verify(ClientResponse(200, sent, other), "ecdsa-p256-sha256", public_key("ecdsa-p256-sha256"),
                       b"{}", components)


def test_response_without_content_type_and_with_injected_clock() -> None:
    signer = ResponseSigner("portcullis-1", private_key("ed25519"), "ed25519", clock=lambda: time.time() - 5)
    added = dict(signer.sign(204, [], b""))
    assert b'("@status" "content-digest")' in added[b"signature-input"]
    sent = {n.decode(): v.decode() for n, v in added.items()}
    library_verify(ClientResponse(204, sent), "ed25519", public_key("ed25519"), b"", ("@status", "content-digest"))


def test_response_signer_key_checks() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        ResponseSigner("k", b"short", "hmac-sha256")
    with pytest.raises(ValueError, match="cannot be used with ed25519"):
        ResponseSigner("k", private_key("ecdsa-p256-sha256"), "ed25519")
    with pytest.raises(ValueError, match="not an unencrypted PEM private key"):
        ResponseSigner("k", b"-----BEGIN PRIVATE KEY-----\nnope\n", "ed25519")
    with pytest.raises(ValueError, match="cannot be used with rsa-pss-sha512"):
        ResponseSigner("k", (VECTORS / "test-key-ed25519.key").read_text(), "rsa-pss-sha512")
