"""JWT access-token verification: good tokens from RS256/ES256/EdDSA issuers, and an
attack suite, each case named after the attack or CVE it stands for."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from pydantic import ValidationError

from portcullis.credentials.jwt import JwtConfig, JwtIssuerConfig, JwtRefusal, JwtVerifier, safe_key_url
from portcullis.gateway import resolve_jwks_files

ISS = "https://issuer.example"
AUD = "https://api.example"
NOW = 1_800_000_000.0

RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa1"})
EC = ECKey.generate_key("P-256", parameters={"kid": "ec1"})
ED = OKPKey.generate_key("Ed25519", parameters={"kid": "ed1"})
ATTACKER = RSAKey.generate_key(2048, parameters={"kid": "rsa1"})  # same kid, different key


def b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwks(*keys: Any) -> bytes:
    return json.dumps({"keys": [k.as_dict(private=False) for k in keys]}).encode()


class Issuer:
    """A fake issuer's HTTP side: serves its JWKS; can go down; counts fetches."""

    def __init__(self, *keys: Any) -> None:
        self.doc = jwks(*keys)
        self.down = False
        self.fetches = 0

    def fetch(self, url: str) -> bytes:
        self.fetches += 1
        if self.down:
            raise OSError("unreachable")
        assert url == ISS + "/jwks"
        return self.doc


def verifier(issuer: Issuer | None = None, clock: list[float] | None = None, **kw: Any) -> JwtVerifier:
    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=ISS, jwks_uri=ISS + "/jwks", audience=AUD, **kw)])
    src = issuer or Issuer(RSA, EC, ED)
    now = clock or [NOW]
    v = JwtVerifier(cfg, fetch=src.fetch, clock=lambda: now[0])
    for cache in v.issuers.values():
        cache._clock = lambda: now[0]  # the JWKS cache follows the same test clock
    return v


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "user-1", "tenant": "acme", "exp": int(NOW) + 300,
                            "iat": int(NOW) - 10, "scope": "projects:read billing:read", "jti": "t-1",
                            "client_id": "app-1"}
    base.update(over)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, body: dict[str, Any] | None = None, **header: Any) -> bytes:
    head = {"alg": alg, "kid": key.kid, "typ": "at+jwt", **header}
    head = {k: v for k, v in head.items() if v is not None}
    return jose_jwt.encode(head, body or claims(), key, algorithms=[alg]).encode()


def forge(header: dict[str, Any], body: dict[str, Any], signature: bytes = b"") -> bytes:
    return b".".join([b64(json.dumps(header).encode()), b64(json.dumps(body).encode()), b64(signature)])


async def refused(v: JwtVerifier, token: bytes) -> str:
    with pytest.raises(JwtRefusal) as info:
        await v.verify(token)
    return info.value.reason


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (EC, "ES256"), (ED, "EdDSA")])
async def test_good_tokens(key: Any, alg: str) -> None:
    p = await verifier().verify(sign(key, alg))
    assert (p.subject, p.tenant, p.client_id, p.credential_kind, p.credential_id) == (
        "user-1", "acme", "app-1", "jwt", "t-1")
    assert p.scopes == frozenset({"projects:read", "billing:read"})


async def test_scp_array_roles_and_audience_list() -> None:
    p = await verifier().verify(sign(RSA, "RS256", claims(scope=None, scp=["a", "b"], roles=["admin", 3],
                                                         aud=["other", AUD])))
    assert p.scopes == frozenset({"a", "b"})
    assert p.roles == frozenset({"admin"})


async def test_verified_token_cache_never_outlives_the_token() -> None:
    clock = [NOW]
    issuer = Issuer(RSA)
    v = verifier(issuer, clock, leeway_seconds=0)
    token = sign(RSA, "RS256", claims(exp=int(NOW) + 60))
    assert (await v.verify(token)).subject == "user-1"
    assert (await v.verify(token)).subject == "user-1"  # served from the cache
    clock[0] = NOW + 61
    assert await refused(v, token) == "jwt.expired"


