"""JWT access tokens (RFC 9068), resource indicators (RFC 8707) and the token response.

`AccessTokenIssuer` is registered as Authlib's ``default`` token generator, so every
grant (client credentials here; authorization code and refresh in `authorize`) issues
the same tokens. What a grant does not pass to the generator — the DPoP key, the client
certificate, the requested resources — comes from the token request being served,
which the token endpoint binds with `bind_request` (a context variable) around
Authlib's `create_token_response`; `current_request()` gives it to other code.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from authlib.oauth2.rfc6749 import OAuth2Error

from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.models import Client, LoginState
from portcullis.oauth.server import OAuthRequest
from portcullis.oauth.service import SigningKeys

#: RFC 9068 §2.1: "Resource servers ... MUST verify that the typ header value is at+jwt".
ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type
REFRESH_TOKEN_PREFIX = "prt_"  # noqa: S105 - a prefix
MAX_RESOURCES = 10

_current: ContextVar[OAuthRequest | None] = ContextVar("portcullis_oauth_request", default=None)


def current_request() -> OAuthRequest | None:
    """The token request being served (None outside the token endpoint)."""
    return _current.get()


@contextmanager
def bind_request(request: OAuthRequest) -> Iterator[None]:
    """Make `request` the current token request for the duration of the block."""
    token = _current.set(request)
    try:
        yield
    finally:
        _current.reset(token)


class InvalidTargetError(OAuth2Error):  # type: ignore[misc]
    """RFC 8707 §2: "The requested resource is invalid, missing, unknown, or malformed."."""

    error = "invalid_target"


def validate_resources(cfg: AuthServerConfig, values: list[str]) -> list[str]:
    """RFC 8707 §2: each `resource` "MUST be an absolute URI ... MUST NOT include a
    fragment component"; we also allow only the configured resources and the gateway's
    own audience (`cfg.audience`, the issuer unless `default_audience` says otherwise).
    Returns them deduplicated in order; raises `InvalidTargetError`."""
    if len(values) > MAX_RESOURCES:
        raise InvalidTargetError(description="Too many resource parameters.")
    allowed = {cfg.audience, *cfg.resources}
    out: list[str] = []
    for v in values:
        try:
            parts = urlsplit(v)
        except ValueError:
            raise InvalidTargetError(description="A resource is not an absolute URI.") from None
        if not parts.scheme or not parts.netloc or "#" in v:
            raise InvalidTargetError(description="A resource must be an absolute URI without a fragment.")
        if v not in allowed:
            raise InvalidTargetError(description="The requested resource is unknown.")
        if v not in out:
            out.append(v)
    return out


def new_refresh_token() -> str:
    """An opaque refresh token: 256 bits from the OS CSPRNG."""
    return REFRESH_TOKEN_PREFIX + secrets.token_urlsafe(32)


class AccessTokenIssuer:
    """Authlib's token generator (`server.register_token_generator("default", ...)`).

    `user` is the `LoginState` of the user who authorized (None for client
    credentials). The token response (RFC 6749 §5.1) is ``token_type`` ``DPoP`` when the
    token is DPoP-bound (RFC 9449 §5) and ``Bearer`` otherwise.
    """

    def __init__(self, cfg: AuthServerConfig, keys: SigningKeys, clock: Callable[[], float]) -> None:
        self._cfg = cfg
        self._keys = keys
        self._clock = clock

    def claims(self, client: Client, user: LoginState | None, scope: str, request: OAuthRequest | None,
               lifetime: int) -> dict[str, Any]:
        """The RFC 9068 §2.2 claims of one access token."""
        cfg = self._cfg
        now = int(self._clock())
        resources = request.resources if request is not None else []
        aud: str | list[str] = (resources[0] if len(resources) == 1 else list(resources)) if resources \
            else cfg.audience
        claims: dict[str, Any] = {
            "iss": cfg.issuer,
            # §2.2: sub is the resource owner, or the client itself when there is none.
            "sub": user.user_id if user is not None else client.client_id,
            "aud": aud,
            "exp": now + lifetime,
            "iat": now,
            "jti": secrets.token_urlsafe(16),
            "client_id": client.client_id,
        }
        if scope:
            claims["scope"] = scope  # §2.2.3
        claims[cfg.tenant_claim] = user.tenant if user is not None else client.tenant
        if user is not None:
            # §2.2.1 authentication information; §2.2.3.1 roles.
            claims["auth_time"] = int(user.auth_time)
            claims["acr"] = user.acr
            claims["amr"] = list(user.amr)
            claims["roles"] = list(user.roles)
        cnf: dict[str, str] = {}
        if request is not None and request.dpop_jkt:
            cnf["jkt"] = request.dpop_jkt  # RFC 9449 §6.1
        if request is not None and request.cert_x5t:
            cnf["x5t#S256"] = request.cert_x5t  # RFC 8705 §3.1
        if cnf:
            claims["cnf"] = cnf
        return claims

    def __call__(self, grant_type: str, client: Client, user: LoginState | None = None,  # noqa: PLR0917
                 scope: str | None = None, expires_in: int | None = None,
                 include_refresh_token: bool = True) -> dict[str, Any]:
        request = current_request()
        lifetime = self._cfg.access_token_lifetime_seconds
        if expires_in is not None and 0 < int(expires_in) < lifetime:
            lifetime = int(expires_in)
        claims = self.claims(client, user, scope or "", request, lifetime)
        token: dict[str, Any] = {
            "access_token": self._keys.sign(claims, ACCESS_TOKEN_TYP),
            "token_type": "DPoP" if "jkt" in claims.get("cnf", {}) else "Bearer",
            "expires_in": lifetime,
        }
        if scope:
            token["scope"] = scope
        if include_refresh_token and grant_type != "client_credentials":
            # RFC 6749 §4.4.3: no refresh token with client credentials. The authorize
            # area stores it (its token saver) with the family and binding.
            token["refresh_token"] = new_refresh_token()
        return token
