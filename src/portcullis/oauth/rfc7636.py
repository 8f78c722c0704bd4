"""RFC 7636 (PKCE) as OAuth 2.1 and RFC 9700 §2.1.1 want it: S256, for every client.

Authlib's `CodeChallenge` checks the syntax and compares the verifier; it lets a
confidential client skip PKCE and accepts ``plain``. This extension narrows it:

- the authorization request MUST carry a ``code_challenge`` with method ``S256``
  (RFC 9700 §2.1.1: "Authorization servers MUST support PKCE"; OAuth 2.1 §4.1.1:
  clients MUST use it); ``plain`` is refused (RFC 9700 §2.1.1: clients SHOULD use
  S256, and a server that accepts ``plain`` invites downgrade);
- the token request MUST carry a ``code_verifier`` of 43-128 unreserved characters
  (RFC 7636 §4.1), and a verifier sent for a code issued without a challenge is
  refused (RFC 9700 §4.8, PKCE downgrade).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any, ClassVar

from authlib.oauth2.rfc6749 import InvalidGrantError, InvalidRequestError
from authlib.oauth2.rfc7636 import CodeChallenge

# RFC 7636 §4.1: code-verifier = 43*128unreserved; unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
VERIFIER = re.compile(r"^[A-Za-z0-9\-._~]{43,128}$")
# RFC 7636 §4.2: S256's challenge is BASE64URL(SHA256(verifier)) without padding: 43 characters.
S256_CHALLENGE = re.compile(r"^[A-Za-z0-9\-_]{43}$")
METHODS_SUPPORTED = ("S256",)


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: code_challenge = BASE64URL-ENCODE(SHA256(ASCII(code_verifier)))."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verify_s256(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6, compared in constant time."""
    if not VERIFIER.match(verifier):
        return False
    return hmac.compare_digest(s256(verifier).encode(), challenge.encode())


class RequiredS256(CodeChallenge):  # type: ignore[misc]
    """Authlib's PKCE extension, S256 only and required of every client."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD: ClassVar[list[str]] = list(METHODS_SUPPORTED)
    CODE_CHALLENGE_METHODS: ClassVar[dict[str, Callable[[str, str], bool]]] = {"S256": verify_s256}

    def __init__(self) -> None:
        super().__init__(required=True)

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        datalist = grant.request.payload.datalist
        for name in ("code_challenge", "code_challenge_method"):
            if len(datalist.get(name, [])) > 1:
                raise InvalidRequestError(f"Multiple '{name}' in request.")
        challenge, method = data.get("code_challenge"), data.get("code_challenge_method")
        if not challenge:
            # OAuth 2.1 §4.1.1 / RFC 9700 §2.1.1: PKCE for every client.
            raise InvalidRequestError("A 'code_challenge' (PKCE, S256) is required.")
        if method != "S256":
            # A missing method means "plain" (RFC 7636 §4.3): refused like an explicit one.
            raise InvalidRequestError("'code_challenge_method' must be S256.")
        if not S256_CHALLENGE.match(challenge):
            raise InvalidRequestError("Invalid 'code_challenge'.")

    def validate_code_verifier(self, grant: Any, result: Any) -> None:
        request = grant.request
        verifier = request.form.get("code_verifier")
        code = request.authorization_code
        challenge = self.get_authorization_code_challenge(code)
        if not challenge:
            # Codes are only issued with a challenge; a stored code without one (older
            # data) gets no tokens. RFC 9700 §4.8: a verifier without a challenge is refused.
            if verifier:
                raise InvalidRequestError("A 'code_verifier' was sent, but the code was issued without a challenge.")
            raise InvalidGrantError("The code was issued without PKCE.")
        if not verifier:
            raise InvalidRequestError("Missing 'code_verifier'.")
        if not VERIFIER.match(verifier):
            raise InvalidRequestError("Invalid 'code_verifier' (43-128 unreserved characters, RFC 7636 section 4.1).")
        if self.get_authorization_code_challenge_method(code) != "S256":
            raise InvalidGrantError("Unsupported code challenge method.")
        # RFC 7636 §4.6: a mismatch is invalid_grant.
        if not verify_s256(verifier, challenge):
            raise InvalidGrantError("PKCE verification failed.")