# --- the attack suite -------------------------------------------------------------

@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_every_spelling(alg: str) -> None:  # CVE-2015-9235 family
    token = forge({"alg": alg, "kid": "rsa1", "typ": "at+jwt"}, claims())
    assert await refused(verifier(), token) == "jwt.alg_not_allowed"
    token = forge({"alg": alg, "kid": "rsa1"}, claims(), b"anything")
    assert await refused(verifier(), token) == "jwt.alg_not_allowed"


def public_encodings(key: Any) -> list[bytes]:
    pub = key.get_op_key("verify")
    return [
        pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
        pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        json.dumps(key.as_dict(private=False)).encode(),
        pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    ]


@pytest.mark.parametrize("key", [RSA, EC], ids=["RS-HS", "ES-HS"])
async def test_key_confusion_hmac_with_the_public_key(key: Any) -> None:  # CVE-2016-10555, CVE-2022-29217
    # Forged by hand: joserfc itself refuses to use a public key as an HMAC secret.
    for secret in public_encodings(key):
        for alg, digest in (("HS256", "sha256"), ("HS384", "sha384"), ("HS512", "sha512")):
            head = b64(json.dumps({"alg": alg, "kid": key.kid, "typ": "at+jwt"}).encode())
            body = b64(json.dumps(claims()).encode())
            mac = hmac.new(secret, head + b"." + body, digest).digest()
            assert await refused(verifier(), head + b"." + body + b"." + b64(mac)) == "jwt.alg_not_allowed"


def test_hmac_cannot_even_be_configured() -> None:
    with pytest.raises(ValidationError, match="not allowed"):
        JwtIssuerConfig(issuer=ISS, jwks_uri=ISS + "/jwks", audience=AUD, algorithms=["HS256"])


async def test_embedded_jwk_is_never_trusted() -> None:  # CVE-2018-0114
    evil = RSAKey.generate_key(2048, parameters={"kid": "evil"})
    token = sign(evil, "RS256", jwk=evil.as_dict(private=False), kid=None)
    assert await refused(verifier(), token) == "jwt.bad_signature"


@pytest.mark.parametrize("header", ["jku", "x5u"])
async def test_jku_and_x5u_are_never_fetched(header: str) -> None:
    issuer = Issuer(RSA)
    extra: dict[str, Any] = {header: "https://attacker.example/keys"}
    token = sign(ATTACKER, "RS256", **extra)
    assert await refused(verifier(issuer), token) == "jwt.bad_signature"
    assert issuer.fetches == 1  # only our own JWKS was ever fetched


@pytest.mark.parametrize("kid", ["../../../../etc/passwd", "' OR '1'='1", "rsa1\x00", "x" * 300, "/dev/null"])
async def test_kid_traversal_and_injection(kid: str) -> None:
    token = sign(ATTACKER, "RS256", kid=kid)
    assert await refused(verifier(), token) == "jwt.unknown_kid"


async def test_same_kid_other_key_is_a_bad_signature() -> None:
    assert await refused(verifier(), sign(ATTACKER, "RS256")) == "jwt.bad_signature"


async def test_ecdsa_psychic_signature_r_s_zero() -> None:  # CVE-2022-21449
    good = sign(EC, "ES256").split(b".")
    zeros = b".".join([good[0], good[1], b64(b"\x00" * 64)])
    assert await refused(verifier(), zeros) == "jwt.bad_signature"
    der_zero = b".".join([good[0], good[1], b64(bytes.fromhex("3006020100020100"))])
    assert await refused(verifier(), der_zero) == "jwt.bad_signature"


