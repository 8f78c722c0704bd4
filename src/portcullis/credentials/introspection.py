"""Opaque access tokens, checked by OAuth 2.0 Token Introspection (RFC 7662).

A Bearer value that is neither an API key nor a JWT is sent to the configured
introspection endpoint (§2.1: POST, form-encoded ``token`` and ``token_type_hint``,
the gateway authenticating as a client with HTTP Basic, RFC 6749 §2.3.1). Only a
response with ``"active": true`` (§2.2, the JSON boolean) admits the token, and then
only if ``exp``, ``iss`` and ``aud`` pass the same checks as for JWTs. Answers are
cached by the SHA-256 of the token — active ones until ``exp`` and at most
`cache_seconds`, inactive ones briefly (§4 allows caching; it also shields the
authorization server from floods of bad tokens). An unreachable or broken endpoint
fails closed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from portcullis.credentials.jwt import (
    JwtRefusal,
    audiences,
    confirmation,
    scopes_and_roles,
    str_claim,
    str_list_claim,
    subject_and_tenant,
)
from portcullis.exchange import Principal
from portcullis.upstream_client import Pool, PoolConfig, UpstreamError

MAX_RESPONSE_BYTES = 64 * 1024
MAX_OPAQUE_TOKEN_BYTES = 4096


class IntrospectionConfig(BaseModel):
    """The introspection endpoint and how the gateway authenticates to it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint: str
    client_id: str = Field(min_length=1, max_length=256)
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    issuer: str | None = None
    audience: str | None = None
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    cache_seconds: float = Field(default=60, ge=0, le=3600)
    negative_cache_seconds: float = Field(default=5, ge=0, le=300)
    cache_size: int = Field(default=100_000, ge=0, le=10_000_000)
    timeout_seconds: float = Field(default=2.0, gt=0, le=30)

    @model_validator(mode="after")
    def _check(self) -> IntrospectionConfig:
        try:
            u = urlsplit(self.endpoint)
            u.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("endpoint is not a valid URL") from None
        if not u.hostname or u.username or u.password:
            raise ValueError("endpoint needs a host (and no credentials in the URL)")
        loopback = u.hostname in ("127.0.0.1", "localhost", "::1")
        if u.scheme != "https" and not (u.scheme == "http" and loopback):
            raise ValueError("endpoint must be https (plain http only on loopback)")
        if (self.client_secret_env is None) == (self.client_secret_file is None):
            raise ValueError("give exactly one of client_secret_env or client_secret_file "
                             "(secrets do not belong in the config file)")
        return self

    def secret(self) -> str:
        """The client secret, read when the gateway starts; ValueError if absent."""
        if self.client_secret_env is not None:
            value = os.environ.get(self.client_secret_env, "")
            if not value:
                raise ValueError(f"environment variable {self.client_secret_env} is not set")
            return value
        assert self.client_secret_file is not None
        with open(self.client_secret_file, encoding="utf-8") as f:
            value = f.read().strip()
        if not value:
            raise ValueError(f"{self.client_secret_file} is empty")
        return value


@dataclass(slots=True)
class _Entry:
    principal: Principal | None  # None: inactive
    until: float


