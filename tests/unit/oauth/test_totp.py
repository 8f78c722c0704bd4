"""TOTP (identity/totp.py) against RFC 6238 Appendix B, and the one-step window."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

import pyotp
import pytest

from portcullis.oauth.identity import totp

# RFC 6238 Appendix B: the seeds are ASCII digits, 20/32/64 bytes for SHA1/SHA256/SHA512.
SEEDS = {
    "sha1": b"12345678901234567890",
    "sha256": b"12345678901234567890123456789012",
    "sha512": b"1234567890123456789012345678901234567890123456789012345678901234",
}
VECTORS = [  # (time, T, {alg: 8-digit TOTP})
    (59, 0x1, {"sha1": "94287082", "sha256": "46119246", "sha512": "90693936"}),
    (1111111109, 0x23523EC, {"sha1": "07081804", "sha256": "68084774", "sha512": "25091201"}),
    (1111111111, 0x23523ED, {"sha1": "14050471", "sha256": "67062674", "sha512": "99943326"}),
    (1234567890, 0x273EF07, {"sha1": "89005924", "sha256": "91819424", "sha512": "93441116"}),
    (2000000000, 0x3F940AA, {"sha1": "69279037", "sha256": "90698825", "sha512": "38618901"}),
    (20000000000, 0x27BC86AA, {"sha1": "65353130", "sha256": "77737706", "sha512": "47863826"}),
]
DIGESTS: dict[str, Any] = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def b32(seed: bytes) -> str:
    return base64.b32encode(seed).decode().rstrip("=")


@pytest.mark.parametrize(("alg"), ["sha1", "sha256", "sha512"])
@pytest.mark.parametrize(("when", "step", "codes"), VECTORS)
def test_rfc6238_appendix_b(alg: str, when: int, step: int, codes: dict[str, str]) -> None:
    got = totp.match_step(b32(SEEDS[alg]), codes[alg], when, window=0, digits=8, digest=DIGESTS[alg])
    assert got == step


def test_a_vector_code_is_refused_under_another_algorithm() -> None:
    assert totp.match_step(b32(SEEDS["sha1"]), "46119246", 59, window=0, digits=8) is None


def test_window_accepts_one_step_either_side_only() -> None:
    secret = totp.new_secret()
    now = 1_700_000_015.0
    client = pyotp.TOTP(secret)  # an independent client: the authenticator app
    current = int(now) // 30
    for offset in (-1, 0, 1):
        assert totp.match_step(secret, client.at(now + 30 * offset), now) == current + offset
    for offset in (-3, -2, 2, 3):
        assert totp.match_step(secret, client.at(now + 30 * offset), now) is None


@pytest.mark.parametrize("code", ["", "12345", "1234567", "abcdef", "12 34 5x"])
def test_malformed_codes_are_refused(code: str) -> None:
    assert totp.match_step(totp.new_secret(), code, 1_700_000_000.0) is None


def test_secret_box_binds_the_user() -> None:
    box = totp.SecretBox(b"k" * 32)
    sealed = box.seal("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "usr_a")
    assert "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" not in sealed
    assert box.open(sealed, "usr_a") == "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
    assert box.open(sealed, "usr_b") is None  # moved to another user: refused
    tampered = sealed[:-4] + ("AAAA" if not sealed.endswith("AAAA") else "BBBB")
    assert box.open(tampered, "usr_a") is None
    assert totp.SecretBox(b"j" * 32).open(sealed, "usr_a") is None


def test_provisioning_uri_is_the_key_uri_format() -> None:
    uri = totp.provisioning_uri("JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP", "alice@acme.example", "Portcullis")
    assert uri.startswith("otpauth://totp/Portcullis:alice%40acme.example?")
    assert "secret=JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP" in uri and "issuer=Portcullis" in uri
