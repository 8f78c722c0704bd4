"""A minimal OpenID Connect issuer for tests: discovery and JWKS over real HTTP, and a
helper to mint tokens with its key (the gateway never sees the private key)."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class IssuerApp:
    """Serves `/.well-known/openid-configuration` and `/jwks` for `issuer` (set after start)."""

    def __init__(self) -> None:
        self.issuer = ""
        self.key = ECKey.generate_key("P-256", parameters={"kid": "test-ec"})

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/.well-known/openid-configuration":
            doc: dict[str, Any] = {"issuer": self.issuer, "jwks_uri": self.issuer + "/jwks"}
        elif scope["path"] == "/jwks":
            doc = {"keys": [self.key.as_dict(private=False)]}
        else:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        body = json.dumps(doc).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    def mint(self, audience: str, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {"iss": self.issuer, "aud": audience, "sub": "user-1", "tenant": "acme",
                                "scope": "projects:read", "iat": now, "exp": now + 300, "jti": f"j{time.time_ns()}"}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jose_jwt.encode({"alg": "ES256", "kid": "test-ec", "typ": "at+jwt"}, body, self.key,
                               algorithms=["ES256"])