class Introspector:
    """Introspects opaque tokens; `open()` inside the event loop before use."""

    def __init__(self, cfg: IntrospectionConfig, clock: Callable[[], float] = time.time) -> None:
        self.cfg = cfg
        self._clock = clock
        u = urlsplit(cfg.endpoint)
        assert u.hostname is not None
        self._target = (u.path or "/").encode() + (b"?" + u.query.encode() if u.query else b"")
        self._host = u.netloc.encode()
        self._pool_cfg = PoolConfig(u.hostname, u.port or (443 if u.scheme == "https" else 80),
                                    ssl.create_default_context() if u.scheme == "https" else None,
                                    32, 30.0, cfg.timeout_seconds)
        self._pool: Pool | None = None
        self._auth = b""
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self.calls = 0

    def open(self) -> None:
        # RFC 6749 §2.3.1: client id and secret are form-urlencoded before Basic encoding.
        creds = f"{quote(self.cfg.client_id, safe='')}:{quote(self.cfg.secret(), safe='')}"
        self._auth = b"Basic " + base64.b64encode(creds.encode())
        self._pool = Pool(self._pool_cfg)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def verify(self, token: bytes) -> Principal:
        """The token's Principal; `JwtRefusal` (reasons ``introspection.*``) otherwise."""
        if len(token) > MAX_OPAQUE_TOKEN_BYTES or not token.isascii() or not token.strip():
            raise JwtRefusal("introspection.malformed")
        digest = hashlib.sha256(token).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and now < hit.until:
            if hit.principal is None:
                raise JwtRefusal("introspection.inactive")
            return hit.principal
        doc = await self._ask(token)
        try:
            principal, until = self._judge(doc, digest, now)
        except JwtRefusal as refusal:
            if refusal.reason == "introspection.inactive":
                self._remember(digest, None, now + self.cfg.negative_cache_seconds)
            raise
        self._remember(digest, principal, until)
        return principal

    def _remember(self, digest: bytes, principal: Principal | None, until: float) -> None:
        if not self.cfg.cache_size:
            return
        self._cache[digest] = _Entry(principal, until)
        self._cache.move_to_end(digest)
        if len(self._cache) > self.cfg.cache_size:
            self._cache.popitem(last=False)

    async def _ask(self, token: bytes) -> dict[str, Any]:
        assert self._pool is not None, "Introspector.open() was not called"
        self.calls += 1
        form = b"token=" + quote(token.decode("ascii"), safe="").encode() + b"&token_type_hint=access_token"
        headers = [(b"host", self._host), (b"authorization", self._auth),
                   (b"content-type", b"application/x-www-form-urlencoded"), (b"accept", b"application/json")]
        try:
            resp = await self._pool.request("POST", self._target, headers, form,
                                            read_timeout=self.cfg.timeout_seconds,
                                            total_timeout=self.cfg.timeout_seconds)
            body = await resp.read(MAX_RESPONSE_BYTES)
        except UpstreamError:
            raise JwtRefusal("introspection.unavailable", "Access tokens cannot be verified right now.") from None
        if body is None or resp.status != 200:  # too large, or not an answer
            raise JwtRefusal("introspection.unavailable", "Access tokens cannot be verified right now.")
        try:
            doc = json.loads(body)
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            raise JwtRefusal("introspection.unavailable", "Access tokens cannot be verified right now.")
        return doc

    def _judge(self, doc: dict[str, Any], digest: bytes, now: float) -> tuple[Principal, float]:
        cfg = self.cfg
        if doc.get("active") is not True:  # §2.2: exactly the boolean true
            raise JwtRefusal("introspection.inactive")
        exp = doc.get("exp")
        if exp is not None:
            if not isinstance(exp, (int, float)) or isinstance(exp, bool):
                raise JwtRefusal("introspection.malformed")
            if now >= float(exp) + cfg.leeway_seconds:
                raise JwtRefusal("introspection.expired", "The access token has expired.")
        if cfg.issuer is not None and doc.get("iss") != cfg.issuer:
            raise JwtRefusal("introspection.wrong_issuer")
        if cfg.audience is not None and cfg.audience not in audiences(doc.get("aud")):
            raise JwtRefusal("introspection.bad_audience")
        jkt, x5t = confirmation(doc.get("cnf"), "introspection")
        sub, tenant = subject_and_tenant(doc, cfg.tenant_claim, "introspection")
        scopes, roles = scopes_and_roles(doc, cfg.roles_claim)
        client = doc.get("client_id")
        jti = doc.get("jti")
        principal = Principal(
            subject=sub, tenant=tenant,
            credential_id=jti if isinstance(jti, str) and len(jti) <= 128 else "sha256:" + digest[:12].hex(),
            credential_kind="opaque", scopes=scopes, roles=roles,
            client_id=client if isinstance(client, str) else None, cnf_jkt=jkt, cnf_x5t=x5t,
            audiences=audiences(doc.get("aud")), acr=str_claim(doc.get("acr")), amr=str_list_claim(doc.get("amr")),
            limit_key=f"opaque:{client if isinstance(client, str) else 'sub:' + sub}",
        )
        until = now + cfg.cache_seconds
        if isinstance(exp, (int, float)):
            until = min(until, float(exp) + cfg.leeway_seconds)
        return principal, until