@pytest.mark.parametrize("part", [1, 2])
async def test_bit_flips(part: int) -> None:
    good = sign(RSA, "RS256").split(b".")
    raw = bytearray(base64.urlsafe_b64decode(good[part] + b"=" * (-len(good[part]) % 4)))
    for i in (0, len(raw) // 2, len(raw) - 1):
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        parts = list(good)
        parts[part] = b64(bytes(flipped))
        reason = await refused(verifier(), b".".join(parts))
        assert reason in ("jwt.bad_signature", "jwt.malformed")


@pytest.mark.parametrize("token", [b"", b"abc", b"a.b", b"a.b.c.d", b"a..c", b"..", b"a.b.", b"!!!.???.***",
                                   b"eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln"])
async def test_missing_extra_and_garbage_segments(token: bytes) -> None:
    assert await refused(verifier(), token) == "jwt.malformed"


async def test_huge_header() -> None:
    token = forge({"alg": "RS256", "kid": "rsa1", "pad": "x" * 20_000}, claims(), b"sig")
    assert await refused(verifier(), token) == "jwt.too_large"


async def test_unknown_crit() -> None:
    good = sign(RSA, "RS256").split(b".")
    head = b64(json.dumps({"alg": "RS256", "kid": "rsa1", "crit": ["exp-ext"], "exp-ext": 1}).encode())
    assert await refused(verifier(), b".".join([head, good[1], good[2]])) == "jwt.crit_unsupported"


@pytest.mark.parametrize(("body", "reason"), [
    (claims(exp=int(NOW) - 31), "jwt.expired"),
    (claims(exp=None), "jwt.missing_exp"),
    (claims(exp="tomorrow"), "jwt.malformed"),
    (claims(nbf=int(NOW) + 120), "jwt.not_yet_valid"),
    (claims(iat=int(NOW) + 120), "jwt.issued_in_future"),
    (claims(iss=ISS + ".evil"), "jwt.unknown_issuer"),     # issuer prefix match
    (claims(iss=ISS + "/"), "jwt.unknown_issuer"),
    (claims(iss=ISS[:-1]), "jwt.unknown_issuer"),
    (claims(aud="https://other.example"), "jwt.bad_audience"),
    (claims(aud=[]), "jwt.bad_audience"),
    (claims(aud=None), "jwt.bad_audience"),
    (claims(nonce="n-1"), "jwt.id_token"),                  # an ID token used as an access token
    (claims(at_hash="abc"), "jwt.id_token"),
    (claims(cnf="jkt"), "jwt.malformed"),                    # cnf present but unusable: never ignored
    (claims(cnf={"jkt": 42}), "jwt.malformed"),
    (claims(cnf={"jwk": {"kty": "EC"}}), "jwt.unsupported_cnf"),
    (claims(sub=None), "jwt.missing_sub"),
    (claims(tenant=None), "jwt.missing_tenant"),
])
async def test_claims(body: dict[str, Any], reason: str) -> None:
    assert await refused(verifier(), sign(RSA, "RS256", body)) == reason


async def test_confirmation_claims_reach_the_principal() -> None:
    """Binding is enforced by the authenticate stage (DPoP proof / client certificate)."""
    jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    x5t = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2"
    p = await verifier().verify(sign(RSA, "RS256", claims(cnf={"jkt": jkt})))
    assert (p.cnf_jkt, p.cnf_x5t) == (jkt, None)
    p = await verifier().verify(sign(RSA, "RS256", claims(cnf={"x5t#S256": x5t}, jti="t-2")))
    assert (p.cnf_jkt, p.cnf_x5t) == (None, x5t)


async def test_expiry_leeway_is_explicit() -> None:
    assert (await verifier().verify(sign(RSA, "RS256", claims(exp=int(NOW) - 29)))).subject == "user-1"
    strict = verifier(leeway_seconds=0)
    assert await refused(strict, sign(RSA, "RS256", claims(exp=int(NOW) - 1))) == "jwt.expired"


async def test_dpop_proof_used_as_access_token() -> None:
    proof = sign(EC, "ES256", typ="dpop+jwt")
    assert await refused(verifier(), proof) == "jwt.dpop_proof_as_token"


async def test_typ_at_jwt_required_when_configured() -> None:
    v = verifier(require_typ="at+jwt")
    assert await refused(v, sign(RSA, "RS256", typ="JWT")) == "jwt.bad_typ"
    assert await refused(v, sign(RSA, "RS256", typ=None)) == "jwt.bad_typ"
    assert (await v.verify(sign(RSA, "RS256", typ="application/at+jwt"))).subject == "user-1"


async def test_algorithm_allowlist_per_issuer() -> None:
    v = verifier(algorithms=["ES256"])
    assert await refused(v, sign(RSA, "RS256")) == "jwt.alg_not_allowed"
    assert (await v.verify(sign(EC, "ES256"))).subject == "user-1"


async def test_alg_header_lies_about_the_key() -> None:
    # Header says ES256 but names the RSA key: joserfc must not verify across key types.
    body = sign(RSA, "RS256").split(b".")
    head = b64(json.dumps({"alg": "ES256", "kid": "rsa1", "typ": "at+jwt"}).encode())
    assert await refused(verifier(), b".".join([head, body[1], body[2]])) == "jwt.bad_signature"


# --- the JWKS cache ------------------------------------------------------------------

async def test_unknown_kid_flood_is_rate_limited() -> None:
    issuer = Issuer(RSA)
    v = verifier(issuer)
    for i in range(50):
        assert await refused(v, sign(ATTACKER, "RS256", kid=f"random-{i}")) == "jwt.unknown_kid"
    assert issuer.fetches <= 2  # the first load and at most one forced refresh per interval


async def test_key_rotation_picked_up_on_unknown_kid() -> None:
    clock = [NOW]
    issuer = Issuer(RSA)
    v = verifier(issuer, clock)
    assert (await v.verify(sign(RSA, "RS256"))).subject == "user-1"
    new = ECKey.generate_key("P-256", parameters={"kid": "ec-new"})
    issuer.doc = jwks(RSA, new)
    clock[0] += 31  # past the minimum refresh interval
    assert (await v.verify(sign(new, "ES256", claims(exp=int(clock[0]) + 300)))).subject == "user-1"


async def test_stale_keys_are_served_while_the_issuer_is_down() -> None:
    clock = [NOW]
    issuer = Issuer(RSA)
    v = verifier(issuer, clock, jwks_ttl_seconds=60)
    await v.verify(sign(RSA, "RS256", claims(jti="a")))
    issuer.down = True
    clock[0] += 120  # TTL passed; refresh fails
    assert (await v.verify(sign(RSA, "RS256", claims(jti="b", exp=int(clock[0]) + 300)))).subject == "user-1"


async def test_no_keys_at_all_is_a_clear_refusal() -> None:
    issuer = Issuer(RSA)
    issuer.down = True
    assert await refused(verifier(issuer), sign(RSA, "RS256")) == "jwt.jwks_unavailable"


async def test_private_and_symmetric_keys_in_a_jwks_are_ignored() -> None:
    oct_key = OctKey.generate_key(256, parameters={"kid": "oct"})
    issuer = Issuer(RSA)
    issuer.doc = json.dumps({"keys": [RSA.as_dict(private=True), oct_key.as_dict(private=True)]}).encode()
    assert await refused(verifier(issuer), sign(RSA, "RS256")) == "jwt.unknown_kid"


def test_config_needs_exactly_one_key_source_and_https() -> None:
    with pytest.raises(ValidationError, match="exactly one"):
        JwtIssuerConfig(issuer=ISS, audience=AUD)
    with pytest.raises(ValidationError, match="https"):
        JwtIssuerConfig(issuer=ISS, jwks_uri="http://keys.example/jwks", audience=AUD)



# --- review fixes: robustness of key loading and fetching ----------------------------

async def test_one_bad_key_does_not_take_the_key_set_down() -> None:
    issuer = Issuer(RSA)
    doc = json.loads(issuer.doc)
    doc["keys"].insert(0, {"kty": "EC", "crv": "P-999", "kid": "odd", "x": "AA", "y": "AA"})
    issuer.doc = json.dumps(doc).encode()
    assert (await verifier(issuer).verify(sign(RSA, "RS256"))).subject == "user-1"


async def test_a_down_issuer_is_retried_at_most_once_per_interval() -> None:
    clock = [NOW]
    issuer = Issuer(RSA)
    v = verifier(issuer, clock, jwks_ttl_seconds=60, jwks_min_refresh_seconds=30)
    await v.verify(sign(RSA, "RS256", claims(jti="a")))
    issuer.down = True
    clock[0] += 120
    for i in range(20):  # stale keys keep serving; fetches happen in the background, rarely
        token = sign(RSA, "RS256", claims(jti=f"t{i}", exp=int(clock[0]) + 300))
        assert (await v.verify(token)).subject == "user-1"
        await asyncio.sleep(0)
    assert issuer.fetches <= 2


@pytest.mark.parametrize(("url", "ok"), [
    ("https://issuer.example/jwks", True),
    ("http://127.0.0.1:8080/jwks", True),
    ("http://localhost/jwks", True),
    ("http://[::1]:9000/jwks", True),
    ("http://issuer.example/jwks", False),
    ("http://localhost.evil.example/jwks", False),
    ("http://127.0.0.1@evil.example/jwks", False),
    ("https://user:pw@issuer.example/jwks", False),
    ("ftp://issuer.example/jwks", False),
    ("https://issuer.example:99999/jwks", False),
])
def test_key_urls_are_judged_on_the_parsed_url(url: str, ok: bool) -> None:
    assert safe_key_url(url) is ok


async def test_discovery_tries_oidc_then_rfc8414_with_the_path_after_the_host() -> None:
    seen: list[str] = []
    issuer_url = "https://issuer.example/tenant1"

    def fetch(url: str) -> bytes:
        seen.append(url)
        if url == "https://issuer.example/.well-known/oauth-authorization-server/tenant1":
            return json.dumps({"issuer": issuer_url, "jwks_uri": "https://issuer.example/keys"}).encode()
        if url == "https://issuer.example/keys":
            return jwks(RSA)
        raise OSError("404")

    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=issuer_url, discovery=True, audience=AUD)])
    v = JwtVerifier(cfg, fetch=fetch, clock=lambda: NOW)
    for cache in v.issuers.values():
        cache._clock = lambda: NOW
    assert (await v.verify(sign(RSA, "RS256", claims(iss=issuer_url)))).subject == "user-1"
    assert seen[:2] == ["https://issuer.example/tenant1/.well-known/openid-configuration",
                        "https://issuer.example/.well-known/oauth-authorization-server/tenant1"]


