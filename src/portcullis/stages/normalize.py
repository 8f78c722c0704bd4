"""The normalize stage: refuse ambiguous requests before anything reads them (DESIGN.md, item 2).

A request is *ambiguous* when two honest HTTP components could read it differently: a dot
segment one of them removes, an encoded '/' one of them decodes, two framings of one body.
The gateway does not pick a reading; it refuses with 400, so the route it matched and the
resource the upstream serves are always the same thing.

`inspect_request` is the pure check; `NormalizeStage` applies it to an `Exchange` and also
establishes who is calling (client address, request id) through the configured trusted proxies.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import unquote_to_bytes

from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.exchange import Exchange, Headers
from portcullis.netutil import TrustedProxies, parse_network
from portcullis.problems import Problem

DEFAULT_METHODS: tuple[str, ...] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
USER_AGENT_MAX_CHARS = 256
# A Content-Length longer than this is beyond any body size we would accept.
_MAX_CL_DIGITS = 18

# RFC 9110 §9.1 "method = token"; §5.6.2 "tchar = "!" / "#" / "$" / "%" / "&" / "'" / "*" / "+" /
# "-" / "." / "^" / "_" / "`" / "|" / "~" / DIGIT / ALPHA".
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request id we are willing to log and echo: short, and unable to break a log line or header.
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
# RFC 9112 §3.2 "Host = uri-host [ ":" port ]"; uri-host narrowed to IP-literal or a DNS-style
# reg-name (no pct-encoded or sub-delims: no upstream name needs them, and each is a parser gap).
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~-]+)(?::[0-9]{1,5})?")
# RFC 3986 §2.1: "A percent-encoded octet is encoded as a character triplet, consisting of the
# percent character "%" followed by the two hexadecimal digits".
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PERCENT_TRIPLET = re.compile(rb"%[0-9A-Fa-f]{2}")
# C0 controls, DEL and the C1 controls (U+0080..U+009F) once decoded.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


@dataclass(slots=True, frozen=True)
class Rejection:
    """Why `inspect_request` refused. `detail` is client-safe; `reason` is the audit code."""

    status: int
    slug: str
    reason: str
    detail: str

    def to_problem(self) -> Problem:
        """The RFC 9457 problem the gateway answers with."""
        return Problem(self.status, self.slug, self.reason, self.detail)


def _bad(reason: str, detail: str) -> Rejection:
    return Rejection(400, "bad-request", reason, detail)


# One constant per refusal: the reason codes are a stable, documented vocabulary.
DOT_SEGMENT = _bad("path.dot_segment", "The path contains a '.' or '..' segment.")
ENCODED_SLASH = _bad("path.encoded_slash", "The path contains an encoded '/'.")
BACKSLASH = _bad("path.backslash", "The path contains a backslash.")
CONTROL_CHAR = _bad("path.control_char", "The path contains a control or non-ASCII character.")
BAD_PERCENT = _bad("path.bad_percent", "The path contains a malformed percent-encoding.")
DOUBLE_ENCODING = _bad("path.double_encoding", "The path is percent-encoded more than once.")
BAD_UTF8 = _bad("path.bad_utf8", "The path does not decode as UTF-8.")
EMPTY_SEGMENT = _bad("path.empty_segment", "The path contains an empty segment ('//').")
NOT_ABSOLUTE = _bad("path.not_absolute", "The path must start with '/'.")
URL_TOO_LONG = _bad("request.url_too_long", "The request URL is too long.")
METHOD_INVALID = _bad("method.invalid", "The request method is not a valid token.")
METHOD_NOT_ALLOWED = _bad("method.not_allowed", "The request method is not accepted here.")
DUPLICATE_HOST = _bad("header.duplicate_host", "The request has more than one Host header.")
MISSING_HOST = _bad("header.missing_host", "The request has no Host header.")
BAD_HOST = _bad("header.bad_host", "The Host header is not a valid host[:port].")
DUPLICATE_CONTENT_LENGTH = _bad(
    "header.duplicate_content_length", "The request has more than one Content-Length header.")
BAD_CONTENT_LENGTH = _bad("header.bad_content_length", "The Content-Length header is not a decimal number.")
CL_AND_TE = _bad("header.cl_and_te", "The request has both Content-Length and Transfer-Encoding.")
BAD_TRANSFER_ENCODING = _bad(
    "header.bad_transfer_encoding", "Transfer-Encoding must be exactly 'chunked'.")
BODY_TOO_LARGE = Rejection(
    413, "payload-too-large", "request.body_too_large", "The declared request body is too large.")
HEADERS_TOO_LARGE = Rejection(
    431, "headers-too-large", "request.headers_too_large", "The request headers are too large.")


class NormalizeConfig(BaseModel):
    """Bounds and trust settings for the normalize stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_body_bytes: int = Field(default=1_048_576, gt=0)
    #: Sum of the lengths of every header name and value.
    max_header_bytes: int = Field(default=16_384, gt=0)
    max_header_count: int = Field(default=100, gt=0)
    #: Length of the raw path plus the raw query string.
    max_url_bytes: int = Field(default=8_192, gt=0)
    allowed_methods: list[str] = Field(default_factory=lambda: list(DEFAULT_METHODS))
    #: Refuse '//' inside the path (a leading '//' is refused regardless; see `_check_path`).
    reject_empty_segments: bool = True
    #: Proxies (CIDRs or addresses) whose X-Forwarded-For and request id are believed.
    trusted_proxies: list[str] = Field(default_factory=list)
    request_id_header: str = "x-request-id"
    # A TLS-terminating proxy's header carrying the client certificate (URL-encoded PEM,
    # as nginx's $ssl_client_escaped_cert); believed only from `trusted_proxies`.
    client_cert_header: str | None = None

    @field_validator("allowed_methods")
    @classmethod
    def _methods_are_tokens(cls, methods: list[str]) -> list[str]:
        if not methods:
            raise ValueError("allowed_methods must name at least one method")
        for m in methods:
            if not _TOKEN.fullmatch(m):
                raise ValueError(f"{m!r} is not a valid HTTP method token (RFC 9110 §9.1)")
        return methods

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, networks: list[str]) -> list[str]:
        for n in networks:
            parse_network(n)  # raises ValueError naming `n`
        return networks

    @field_validator("request_id_header", "client_cert_header")
    @classmethod
    def _header_is_token(cls, name: str | None) -> str | None:
        if name is None:
            return None
        if not _TOKEN.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid header name (RFC 9110 §5.1)")
        return name.lower()  # ASGI lower-cases header names


