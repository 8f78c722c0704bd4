"""Forward-auth: Portcullis as the policy decision point of another proxy.

A separate listener (never the public port) answers "may this request pass?" for nginx
``auth_request``, Traefik ``ForwardAuth``, Caddy ``forward_auth`` and Envoy ``ext_authz``
(HTTP service). Each convention describes the *original* request differently:

==========  ================================  ===================================================
endpoint    original method / URI / host      notes
==========  ================================  ===================================================
/nginx      X-Original-Method / -URI / -Host  method defaults to the subrequest's, host to Host
/traefik    X-Forwarded-Method / -Uri / -Host  host defaults to Host
/caddy      X-Forwarded-Method / -Uri / -Host  host defaults to Host
<prefix>/…  the request's own method, its     Envoy appends the original path to `path_prefix`
            path after the prefix, Host
==========  ================================  ===================================================

All conventions: scheme from ``X-Forwarded-Proto``; client address from ``X-Real-IP`` or
else ``X-Forwarded-For`` (walked through the trusted callers and proxies), else the caller.
`ForwardAuthStage` rebuilds the original request from them, strips every forwarding and
``X-Portcullis-*`` header (so a client cannot smuggle them through the proxy), and refuses
ambiguous input with 400. The gateway's own normalize → route → authenticate → [signature]
→ authorize → limit stage *objects* then decide, and `DecideStage` answers 200 with the
`Principal` as headers instead of proxying. A denial is the gateway's own problem (status,
``WWW-Authenticate``, ``Retry-After``) — except that nginx understands only 2xx/401/403
from an auth subrequest, so there every denial other than 401 becomes 403 and the real
status and problem travel in ``X-Portcullis-Status`` / ``X-Portcullis-Problem`` for the
``error_page`` handler of examples/nginx/forward-auth.conf to restore.

The decision never sees the request body: a route that needs a signature over a body
(RFC 9421 with Content-Digest) is refused with 403 ``forward_auth.signature_needs_body``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.app import GatewayApp
from portcullis.audit.writer import AuditWriter
from portcullis.exchange import Exchange, Headers, Principal, Send, UpstreamResponse
from portcullis.netutil import TrustedProxies, parse_hop, parse_network
from portcullis.pipeline import CompletionStage, Pipeline, Stage
from portcullis.problems import Problem
from portcullis.stages.normalize import HEADERS_TOO_LARGE, NormalizeConfig
from portcullis.stages.record import RecordStage

if TYPE_CHECKING:
    from portcullis.stages.signature import SignaturesConfig

Convention = Literal["nginx", "traefik", "caddy", "envoy"]
CONVENTIONS: tuple[Convention, ...] = ("nginx", "traefik", "caddy", "envoy")
#: The audit fact (`AuditEvent.extra`) naming the convention of a forward-auth decision.
FACT = "forward_auth"
#: The main gateway's stages a decision runs, by name, in the main pipeline's order.
DECIDING_STAGES = ("normalize", "route", "authenticate", "signature", "authorize", "policy", "limit")
#: Principal header suffixes, in the order they are sent.
PRINCIPAL_FIELDS = ("Subject", "Tenant", "Client-Id", "Scopes", "Roles", "Credential-Kind", "Request-Id")
#: Bounds on one principal header value (after percent-encoding): identifiers, then lists.
MAX_ID_BYTES = 1024
MAX_LIST_BYTES = 4096
#: Bound on one forwarding header value other than the URI (method, host, proto, address).
MAX_FIELD_BYTES = 1024
# Requests that usually carry a body: a signature over them cannot be checked without it.
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_PREFIX = re.compile(r"[A-Za-z0-9-]{1,64}")
_PATH_PREFIX = re.compile(r"(?:/[A-Za-z0-9._~-]+)+")
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# Visible ASCII without '#': a request-target never carries a fragment (RFC 9112 §3.2).
_URI_CHARS = re.compile(rb"[\x21\x22\x24-\x7e]+")
_HEADER_SAFE = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"%"}

# The original request's method, URI and host as each convention states them.
_NGINX = (b"x-original-method", b"x-original-uri", b"x-original-host")
_FORWARDED = (b"x-forwarded-method", b"x-forwarded-uri", b"x-forwarded-host")
# Said once or not at all: two lines mean a proxy appended where it should have overwritten.
_SINGLE = frozenset({*_NGINX, *_FORWARDED, b"x-forwarded-proto", b"x-real-ip", b"host"})
# Never shown to the deciding stages: the caller's statements about the original request.
_STRIPPED = frozenset({*_SINGLE, b"x-forwarded-for", b"x-forwarded-port", b"x-forwarded-prefix",
                       b"x-forwarded-server", b"x-forwarded-ssl", b"forwarded", b"content-length",
                       b"transfer-encoding"})


class ForwardAuthListen(BaseModel):
    """Where the decision listener binds: loopback by default; never the public port."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=9181, ge=0, le=65535)


