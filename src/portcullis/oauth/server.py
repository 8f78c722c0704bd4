"""Authlib's `AuthorizationServer`, bound to our request/response pair and stores.

Authlib is the protocol core (RFC 6749 grants and client authentication, RFC 7636,
RFC 7662, RFC 7009, RFC 8414). We subclass only its framework seams
(`create_oauth2_request`, `handle_response`, `query_client`, `save_token`,
`send_signal`); collaborators are injected, not looked up. Authlib ships no type
information, so this module is the one place typed code meets it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
from authlib.oauth2 import AuthorizationServer as _AuthlibServer
from authlib.oauth2.rfc6749 import JsonPayload, JsonRequest, OAuth2Payload, OAuth2Request

from portcullis.oauth.http import AsRequest, AsResponse
from portcullis.oauth.models import Client, ClientDirectory, LoginState


class _Payload(OAuth2Payload):  # type: ignore[misc]
    """Parameters from the query and (for POST) the form body; a repeated parameter is
    visible in `datalist`, which Authlib's grants use to refuse repeats (RFC 6749 §3.1)."""

    def __init__(self, req: AsRequest) -> None:
        merged: defaultdict[str, list[str]] = defaultdict(list)
        for source in (req.query, req.form if req.method == "POST" else {}):
            for k, vs in source.items():
                merged[k].extend(vs)
        self._datalist = merged
        self._data = {k: vs[0] for k, vs in merged.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class OAuthRequest(OAuth2Request):  # type: ignore[misc]
    """An `AsRequest` as Authlib sees it, plus what our extensions learn about it.

    `dpop_jkt`: thumbprint of a verified DPoP proof's key (RFC 9449 §5);
    `cert_x5t`: thumbprint of the verified client certificate (RFC 8705 §3);
    `login`: the browser session's login state (authorization endpoint);
    `resources`: validated RFC 8707 resource indicators.
    """

    def __init__(self, req: AsRequest) -> None:
        # Authlib's __init__ re-checks transport security on every request (urlsplit,
        # ipaddress, getenv: ~20% of an introspection). Ours is a property of the issuer,
        # checked once by `AuthServerConfig` (https, or http on loopback only), so the
        # attributes are set here directly; `test_server.py` pins them to Authlib's.
        self.method = req.method
        self.uri = req.issuer + req.path
        self.headers = req.headers
        self._body = None
        # Set by Authlib's grants as they run (typed as Authlib leaves them).
        self.client: Any = None
        self.auth_method: Any = None
        self.user: Any = None
        self.authorization_code: Any = None
        self.refresh_token: Any = None
        self.credential: Any = None
        self._scope: Any = None
        self.as_request = req
        self.payload = _Payload(req)
        self.dpop_jkt: str | None = None
        self.dpop_jti: str | None = None
        self.cert_x5t: str | None = None
        self.login: LoginState | None = None
        self.resources: list[str] = []

    @property
    def args(self) -> dict[str, str]:
        return {k: vs[0] for k, vs in self.as_request.query.items()}

    @property
    def form(self) -> dict[str, str]:
        return {k: vs[0] for k, vs in self.as_request.form.items()}


class _JsonPayload(JsonPayload):  # type: ignore[misc]
    def __init__(self, req: AsRequest) -> None:
        self._req = req

    @property
    def data(self) -> Any:
        return self._req.json()


TokenSaver = Callable[[dict[str, Any], OAuthRequest], None]
Signal = Callable[..., None]


class AuthorizationServer(_AuthlibServer):  # type: ignore[misc]
    """The Authlib server over our client directory.

    `token_savers` run on every issued token (e.g. to store a refresh token's family);
    `signals` get Authlib's named signals (``after_authenticate_client``, ...).
    """

    def __init__(self, clients: ClientDirectory, scopes_supported: list[str] | None = None) -> None:
        super().__init__(scopes_supported=scopes_supported)
        self.clients = clients
        self.token_savers: list[TokenSaver] = []
        self.signals: dict[str, list[Signal]] = {}

    def query_client(self, client_id: str) -> Client | None:
        if not isinstance(client_id, str) or len(client_id) > 128:
            return None
        return self.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuthRequest) -> None:
        for save in self.token_savers:
            save(token, request)

    def create_oauth2_request(self, request: AsRequest | OAuthRequest) -> OAuthRequest:
        return request if isinstance(request, OAuthRequest) else OAuthRequest(request)

    def create_json_request(self, request: AsRequest) -> JsonRequest:
        jr = JsonRequest(request.method, request.url, request.headers)
        jr.payload = _JsonPayload(request)
        return jr

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> AsResponse:
        # orjson: compact like json.dumps(separators=(",", ":")), ~10x faster on this
        # per-request path (token and introspection answers).
        data = body if isinstance(body, bytes) else orjson.dumps(body)
        hs = [(k, v) for k, v in headers]
        if isinstance(body, dict) and not any(k.lower() == "content-type" for k, _ in hs):
            hs.append(("content-type", "application/json"))
        reason = f"oauth.{body['error']}" if isinstance(body, dict) and "error" in body else "ok"
        return AsResponse(status, data, hs, decision="deny" if status >= 400 else "allow", reason=reason)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        for fn in self.signals.get(name, ()):
            fn(*args, **kwargs)

    def get_error_uri(self, request: Any, error: Any) -> None:
        return None