@dataclass(slots=True)
class Accepted:
    """What `inspect_request` learnt about a request it let through.

    `path` is the percent-decoded path: it holds no '.'/'..' segment, no '\\', no control
    character, and splits on '/' exactly as the raw path does. It may contain characters that
    were encoded on the wire ('?', '#', ' ', '%'): re-encode it before putting it on a URL.
    `host` is the Host header lower-cased, port included. `content_length` is the declared
    body size (None when absent, e.g. a chunked body, whose size the body reader must bound).
    """

    path: str
    host: str
    content_length: int | None


def inspect_request(method: str, raw_path: bytes, query: bytes, headers: Headers,
                    cfg: NormalizeConfig) -> Rejection | Accepted:
    """Refuse an ambiguous or oversized request, or describe the one it accepts.

    `headers` are ASGI headers: lower-cased names, wire order, duplicates kept. Never raises,
    whatever the bytes. Bounds are checked before anything is parsed: header count and total
    size (431), URL length (400 `request.url_too_long`; we have no 414 type), then the method,
    the path (see `_check_path`) and the framing headers.
    """
    if len(headers) > cfg.max_header_count:
        return HEADERS_TOO_LARGE
    total = 0
    hosts: list[bytes] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for name, value in headers:
        total += len(name) + len(value)
        if name == b"host":
            hosts.append(value)
        elif name == b"content-length":
            lengths.append(value)
        elif name == b"transfer-encoding":
            codings.append(value)
    if total > cfg.max_header_bytes:
        return HEADERS_TOO_LARGE
    if len(raw_path) + len(query) > cfg.max_url_bytes:
        return URL_TOO_LONG

    # RFC 9110 §9.1: "The method token is case-sensitive". The allow-list holds only tokens.
    if method not in cfg.allowed_methods:
        return METHOD_NOT_ALLOWED if _TOKEN.fullmatch(method) else METHOD_INVALID

    path = _check_path(raw_path, cfg.reject_empty_segments)
    if isinstance(path, Rejection):
        return path

    # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any HTTP/1.1
    # request message that lacks a Host header field and to any request message that contains
    # more than one Host header field line or a Host header field with an invalid field value."
    if not hosts:
        return MISSING_HOST
    if len(hosts) > 1:
        return DUPLICATE_HOST
    if not _HOST.fullmatch(hosts[0]):
        return BAD_HOST

    framing = _check_framing(lengths, codings, cfg.max_body_bytes)
    if isinstance(framing, Rejection):
        return framing
    return Accepted(path=path, host=hosts[0].decode("ascii").lower(), content_length=framing)