async def test_discovered_jwks_uri_must_be_https_too() -> None:
    def fetch(url: str) -> bytes:
        if url.endswith("openid-configuration"):
            return json.dumps({"issuer": ISS, "jwks_uri": "http://evil.example/keys"}).encode()
        raise OSError("404")

    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=ISS, discovery=True, audience=AUD)])
    v = JwtVerifier(cfg, fetch=fetch, clock=lambda: NOW)
    assert await refused(v, sign(RSA, "RS256")) == "jwt.jwks_unavailable"


async def test_scp_as_a_string_and_the_rate_limit_key() -> None:
    p = await verifier().verify(sign(RSA, "RS256", claims(scope=None, scp="a b")))
    assert p.scopes == frozenset({"a", "b"})
    assert p.limit_key == f"jwt:{ISS}:app-1"  # per client, not per token


def test_relative_jwks_file_resolves_against_the_config(tmp_path: Path) -> None:
    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=ISS, jwks_file="keys/jwks.json", audience=AUD)])
    resolved = resolve_jwks_files(cfg, tmp_path / "gw.yaml")
    assert resolved.issuers[0].jwks_file == str((tmp_path / "keys" / "jwks.json").resolve())


# --- found by the Wycheproof vectors (docs/conformance.md) --------------------------

async def test_a_respelled_signature_is_refused() -> None:
    """Non-zero pad bits in the last character: same bytes, other text — refused, not a new token."""
    head, body, sig = sign(EC, "ES256", claims(jti=None)).split(b".")
    last = sig[-1:]
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(last) + 1:alphabet.index(last) + 2]  # 64-byte sig: 2 unused bits
    assert await refused(verifier(), b".".join([head, body, sig[:-1] + twin])) == "jwt.malformed"