class ForwardAuthConfig(BaseModel):
    """`forward_auth:` the decision listener for nginx, Traefik, Caddy and Envoy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    listen: ForwardAuthListen = ForwardAuthListen()
    #: CIDRs (or addresses) of the proxies allowed to ask; anyone else gets 403 (audited).
    trusted_callers: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"], min_length=1)
    #: Prefix of the principal headers of an allow answer (X-Portcullis-Subject, ...).
    principal_headers: str = "X-Portcullis-"
    conventions: list[Convention] = Field(default_factory=lambda: list(CONVENTIONS), min_length=1)
    #: Envoy ext_authz `http_service.path_prefix`: the original path follows it.
    envoy_path_prefix: str = "/envoy"

    @field_validator("trusted_callers")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            parse_network(n)  # ValueError naming `n`
        return v

    @field_validator("principal_headers")
    @classmethod
    def _prefix(cls, v: str) -> str:
        if not _PREFIX.fullmatch(v):
            raise ValueError(f"{v!r}: 1-64 letters, digits or '-' (a header name prefix)")
        return v

    @field_validator("conventions")
    @classmethod
    def _unique(cls, v: list[Convention]) -> list[Convention]:
        if len(set(v)) != len(v):
            raise ValueError("a convention is listed twice")
        return v

    @model_validator(mode="after")
    def _envoy_prefix(self) -> ForwardAuthConfig:
        p = self.envoy_path_prefix
        if not _PATH_PREFIX.fullmatch(p):
            raise ValueError(f"envoy_path_prefix {p!r}: '/' then path segments of letters, digits, '.', '_', '~', '-'")
        if p in ("/nginx", "/traefik", "/caddy"):
            raise ValueError(f"envoy_path_prefix {p!r} is another convention's endpoint")
        return self


@dataclass(slots=True, frozen=True)
class Original:
    """The request a proxy asks about, as rebuilt from its convention's headers."""

    method: str
    raw_path: bytes
    query: bytes
    host: bytes
    scheme: str
    client_ip: str


def _bad(reason: str, detail: str) -> Problem:
    return Problem(400, "bad-request", reason, detail)