def _check_framing(lengths: list[bytes], codings: list[bytes], max_body: int) -> Rejection | int | None:
    """The declared body length (None if not declared), or why the framing is ambiguous."""
    if lengths and codings:
        # RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length and
        # Transfer-Encoding [...]" and §6.3: "Such a message might indicate an attempt to perform
        # request smuggling (Section 11.2) [...] and ought to be handled as an error."
        return CL_AND_TE
    if codings:
        # RFC 9112 §6.3: if chunked "is not the final encoding, the message body length cannot be
        # determined reliably; the server MUST respond with the 400 (Bad Request)". We go further
        # and accept only one line reading exactly "chunked": "Chunked", "chunked, chunked",
        # " chunked" or "gzip, chunked" are where front ends and back ends have disagreed.
        if len(codings) > 1 or codings[0] != b"chunked":
            return BAD_TRANSFER_ENCODING
        return None
    if not lengths:
        return None
    if len(lengths) > 1:
        # RFC 9110 §8.6 lets a recipient either reject or collapse identical duplicates; two
        # framings of one body are a smuggling vector, so we reject even when they agree.
        return DUPLICATE_CONTENT_LENGTH
    # RFC 9110 §8.6: "Content-Length = 1*DIGIT"; no sign, no list, no whitespace.
    value = lengths[0]
    if not value.isdigit():  # bytes.isdigit() is ASCII-only
        return BAD_CONTENT_LENGTH
    if len(value) > _MAX_CL_DIGITS:
        # Past Python's int-from-str digit limit int() raises; leading zeros are legal.
        value = value.lstrip(b"0") or b"0"
        if len(value) > _MAX_CL_DIGITS:
            return BODY_TOO_LARGE
    length = int(value)
    return BODY_TOO_LARGE if length > max_body else length


def _check_path(raw: bytes, reject_empty: bool) -> Rejection | str:
    """The validated, percent-decoded path, or why `raw` is ambiguous.

    Refused (400): a path not starting with '/'; a leading '//' always, and '//' anywhere when
    `reject_empty`; any byte outside visible ASCII; '\\'; malformed or double percent-encoding;
    and, once decoded, an added '/', a '\\', a control character, a '.'/'..' segment (also as
    '..;x', and where an overlong UTF-8 form or an NFKC look-alike spells one), invalid UTF-8.
    """
    if not raw.startswith(b"/"):
        # RFC 9112 §3.2.1: origin-form = absolute-path [ "?" query ]. Also refuses '*'.
        return NOT_ABSOLUTE
    if not raw.isascii():
        return CONTROL_CHAR
    # Checks below run on str: substring tests on bytes cost ten times more in CPython 3.11.
    text = raw.decode("ascii")
    # RFC 3986 §3.3: "If a URI does not contain an authority component, then the path cannot
    # begin with two slash characters ("//")": '//evil.example/x' reads as a network-path
    # reference (§4.2) to anything that re-parses it, so it is refused whatever the config.
    if text.startswith("//") or (reject_empty and "//" in text):
        return EMPTY_SEGMENT
    # Fast path: visible ASCII, nothing encoded, no '\', no segment starting with '.'.
    if (text.isprintable() and " " not in text and "%" not in text and "\\" not in text
            and "/." not in text):
        return text

    if not text.isprintable() or " " in text:
        return CONTROL_CHAR
    if "\\" in text:
        return BACKSLASH
    if "%" not in text:  # so we are here for a segment starting with '.'
        return DOT_SEGMENT if _has_dot_segment(text) else text
    if _BAD_PERCENT.search(text):
        return BAD_PERCENT
    octets = unquote_to_bytes(text)
    # RFC 3986 §2.4: "Implementations must not percent-encode or decode the same string more
    # than once, as decoding an already decoded string might lead to misinterpreting a percent
    # data octet as the beginning of a percent-encoding". '%252e' would become '.' downstream.
    if _PERCENT_TRIPLET.search(octets):
        return DOUBLE_ENCODING
    try:
        decoded = octets.decode("utf-8")
    except UnicodeDecodeError:
        # RFC 3629 §10: a parser might prohibit "/../", "yet permit the illegal octet sequence
        # 2F C0 AE 2E 2F". Read it as the laxest decoder would, so '%c0%ae' is refused as the
        # dot it spells there; invalid UTF-8 that spells nothing dangerous is refused anyway.
        return _compare(_lenient_utf8(octets), text) or BAD_UTF8
    refusal = _compare(decoded, text)
    if refusal is None and not decoded.isascii():
        # Compatibility look-alikes: NFKC maps U+FF0E to '.', U+2025 to '..', U+FF0F to '/',
        # U+2100 to 'a/c'. Back ends that normalise would see a dot segment or a separator.
        refusal = _compare(unicodedata.normalize("NFKC", decoded), text)
    return refusal or decoded