async def test_ecdsa_malleability_does_not_change_the_credential_id() -> None:
    """(r, n - s) is also a valid ECDSA signature: the credential id of a jti-less token hashes
    the signed part, so both spellings are one credential (and one revocation)."""
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    head, body, sig = sign(EC, "ES256", claims(jti=None)).split(b".")
    raw = base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4))
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    twin = b64(r + (n - s).to_bytes(32, "big"))
    v = verifier()
    a = await v.verify(b".".join([head, body, sig]))
    b = await v.verify(b".".join([head, body, twin]))
    assert a.credential_id == b.credential_id
    assert a.credential_id.startswith("sha256:")


async def test_a_key_verifies_only_the_algorithm_it_declares() -> None:
    rsa_doc = RSA.as_dict(private=False) | {"alg": "PS256"}
    issuer = Issuer()
    issuer.doc = json.dumps({"keys": [rsa_doc]}).encode()
    v = verifier(issuer, algorithms=["RS256", "PS256"])
    assert await refused(v, sign(RSA, "RS256")) == "jwt.bad_signature"
    assert (await v.verify(sign(RSA, "PS256"))).subject == "user-1"


async def test_a_discovery_document_that_is_not_an_object_is_not_a_crash() -> None:
    def fetch(url: str) -> bytes:
        return b"[]"

    cfg = JwtConfig(issuers=[JwtIssuerConfig(issuer=ISS, discovery=True, audience=AUD)])
    assert await refused(JwtVerifier(cfg, fetch=fetch, clock=lambda: NOW), sign(RSA, "RS256")) == "jwt.jwks_unavailable"