def reconstruct(convention: Convention, method: str, raw_path: bytes, query: bytes, headers: Headers, *,
                peer: str, proxies: TrustedProxies, envoy_prefix: bytes = b"/envoy") -> Original | Problem:
    """The original request described by a decision request of `convention`, or a 400 problem.

    `method`, `raw_path`, `query` and `headers` are the decision request's own; `peer` is the
    caller (already trusted); `proxies` the networks whose ``X-Forwarded-For`` entries are
    skipped when looking for the client. Refused: a forwarding field given twice, or longer
    than its bound; a missing URI (or, for Traefik/Caddy, method); the other convention's
    field stating a different method, URI or host; a URI that is not origin-form or
    absolute-form naming the same host; a bad scheme or client address.
    """
    fields: dict[bytes, bytes] = {}
    xff: list[bytes] = []
    for name, value in headers:
        if name == b"x-forwarded-for":
            xff.append(value)
        elif name in _SINGLE:
            if name in fields:
                return _bad("forward_auth.duplicate_field", f"The {name.decode()} header appears more than once.")
            if len(value) > (16384 if name in (b"x-original-uri", b"x-forwarded-uri") else MAX_FIELD_BYTES):
                return _bad("forward_auth.field_too_long", f"The {name.decode()} header is too long.")
            fields[name] = value
    stated: tuple[bytes | None, bytes | None, bytes | None]
    others: tuple[tuple[bytes, bytes, bytes], ...]
    if convention == "nginx":
        stated = (fields.get(b"x-original-method") or method.encode("latin-1"), fields.get(b"x-original-uri"),
                  fields.get(b"x-original-host") or fields.get(b"host"))
        others = (_FORWARDED,)
    elif convention == "envoy":
        path = raw_path[len(envoy_prefix):]
        stated = (method.encode("latin-1"), path + b"?" + query if query else path, fields.get(b"host"))
        others = (_NGINX, _FORWARDED)
    else:
        stated = (fields.get(b"x-forwarded-method"), fields.get(b"x-forwarded-uri"),
                  fields.get(b"x-forwarded-host") or fields.get(b"host"))
        others = (_NGINX,)
        if stated[0] is None:
            return _bad("forward_auth.missing_method", "X-Forwarded-Method is missing.")
    o_method, uri, host = stated
    if not uri:
        return _bad("forward_auth.missing_uri", "The original request URI is missing.")
    if not host:
        return _bad("forward_auth.missing_host", "The original request host is missing.")
    assert o_method is not None
    # Two conventions at once must agree: otherwise which one would the proxy have acted on?
    for names in others:
        for name, value, what in zip(names, (o_method, uri, host.lower()), ("method", "URI", "host"), strict=True):
            claim = fields.get(name)
            if claim is not None and (claim.lower() if what == "host" else claim) != value:
                return _bad("forward_auth.ambiguous", f"The original {what} is stated twice, differently.")
    lowered = uri[:8].lower()
    if lowered.startswith((b"http://", b"https://")):
        # RFC 9112 §3.2.2 absolute-form: accepted only when it names the same host.
        authority, slash, rest = uri.partition(b"://")[2].partition(b"/")
        if authority.lower() != host.lower():
            return _bad("forward_auth.host_mismatch", "The original URI names another host.")
        uri = slash + rest if slash else b"/"
    if not uri.startswith(b"/") or not _URI_CHARS.fullmatch(uri):
        return _bad("forward_auth.bad_uri", "The original URI is not a valid origin-form request target.")
    o_path, _, o_query = uri.partition(b"?")
    proto = fields.get(b"x-forwarded-proto", b"http").lower()
    if proto not in (b"http", b"https"):
        return _bad("forward_auth.bad_proto", "X-Forwarded-Proto must be http or https.")
    real = fields.get(b"x-real-ip")
    if real is not None:
        client = parse_hop(real)
        if client is None:
            return _bad("forward_auth.bad_client_ip", "X-Real-IP is not an IP address.")
    else:
        client = proxies.client_ip(peer, xff) if xff else peer
    return Original(o_method.decode("latin-1"), o_path, o_query, host, proto.decode(), client)