def _compare(decoded: str, raw: str) -> Rejection | None:
    """Why `decoded` could be read differently from `raw`, the path it was decoded from, or None.

    `decoded` must keep exactly the raw '/' as its separators (so no decoded character moves a
    segment boundary) and hold no '\\', control character or dot segment.
    """
    if decoded.count("/") != raw.count("/"):
        return ENCODED_SLASH
    if "\\" in decoded:
        return BACKSLASH
    if _CONTROL.search(decoded):
        return CONTROL_CHAR
    if "/." in decoded and _has_dot_segment(decoded):
        return DOT_SEGMENT
    return None


def _has_dot_segment(path: str) -> bool:
    """RFC 3986 §3.3: whether a segment is "." or ".." (the dot-segments §5.2.4 removes).

    Also '.;x' and '..;x': servlet containers strip ';' path parameters before resolving
    dot segments, so '/a/..;/admin' reaches '/admin' there.
    """
    return any(segment.partition(";")[0] in (".", "..") for segment in path.split("/"))


def _lenient_utf8(octets: bytes) -> str:
    """Decode like a naive UTF-8 decoder: overlong forms become the code point they spell.

    Used only to classify invalid input; malformed sequences become U+FFFD.
    """
    out: list[str] = []
    i, n = 0, len(octets)
    while i < n:
        lead = octets[i]
        if lead < 0x80:
            out.append(chr(lead))
            i += 1
            continue
        if 0xC0 <= lead < 0xE0:
            need, cp = 1, lead & 0x1F
        elif 0xE0 <= lead < 0xF0:
            need, cp = 2, lead & 0x0F
        elif 0xF0 <= lead < 0xF8:
            need, cp = 3, lead & 0x07
        else:
            out.append("\ufffd")
            i += 1
            continue
        j = i + 1
        while j <= i + need and j < n and 0x80 <= octets[j] < 0xC0:
            cp = (cp << 6) | (octets[j] & 0x3F)
            j += 1
        out.append(chr(cp) if j == i + need + 1 and cp < 0x110000 else "\ufffd")
        i = j
    return "".join(out)


class NormalizeStage:
    """Stage 2 of the request path: identify the caller, then refuse ambiguous requests.

    On entry `exchange.client_ip` holds the direct peer. On return it holds the client address
    (from X-Forwarded-For only via trusted proxies), `request_id` the incoming id if a trusted
    proxy sent a sane one, and `user_agent` the first User-Agent, truncated; all three also on
    a refusal (for the audit event), except past the header bounds (431), where the headers are
    not read at all. On success `path` is the decoded path and `host` the lower-cased Host; on
    refusal both stay empty (the record stage then logs the raw path).
    """

    name: ClassVar[str] = "normalize"

    def __init__(self, cfg: NormalizeConfig, trusted: TrustedProxies | None = None) -> None:
        """Build from `cfg`; `trusted` shares one `TrustedProxies` (and its cache) with other stages.

        A shared `trusted` must be built from `cfg.trusted_proxies`; one is built here when omitted.
        """
        self._cfg = cfg
        self._proxies = trusted if trusted is not None else TrustedProxies(cfg.trusted_proxies)
        self._request_id_header = cfg.request_id_header.encode("ascii")

    async def on_request(self, exchange: Exchange) -> Problem | None:
        """Enrich `exchange` as described on the class; a Problem when the request is refused."""
        result = inspect_request(exchange.method, exchange.raw_path, exchange.query,
                                 exchange.headers, self._cfg)
        # Past the header bounds nothing more is read from the headers, not even who is calling.
        if result is not HEADERS_TOO_LARGE:
            self._identify(exchange)
        if isinstance(result, Rejection):
            return result.to_problem()
        exchange.path = result.path
        exchange.host = result.host
        return None

    def _identify(self, exchange: Exchange) -> None:
        """Set `client_ip`, `request_id` and `user_agent`; headers are within their bounds."""
        user_agent: bytes | None = None
        if self._proxies.is_trusted(exchange.client_ip):
            # One pass collects everything a trusted proxy may tell us.
            id_header = self._request_id_header
            forwarded: list[bytes] = []
            ids: list[bytes] = []
            for name, value in exchange.headers:
                if name == b"x-forwarded-for":
                    forwarded.append(value)
                elif name == b"user-agent" and user_agent is None:
                    user_agent = value
                if name == id_header:
                    ids.append(value)
            if forwarded:
                exchange.client_ip = self._proxies.client_ip(exchange.client_ip, forwarded)
            # Two ids mean a proxy appended instead of replacing: the first may be the client's.
            if len(ids) == 1 and _REQUEST_ID.fullmatch(ids[0]):
                exchange.request_id = ids[0].decode("ascii")
        else:
            user_agent = exchange.header(b"user-agent")
        if user_agent is not None:
            # latin-1 maps bytes 1:1, so slicing bytes first is slicing characters.
            exchange.user_agent = user_agent[:USER_AGENT_MAX_CHARS].decode("latin-1")