def test_roca_fingerprint_spares_ordinary_keys() -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa as crypto_rsa

    from portcullis.credentials.jwt import roca_fingerprint

    for _ in range(3):
        n = crypto_rsa.generate_private_key(65537, 2048).public_key().public_numbers().n
        assert not roca_fingerprint(n)


async def test_every_principal_field_comes_from_its_claim() -> None:
    """The verifier builds the Principal positionally (it is on the hot path): each field
    must land under its own name."""
    jkt = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
    tok = sign(RSA, "RS256", claims(jti="tok-7", client_id="cli-1", roles=["admin"], scope="a b",
                                     cnf={"jkt": jkt}, acr="urn:mfa", amr=["pwd", "otp"], auth_time=int(NOW) - 5))
    p = await verifier().verify(tok)
    assert p._asdict() == {
        "subject": "user-1", "tenant": "acme", "credential_id": "tok-7", "credential_kind": "jwt",
        "scopes": frozenset({"a", "b"}), "roles": frozenset({"admin"}), "client_id": "cli-1",
        "rate_limit": None, "cnf_jkt": jkt, "cnf_x5t": None, "limit_key": f"jwt:{ISS}:cli-1",
        "signing_key_id": None, "audiences": frozenset({AUD}), "acr": "urn:mfa", "amr": ("pwd", "otp"),
        "auth_time": float(int(NOW) - 5),
    }
    without_client = await verifier().verify(sign(RSA, "RS256", claims(client_id=None, jti=None)))
    assert without_client.limit_key == f"jwt:{ISS}:sub:user-1"
    assert without_client.credential_id.startswith("sha256:") and without_client.client_id is None