class ForwardAuthStage:
    """The front of the decision pipeline: checks the caller, rebuilds the original request.

    On success `ex` describes the original request (method, raw path, query, headers with one
    ``host`` and none of the forwarding fields, client address, scope scheme) and
    ``ex.facts["forward_auth"]`` names the convention; the decision request's own method
    stays in ``ex.scope["method"]``.
    """

    name: ClassVar[str] = "forward_auth"

    def __init__(self, cfg: ForwardAuthConfig, normalize: NormalizeConfig,
                 request_id_header: bytes = b"x-request-id") -> None:
        self._callers = TrustedProxies(cfg.trusted_callers)
        self._proxies = TrustedProxies([*cfg.trusted_callers, *normalize.trusted_proxies])
        self._endpoints: dict[bytes, Convention] = {
            f"/{c}".encode(): c for c in cfg.conventions if c != "envoy"}
        self._envoy = cfg.envoy_path_prefix.encode() if "envoy" in cfg.conventions else None
        self._strip_prefix = cfg.principal_headers.lower().encode()
        self._rid = request_id_header
        # Room for the forwarding fields on top of the gateway's own header bounds (431 beyond).
        self._max_count = normalize.max_header_count + 16
        self._max_bytes = normalize.max_header_bytes + 2 * normalize.max_url_bytes + 16 * MAX_FIELD_BYTES

    def convention(self, raw_path: bytes) -> Convention | None:
        """Which convention the decision request's path selects, if an enabled one."""
        found = self._endpoints.get(raw_path)
        if found is None and self._envoy is not None and raw_path.startswith(self._envoy + b"/"):
            found = "envoy"
        return found

    async def on_request(self, ex: Exchange) -> Problem | None:
        convention = self.convention(ex.raw_path)
        ex.facts[FACT] = convention or "unknown"
        if not self._callers.is_trusted(ex.client_ip):
            return Problem(403, "forbidden", "forward_auth.untrusted_caller",
                           "This endpoint answers only the configured proxies.")
        if convention is None:
            return Problem(404, "not-found", "forward_auth.unknown_endpoint", "No decision endpoint here.")
        if len(ex.headers) > self._max_count or sum(len(k) + len(v) for k, v in ex.headers) > self._max_bytes:
            return HEADERS_TOO_LARGE.to_problem()
        original = reconstruct(convention, ex.method, ex.raw_path, ex.query, ex.headers,
                               peer=ex.client_ip, proxies=self._proxies, envoy_prefix=self._envoy or b"")
        if isinstance(original, Problem):
            return original
        ids = [v for k, v in ex.headers if k == self._rid]
        if len(ids) == 1 and _REQUEST_ID.fullmatch(ids[0]):
            ex.request_id = ids[0].decode("ascii")  # the proxy's id: one id in both logs
        strip = self._strip_prefix
        headers = [(k, v) for k, v in ex.headers
                   if k not in _STRIPPED and k != self._rid and not k.startswith(strip)]
        headers.append((b"host", original.host))
        ex.method, ex.raw_path, ex.query = original.method, original.raw_path, original.query
        ex.headers = headers
        ex.client_ip = original.client_ip
        ex.scope = {**ex.scope, "scheme": original.scheme, "headers": headers}
        return None


class SignatureGate:
    """Runs the gateway's signature stage where a decision without the body can be sound.

    A request must be signed when its route says so or its credential is bound to a key
    (the signature stage's rule). Such a request that may carry a body (POST, PUT, PATCH,
    or any with ``Content-Digest``) is refused: the digest cannot be checked here.
    Only ``on_request`` is delegated, so the decision answer itself is never signed.
    """

    name: ClassVar[str] = "signature"

    def __init__(self, stage: Stage, signatures: SignaturesConfig | None) -> None:
        self._stage = stage
        self._clients = dict(signatures.clients) if signatures is not None else {}

    async def on_request(self, ex: Exchange) -> Problem | None:
        route = ex.route
        if route is None:
            return None
        p = ex.principal
        bound = p is not None and (p.signing_key_id is not None or (
            p.credential_kind != "api_key" and p.client_id is not None and p.client_id in self._clients))
        if not route.config.require_signature and not bound:
            return None
        if ex.method in _BODY_METHODS or ex.header(b"content-digest") is not None:
            return Problem(403, "forbidden", "forward_auth.signature_needs_body",
                           "This request must be signed over its body, which the decision endpoint "
                           "cannot see; send it through the gateway.")
        return await self._stage.on_request(ex)


def header_value(text: str, limit: int) -> bytes | None:
    """`text` as a safe header value: '%', controls and non-ASCII percent-encoded (UTF-8),
    so no CR/LF can split it; None when longer than `limit` bytes (never truncated)."""
    # For ASCII text, isprintable() is exactly 0x20-0x7E: _HEADER_SAFE plus "%" (a C scan,
    # not a Python loop over the characters).
    if text.isascii() and text.isprintable() and "%" not in text:
        out = text
    else:
        out = "".join(c if c in _HEADER_SAFE else "".join(f"%{b:02X}" for b in c.encode("utf-8"))
                      for c in text)
    return out.encode("ascii") if len(out) <= limit else None


def principal_headers(prefix: str, p: Principal | None, request_id: str) -> Headers | None:
    """The allow answer's identity headers, every one present (empty when unknown) so that
    proxies that copy them replace whatever a client sent; None if a value is too long."""
    values = (
        (p.subject, MAX_ID_BYTES), (p.tenant, MAX_ID_BYTES), (p.client_id or "", MAX_ID_BYTES),
        (" ".join(sorted(p.scopes)), MAX_LIST_BYTES), (" ".join(sorted(p.roles)), MAX_LIST_BYTES),
        (p.credential_kind, MAX_ID_BYTES),
    ) if p is not None else (("", 1),) * 6
    out: Headers = []
    for name, (text, limit) in zip(_header_names(prefix), (*values, (request_id, MAX_ID_BYTES)), strict=True):
        encoded = header_value(text, limit)
        if encoded is None:
            return None
        out.append((name, encoded))
    return out


