"""The authorization server's HTTP surface: a small request/response pair and the
pipeline stage that answers the server's paths on the gateway's own origin.

The stage runs after normalize (so its paths are canonical and its requests audited
like every other) and before route: a request for `/oauth2/...`, `/account/...` or the
discovery documents never reaches an upstream. Handlers are plain async functions
`AsRequest -> AsResponse`; the stage turns the response into an `UpstreamResponse`
so the app sends and records it like a proxied one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlencode

from portcullis.exchange import Exchange, Principal, UpstreamResponse
from portcullis.netutil import TrustedProxies
from portcullis.problems import Problem
from portcullis.stages.authenticate import client_certificate

log = logging.getLogger("portcullis.oauth")

#: Bodies the authorization server accepts are forms and small JSON documents.
MAX_FORM_BYTES = 64 * 1024
#: At most this many form/query fields: bounds the parser (DESIGN.md security rules).
MAX_FIELDS = 64

FORM = "application/x-www-form-urlencoded"


class BadRequest(Exception):
    """The request cannot be parsed; `str(self)` is client-safe."""


@dataclass(slots=True)
class AsRequest:
    """One request to the authorization server, parsed and bounded.

    `query` and `form` keep repeated parameters (OAuth refuses most repeats, RFC 6749
    §3.1); `headers` are lower-cased names to the first value. `client_cert_der` is the
    verified TLS client certificate (direct TLS, or from a trusted proxy's header).
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    client_ip: str
    scheme: str
    host: str
    issuer: str
    request_id: str
    client_cert_der: bytes | None = None
    cookies: dict[str, str] = field(default_factory=dict)
    # Header names sent more than once (`headers` keeps the first): a protocol that allows
    # exactly one (e.g. `DPoP`, RFC 9449 §4.3 point 1) refuses these.
    repeated_headers: frozenset[str] = frozenset()
    # Facts the handler wants in the audit event (client_id, username, reason, ...).
    audit: dict[str, Any] = field(default_factory=dict)
    _form: dict[str, list[str]] | None = None

    @property
    def url(self) -> str:
        q = urlencode([(k, v) for k, vs in self.query.items() for v in vs])
        return f"{self.issuer}{self.path}" + (f"?{q}" if q else "")

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    @property
    def form(self) -> dict[str, list[str]]:
        """The url-encoded body (empty for other content types); raises BadRequest."""
        if self._form is None:
            self._form = parse_params(self.body.decode("utf-8", "strict")) if self.content_type == FORM else {}
        return self._form

    def param(self, name: str, source: str = "form") -> str | None:
        """A single-valued parameter; a repeated one raises BadRequest (RFC 6749 §3.1)."""
        values = (self.form if source == "form" else self.query).get(name)
        if not values:
            return None
        if len(values) > 1:
            raise BadRequest(f"parameter {name} is repeated")
        return values[0]

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("the body is not JSON") from exc


def parse_params(text: str) -> dict[str, list[str]]:
    """Parse `a=b&c=d` strictly and with bounds; raises BadRequest."""
    if not text:
        return {}
    try:
        pairs = parse_qs(text, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS,
                         errors="strict")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest("the parameters are malformed") from exc
    return pairs


@dataclass(slots=True)
class AsResponse:
    """What a handler answers. Headers are str pairs; `Cache-Control: no-store` is
    added unless the handler set its own (token responses must not be cached, RFC 6749 §5.1)."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    # Audit decision and reason for this answer.
    decision: str = "allow"
    reason: str = "ok"
    principal: Principal | None = None


def json_response(doc: Any, status: int = 200, headers: list[tuple[str, str]] | None = None,
                  *, reason: str = "ok") -> AsResponse:
    body = json.dumps(doc, separators=(",", ":")).encode()
    return AsResponse(status, body, [("content-type", "application/json"), *(headers or [])],
                      decision="allow" if status < 400 else "deny", reason=reason)


def oauth_error(error: str, description: str, status: int = 400, *, reason: str | None = None,
                headers: list[tuple[str, str]] | None = None) -> AsResponse:
    """An RFC 6749 §5.2 error response. `description` is client-safe; `reason` (the audit
    code) defaults to ``oauth.<error>``."""
    return json_response({"error": error, "error_description": description}, status, headers,
                         reason=reason or f"oauth.{error}")


def html_response(html: str, status: int = 200, headers: list[tuple[str, str]] | None = None,
                  *, reason: str = "ok") -> AsResponse:
    """A page. The CSP forbids every external asset and framing (clickjacking)."""
    return AsResponse(status, html.encode(), [
        ("content-type", "text/html; charset=utf-8"),
        ("content-security-policy",
         "default-src 'none'; style-src 'self' 'unsafe-inline'; script-src 'self'; img-src 'self' data:; "
         "form-action 'self' http: https:; frame-ancestors 'none'; base-uri 'none'"),
        ("x-frame-options", "DENY"),
        # same-origin, not no-referrer: with no-referrer browsers send `Origin: null` on
        # form posts, which would weaken the CSRF origin check; cross-origin gets nothing.
        ("referrer-policy", "same-origin"),
        ("x-content-type-options", "nosniff"),
        *(headers or []),
    ], decision="allow" if status < 400 else "deny", reason=reason)


def redirect(location: str, headers: list[tuple[str, str]] | None = None, *, status: int = 303,
             reason: str = "ok") -> AsResponse:
    return AsResponse(status, b"", [("location", location), *(headers or [])], reason=reason)


Handler = Callable[[AsRequest], Awaitable[AsResponse]]


class AsRoutes:
    """Exact path -> {method -> handler}. Paths are fixed strings: no templates, so
    matching is one dict lookup and nothing a client sends is interpreted."""

    PREFIXES: ClassVar[tuple[str, ...]] = ("/oauth2/", "/account/", "/.well-known/")

    def __init__(self) -> None:
        self._table: dict[str, dict[str, Handler]] = {}

    def add(self, method: str, path: str, handler: Handler) -> None:
        if not path.startswith(self.PREFIXES):
            raise ValueError(f"authorization server path {path} outside {self.PREFIXES}")
        methods = self._table.setdefault(path, {})
        if method in methods:
            raise ValueError(f"{method} {path} registered twice")
        methods[method] = handler

    def claims(self, path: str) -> bool:
        return path in self._table

    def lookup(self, path: str) -> dict[str, Handler] | None:
        return self._table.get(path)

    @property
    def paths(self) -> list[str]:
        return sorted(self._table)


class AuthServerStage:
    """Answers the authorization server's paths; every other request passes on.

    `issuer` is the server's public base URL (no trailing slash). Errors in a handler
    become a 500 problem without internals, like every stage failure.
    """

    name: ClassVar[str] = "authserver"

    def __init__(self, routes: AsRoutes, issuer: str, trusted: TrustedProxies,
                 client_cert_header: str | None = None) -> None:
        self._routes = routes
        self._issuer = issuer.rstrip("/")
        self._trusted = trusted
        self._cert_header = client_cert_header.lower().encode() if client_cert_header else None

    async def on_request(self, ex: Exchange) -> Problem | None:
        methods = self._routes.lookup(ex.path)
        if methods is None:
            return None
        handler = methods.get(ex.method) or (methods.get("GET") if ex.method == "HEAD" else None)
        if handler is None:
            return Problem(405, "method-not-allowed", "oauth.method_not_allowed",
                           "This endpoint does not accept this method.",
                           headers=[(b"allow", ", ".join(sorted(methods)).encode())])
        body = await self._read_body(ex)
        if body is None:
            return Problem(413, "payload-too-large", "oauth.body_too_large",
                           f"Bodies here are limited to {MAX_FORM_BYTES} bytes.")
        req: AsRequest | None = None
        try:
            req = self._request(ex, body)
            resp = await handler(req)
        except BadRequest as exc:
            resp = oauth_error("invalid_request", str(exc), reason="oauth.malformed")
        ex.decision, ex.reason = resp.decision, resp.reason
        if resp.principal is not None:
            ex.principal = resp.principal
        if req is not None and req.audit:
            ex.facts["oauth"] = req.audit
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in resp.headers]
        if not any(k == b"cache-control" for k, _ in headers):
            headers.append((b"cache-control", b"no-store"))
        headers.append((b"content-length", str(len(resp.body)).encode()))
        ex.upstream = UpstreamResponse(resp.status, headers, _once(resp.body if ex.method != "HEAD" else b""),
                                       content_length=len(resp.body) if ex.method != "HEAD" else 0)
        ex.facts["terminal"] = True
        return None

    async def _read_body(self, ex: Exchange) -> bytes | None:
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await ex.receive()
            if msg["type"] != "http.request":
                break
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > MAX_FORM_BYTES:
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        ex.bytes_in = size
        return b"".join(chunks)

    def _request(self, ex: Exchange, body: bytes) -> AsRequest:
        headers: dict[str, str] = {}
        repeated: set[str] = set()
        for k, v in ex.headers:
            name = k.decode("latin-1")
            if name in headers:
                repeated.add(name)
            else:
                headers[name] = v.decode("latin-1")
        cookies: dict[str, str] = {}
        if "cookie" in headers:
            jar = SimpleCookie()
            try:
                jar.load(headers["cookie"])
            except CookieError:
                jar = SimpleCookie()
            cookies = {k: m.value for k, m in jar.items()}
        query = parse_params(ex.query.decode("latin-1")) if ex.query else {}
        return AsRequest(
            method=ex.method, path=ex.path, query=query, headers=headers, body=body,
            client_ip=ex.client_ip, scheme=str(ex.scope.get("scheme", "http")), host=ex.host,
            issuer=self._issuer, request_id=ex.request_id, client_cert_der=self._client_cert(ex),
            cookies=cookies, repeated_headers=frozenset(repeated),
        )

    def _client_cert(self, ex: Exchange) -> bytes | None:
        return client_certificate(ex, self._cert_header, self._trusted)


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body