async def test_cached_header_is_still_checked_against_each_issuers_rules() -> None:
    """The decoded-header cache skips parsing, never the per-issuer checks: a header that
    one issuer accepts (RS256, typ JWT) is refused for another that allows only ES256 or
    requires `at+jwt`, whichever issuer's token came first."""
    other = "https://other.example"
    src = Issuer(RSA, EC, ED)
    cfg = JwtConfig(issuers=[
        JwtIssuerConfig(issuer=ISS, jwks_uri=ISS + "/jwks", audience=AUD),
        JwtIssuerConfig(issuer=other, jwks_uri=ISS + "/jwks", audience=AUD, algorithms=["ES256"]),
        JwtIssuerConfig(issuer="https://typed.example", jwks_uri=ISS + "/jwks", audience=AUD,
                        require_typ="at+jwt")])
    v = JwtVerifier(cfg, fetch=src.fetch, clock=lambda: NOW)
    for cache in v.issuers.values():
        cache._clock = lambda: NOW
    assert (await v.verify(sign(RSA, "RS256", typ="JWT"))).subject == "user-1"
    assert await refused(v, sign(RSA, "RS256", claims(iss=other), typ="JWT")) == "jwt.alg_not_allowed"
    assert await refused(v, sign(RSA, "RS256", claims(iss="https://typed.example"), typ="JWT")) == "jwt.bad_typ"


async def test_header_cache_is_bounded_and_keeps_no_refused_header() -> None:
    v = verifier()
    for i in range(300):  # a flood of distinct (valid) headers
        await v.verify(sign(RSA, "RS256", cty=f"t{i}"))
    assert 0 < len(v._headers) <= 64
    v._headers.clear()
    for bad in ({"alg": "none"}, {"alg": "RS256", "crit": ["exp"]}, {"alg": "RS256", "kid": 7},
                {"alg": "RS256", "typ": "dpop+jwt"}):
        await refused(v, forge(bad, claims(), b"sig"))
    assert v._headers == {}


@pytest.mark.parametrize("segment", ["+", "/", "="])
async def test_standard_base64_characters_are_not_base64url(segment: str) -> None:
    """RFC 7515 §2: base64url without padding; "+", "/" and "=" anywhere make the token malformed."""
    head, body, sig = sign(RSA, "RS256").split(b".")
    for i, part in enumerate((head, body, sig)):
        parts = [head, body, sig]
        parts[i] = part[:8] + segment.encode() + part[9:]
        assert await refused(verifier(), b".".join(parts)) == "jwt.malformed"


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (RSA, "PS256"), (EC, "ES256"), (ED, "EdDSA"),
                                          (RSA, "RS384")])
async def test_a_cached_token_with_another_signature_is_verified_again(key: Any, alg: str) -> None:
    """The verified-token cache is keyed by the signed part; a hit also needs the same
    signature, so a token re-signed with garbage after its genuine twin was cached is
    still refused (and the genuine one still served)."""
    v = verifier(algorithms=["RS256", "PS256", "RS384", "ES256", "EdDSA"])
    good = sign(key, alg)
    assert (await v.verify(good)).subject == "user-1"
    head, body, sig = good.split(b".")
    raw = bytearray(base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4)))
    raw[len(raw) // 2] ^= 0x01
    forged = head + b"." + body + b"." + b64(bytes(raw))
    assert await refused(v, forged) == "jwt.bad_signature"
    assert await refused(v, head + b"." + body + b".") == "jwt.malformed"
    assert (await v.verify(good)).subject == "user-1"


async def test_verify_now_asks_for_keys_it_does_not_have() -> None:
    """`verify_now` never waits: before the JWKS is loaded, and for an unknown `kid`, it raises
    `KeysNeeded`; `verify` then fetches and answers, and `verify_now` answers from then on."""
    from portcullis.credentials.jwt import KeysNeeded

    src = Issuer(RSA, EC, ED)
    v = verifier(src)
    tok = sign(RSA, "RS256")
    with pytest.raises(KeysNeeded):
        v.verify_now(tok)
    assert src.fetches == 0
    assert (await v.verify(tok)).subject == "user-1"
    assert src.fetches == 1
    assert v.verify_now(tok).subject == "user-1"
    other = RSAKey.generate_key(2048, parameters={"kid": "rotated"})
    with pytest.raises(KeysNeeded):
        v.verify_now(sign(other, "RS256"))
    assert await refused(v, forge({"alg": "RS256", "kid": "rsa1"}, claims(), b"x" * 256)) == "jwt.bad_signature"
