"""PKCE (rfc7636.py): the RFC 7636 Appendix B vector, S256 only, required for every
client, verifier syntax, and a verifier without a challenge refused (RFC 9700 §4.8)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError

from portcullis.oauth.rfc7636 import RequiredS256, s256, verify_s256

# RFC 7636 Appendix B.
B_VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
B_CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"


def test_appendix_b_vector() -> None:
    assert s256(B_VERIFIER) == B_CHALLENGE
    assert verify_s256(B_VERIFIER, B_CHALLENGE)
    assert not verify_s256(B_VERIFIER[:-1] + "Y", B_CHALLENGE)


@pytest.mark.parametrize("verifier", ["a" * 42, "a" * 129, "a" * 42 + "+", "a" * 42 + "=", "é" * 43])
def test_verifier_syntax_rfc7636_s4_1(verifier: str) -> None:
    assert not verify_s256(verifier, s256("a" * 43))


def _auth_grant(params: dict[str, str]) -> Any:
    payload = SimpleNamespace(data=params, datalist={k: [v] for k, v in params.items()})
    return SimpleNamespace(request=SimpleNamespace(payload=payload))


def test_challenge_required_even_for_confidential_clients() -> None:
    with pytest.raises(InvalidRequestError, match="code_challenge"):
        RequiredS256().validate_code_challenge(_auth_grant({}), "https://c/cb")


@pytest.mark.parametrize("params", [
    {"code_challenge": B_CHALLENGE},  # no method: plain (RFC 7636 §4.3)
    {"code_challenge": B_VERIFIER, "code_challenge_method": "plain"},
    {"code_challenge": B_CHALLENGE, "code_challenge_method": "S512"},
    {"code_challenge": "short", "code_challenge_method": "S256"},
    {"code_challenge": B_CHALLENGE + "A", "code_challenge_method": "S256"},
])
def test_plain_and_malformed_challenges_refused(params: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError):
        RequiredS256().validate_code_challenge(_auth_grant(params), "https://c/cb")


def test_repeated_challenge_refused() -> None:
    grant = _auth_grant({"code_challenge": B_CHALLENGE, "code_challenge_method": "S256"})
    grant.request.payload.datalist["code_challenge"] = [B_CHALLENGE, B_CHALLENGE]
    with pytest.raises(InvalidRequestError, match="Multiple"):
        RequiredS256().validate_code_challenge(grant, "https://c/cb")


def test_s256_challenge_accepted() -> None:
    RequiredS256().validate_code_challenge(
        _auth_grant({"code_challenge": B_CHALLENGE, "code_challenge_method": "S256"}), "https://c/cb")


def _token_grant(verifier: str | None, challenge: str | None, method: str | None = "S256") -> Any:
    form = {"code_verifier": verifier} if verifier is not None else {}
    code = SimpleNamespace(code_challenge=challenge, code_challenge_method=method)
    return SimpleNamespace(request=SimpleNamespace(form=form, authorization_code=code,
                                                   auth_method="client_secret_basic"))


def test_verifier_matches() -> None:
    RequiredS256().validate_code_verifier(_token_grant(B_VERIFIER, B_CHALLENGE), None)


def test_wrong_verifier_is_invalid_grant() -> None:
    with pytest.raises(InvalidGrantError):
        RequiredS256().validate_code_verifier(_token_grant("x" * 43, B_CHALLENGE), None)


def test_missing_or_malformed_verifier_is_invalid_request() -> None:
    with pytest.raises(InvalidRequestError):
        RequiredS256().validate_code_verifier(_token_grant(None, B_CHALLENGE), None)
    with pytest.raises(InvalidRequestError):
        RequiredS256().validate_code_verifier(_token_grant("x" * 20, B_CHALLENGE), None)


def test_verifier_without_challenge_refused_rfc9700_s4_8() -> None:
    with pytest.raises(InvalidRequestError, match="without a challenge"):
        RequiredS256().validate_code_verifier(_token_grant(B_VERIFIER, None, None), None)
    # And a code without a challenge gets no tokens at all, even without a verifier.
    with pytest.raises(InvalidGrantError):
        RequiredS256().validate_code_verifier(_token_grant(None, None, None), None)


def test_stored_plain_method_never_verifies() -> None:
    with pytest.raises(InvalidGrantError):
        RequiredS256().validate_code_verifier(_token_grant(B_VERIFIER, B_VERIFIER, "plain"), None)
