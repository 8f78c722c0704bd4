"""Token revocation (RFC 7009) on Authlib's `RevocationEndpoint`.

§2.1: "The authorization server first validates the client credentials ... and then
verifies whether the token was issued to the client making the revocation request."
Any registered method authenticates the caller (public clients by `client_id`, as §5
allows, so they can revoke their own refresh tokens). Our JWT access tokens issued to
that client are revoked by `jti` until they expire (the gateway refuses them within one
poll of the store, 0.25 s); other tokens go to `ctx.token_revokers` (refresh tokens).

§2.2: "The authorization server responds with HTTP status code 200 if the token has
been revoked successfully or if the client submitted an invalid token" — also for a
token of another client, which is left alone: answering differently would tell the
caller the token exists (the audit event records it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from authlib.oauth2.rfc6749 import InvalidRequestError
from authlib.oauth2.rfc7009 import RevocationEndpoint

from portcullis.oauth.client_auth import ALL_METHODS
from portcullis.oauth.keys import RETIRE_LEEWAY
from portcullis.oauth.models import Client
from portcullis.oauth.rfc7662 import OwnAccessTokens, RevocationSnapshot
from portcullis.oauth.server import OAuthRequest
from portcullis.oauth.service import TokenRevoker
from portcullis.storage.protocols import RevocationRecord, RevocationStore


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    CLIENT_AUTH_METHODS = ALL_METHODS

    def __init__(self, tokens: OwnAccessTokens, store: RevocationStore, snapshot: RevocationSnapshot,
                 revokers: list[TokenRevoker], clock: Callable[[], float]) -> None:
        super().__init__()
        self._tokens = tokens
        self._store = store
        self._snapshot = snapshot
        self._revokers = revokers
        self._clock = clock

    def check_params(self, request: OAuthRequest, client: Client) -> None:
        # §2.1: token REQUIRED; token_type_hint OPTIONAL and may be ignored (we search all).
        token = request.as_request.form.get("token")
        if not token or len(token) != 1:
            raise InvalidRequestError(description="Exactly one token parameter is required.")

    def authenticate_token(self, request: OAuthRequest, client: Client) -> dict[str, Any] | None:
        self.check_params(request, client)
        token = request.as_request.form["token"][0]
        audit = request.as_request.audit
        claims = self._tokens.claims(token)
        if claims is not None:
            if claims.get("client_id") != client.client_id:
                audit["revoke"] = "not_owner"
                return None
            audit["revoke"] = "access_token"
            return claims
        for revoke in self._revokers:
            if revoke(token, client.client_id):
                audit["revoke"] = "other_token"
                return None
        audit["revoke"] = "unknown_token"
        return None

    def revoke_token(self, token: dict[str, Any], request: OAuthRequest) -> None:
        now = self._clock()
        self._store.revoke_tokens(RevocationRecord(
            kind="jti", value=str(token["jti"]), created_at=now,
            expires_at=float(token["exp"]) + RETIRE_LEEWAY, reason="oauth.revoke"))
        self._snapshot.invalidate()