@functools.lru_cache(maxsize=8)
def _header_names(prefix: str) -> tuple[bytes, ...]:
    """The identity headers' names under `prefix` (one prefix per listener)."""
    return tuple((prefix + field).lower().encode() for field in PRINCIPAL_FIELDS)


class DecideStage:
    """The terminal stage: the request may pass; answer 200 with the principal as headers."""

    name: ClassVar[str] = "decide"

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix

    async def on_request(self, ex: Exchange) -> Problem | None:
        if ex.facts.get("policy_deferred"):
            # The route's owner comes from the upstream's answer (a `header` owner source),
            # which a decision made before the proxy forwards the request can never see:
            # refuse rather than allow an object-level check that cannot be made.
            return Problem(403, "forbidden", "forward_auth.owner_needs_response",
                           "This request cannot be authorized before the upstream answers.")
        headers = principal_headers(self._prefix, ex.principal, ex.request_id)
        if headers is None:  # fail closed: an identity we cannot state is not passed on
            return Problem(500, "internal-error", "forward_auth.principal_too_large",
                           "The decision could not be expressed as headers.")
        headers += [(b"content-length", b"0"), (b"cache-control", b"no-store")]
        ex.upstream = UpstreamResponse(200, headers, None, content_length=0)
        return None


class DecisionApp(GatewayApp):
    """The decision listener's ASGI app: the gateway's app with a terminal decision stage.

    Denials are the gateway's problems; for nginx (which acts only on 2xx, 401 and 403 from
    an auth subrequest) any other status is sent as 403, and every denial adds
    ``<prefix>Status`` and ``<prefix>Problem`` (the problem JSON) for `error_page` handlers.
    """

    def __init__(self, pipeline: Pipeline, prefix: str, request_id_header: bytes = b"x-request-id") -> None:
        super().__init__(pipeline, request_id_header)
        self._status_header = (prefix + "Status").lower().encode()
        self._problem_header = (prefix + "Problem").lower().encode()

    async def _send_problem(self, ex: Exchange, problem: Problem, send: Send) -> None:
        body = problem.body(ex.request_id)
        nginx = ex.facts.get(FACT) == "nginx"
        # The problem's own `ex.method` may be HEAD while the decision request is a GET.
        head = ex.scope.get("method") == "HEAD"

        async def relay(msg: dict[str, object]) -> None:
            if msg["type"] == "http.response.start" and nginx:
                headers = cast(Headers, msg["headers"])
                msg = {**msg, "status": 401 if problem.status == 401 else 403,
                       "headers": [*headers, (self._status_header, str(problem.status).encode()),
                                   (self._problem_header, body)]}
            elif msg["type"] == "http.response.body":
                msg = {**msg, "body": b"" if head else body}
            await send(msg)

        await super()._send_problem(ex, problem, relay)


def build_decision_app(cfg: ForwardAuthConfig, stages: Sequence[Stage], completions: Sequence[CompletionStage], *,
                       writer: AuditWriter, normalize: NormalizeConfig, signatures: SignaturesConfig | None,
                       request_id_header: bytes = b"x-request-id") -> DecisionApp:
    """The decision app over the main pipeline's own stage objects (`stages`, by name; see
    `DECIDING_STAGES`) and its completions; its own record stage (same writer) audits each decision
    with ``extra["forward_auth"]`` naming the convention."""
    by_name = {s.name: s for s in stages}
    record = RecordStage(writer)
    chain: list[Stage] = [record, ForwardAuthStage(cfg, normalize, request_id_header)]
    for name in DECIDING_STAGES:
        stage = by_name.get(name)
        if stage is not None:
            chain.append(SignatureGate(stage, signatures) if name == "signature" else stage)
    chain.append(DecideStage(cfg.principal_headers))
    done: list[CompletionStage] = [record, *(c for c in completions if c.name != "record")]
    return DecisionApp(Pipeline(chain, done), cfg.principal_headers, request_id_header)
