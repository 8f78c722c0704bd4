"""The normalize stage: ambiguous requests refused, benign ones decoded, callers identified."""

from __future__ import annotations

import re
import unicodedata
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from portcullis.exchange import Exchange, Headers
from portcullis.netutil import TrustedProxies, parse_hop, parse_network
from portcullis.pipeline import Stage
from portcullis.problems import PROBLEM_TITLES
from portcullis.stages.normalize import (
    Accepted,
    NormalizeConfig,
    NormalizeStage,
    Rejection,
    inspect_request,
)

CFG = NormalizeConfig()
HOST: Headers = [(b"host", b"api.example.com")]
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def inspect(raw_path: bytes = b"/", headers: Headers | None = None, method: str = "GET",
            query: bytes = b"", cfg: NormalizeConfig = CFG) -> Rejection | Accepted:
    return inspect_request(method, raw_path, query, HOST if headers is None else headers, cfg)


def accepted(result: Rejection | Accepted) -> Accepted:
    assert isinstance(result, Accepted), result
    return result


# --- hostile paths: (raw path, reason) -------------------------------------------------------

HOSTILE_PATHS: list[tuple[bytes, str]] = [
    # Dot segments, literal and encoded (RFC 3986 §5.2.4 would remove them).
    (b"/a/./b", "path.dot_segment"),
    (b"/a/../b", "path.dot_segment"),
    (b"/..", "path.dot_segment"),
    (b"/.", "path.dot_segment"),
    (b"/a/..", "path.dot_segment"),
    (b"/a/%2e/b", "path.dot_segment"),
    (b"/a/%2E%2E/b", "path.dot_segment"),
    (b"/a/.%2e/b", "path.dot_segment"),
    (b"/a/%2E./b", "path.dot_segment"),
    (b"/a/%2e%2E/b", "path.dot_segment"),
    (b"/a/%2e%2e", "path.dot_segment"),
    # Servlet-style path parameters hiding a dot segment.
    (b"/a/..;/admin", "path.dot_segment"),
    (b"/a/..%3b/admin", "path.dot_segment"),
    (b"/a/.;x/b", "path.dot_segment"),
    # Overlong UTF-8 (RFC 3629 §10) spelling '.', '/', '\', NUL.
    (b"/a/%c0%ae%c0%ae/b", "path.dot_segment"),
    (b"/%c0%ae", "path.dot_segment"),
    (b"/%C0%AE%C0%AE", "path.dot_segment"),
    (b"/%e0%80%ae%e0%80%ae/x", "path.dot_segment"),
    (b"/%f0%80%80%ae", "path.dot_segment"),
    (b"/a%c0%afb", "path.encoded_slash"),
    (b"/a%c1%9cb", "path.backslash"),
    (b"/a%c0%80b", "path.control_char"),
    # NFKC look-alikes.
    (b"/%ef%bc%8e%ef%bc%8e/etc", "path.dot_segment"),
    (b"/%e2%80%a5/x", "path.dot_segment"),
    (b"/a%ef%bc%8fb", "path.encoded_slash"),
    (b"/%e2%84%80", "path.encoded_slash"),
    (b"/a%ef%bc%bcb", "path.backslash"),
    # Encoded '/'.
    (b"/a%2fb", "path.encoded_slash"),
    (b"/a%2Fb", "path.encoded_slash"),
    (b"/..%2f..%2fetc/passwd", "path.encoded_slash"),
    (b"/%2e%2e%2f", "path.encoded_slash"),
    # Backslash.
    (b"/a\\b", "path.backslash"),
    (b"/..\\..\\win.ini", "path.backslash"),
    (b"/a%5cb", "path.backslash"),
    (b"/a%5Cb", "path.backslash"),
    # Control characters, raw non-ASCII, space.
    (b"/a%00b", "path.control_char"),
    (b"/a\x00b", "path.control_char"),
    (b"/a%0d%0aSet-Cookie:x", "path.control_char"),
    (b"/a%09", "path.control_char"),
    (b"/a\tb", "path.control_char"),
    (b"/a b", "path.control_char"),
    (b"/a\x7f", "path.control_char"),
    (b"/a%7F", "path.control_char"),
    (b"/a%c2%85", "path.control_char"),
    (b"/caf\xc3\xa9", "path.control_char"),
    (b"/\xff", "path.control_char"),
    # Malformed percent-encoding.
    (b"/a%", "path.bad_percent"),
    (b"/a%2", "path.bad_percent"),
    (b"/a%zz", "path.bad_percent"),
    (b"/a%u002e", "path.bad_percent"),
    (b"/%%30%30", "path.bad_percent"),
    (b"/a%2g", "path.bad_percent"),
    # Double encoding (RFC 3986 §2.4).
    (b"/a/%252e%252e/b", "path.double_encoding"),
    (b"/%252f", "path.double_encoding"),
    (b"/%255c", "path.double_encoding"),
    (b"/%25252e", "path.double_encoding"),
    (b"/%25%32%65", "path.double_encoding"),
    (b"/%2500", "path.double_encoding"),
    # Invalid UTF-8 that spells nothing in particular.
    (b"/%ff", "path.bad_utf8"),
    (b"/caf%e9", "path.bad_utf8"),
    (b"/%ed%a0%80", "path.bad_utf8"),
    # Not origin-form.
    (b"", "path.not_absolute"),
    (b"a/b", "path.not_absolute"),
    (b"*", "path.not_absolute"),
    (b"http://evil.example/x", "path.not_absolute"),
    # Empty segments.
    (b"//", "path.empty_segment"),
    (b"//evil.example/x", "path.empty_segment"),
    (b"/a//b", "path.empty_segment"),
    (b"/a/b//", "path.empty_segment"),
]


@pytest.mark.parametrize(("raw_path", "reason"), HOSTILE_PATHS)
def test_hostile_paths_are_refused(raw_path: bytes, reason: str) -> None:
    result = inspect(raw_path)
    assert isinstance(result, Rejection)
    assert (result.status, result.slug, result.reason) == (400, "bad-request", reason)


# --- hostile requests: (method, path, query, headers, status, slug, reason) ------------------

def _h(*pairs: tuple[bytes, bytes]) -> Headers:
    return [*HOST, *pairs]


HOSTILE_REQUESTS: list[tuple[str, bytes, bytes, Headers, int, str, str]] = [
    ("GET", b"/" + b"a" * 8192, b"", HOST, 400, "bad-request", "request.url_too_long"),
    ("GET", b"/" + b"a" * 8000, b"q=" + b"x" * 200, HOST, 400, "bad-request", "request.url_too_long"),
    ("GET", b"/", b"", [], 400, "bad-request", "header.missing_host"),
    ("GET", b"/", b"", [(b"user-agent", b"x")], 400, "bad-request", "header.missing_host"),
    ("GET", b"/", b"", _h((b"host", b"evil.example")), 400, "bad-request", "header.duplicate_host"),
    ("GET", b"/", b"", _h((b"host", b"api.example.com")), 400, "bad-request", "header.duplicate_host"),
    ("GET", b"/", b"", [(b"host", b"evil.example/x")], 400, "bad-request", "header.bad_host"),
    ("GET", b"/", b"", [(b"host", b"")], 400, "bad-request", "header.bad_host"),
    ("GET", b"/", b"", [(b"host", b"a b")], 400, "bad-request", "header.bad_host"),
    ("GET", b"/", b"", [(b"host", b"user@evil.example")], 400, "bad-request", "header.bad_host"),
    ("GET", b"/", b"", [(b"host", b"a.example:80:80")], 400, "bad-request", "header.bad_host"),
    ("POST", b"/", b"", _h((b"content-length", b"5"), (b"content-length", b"5")),
     400, "bad-request", "header.duplicate_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"5"), (b"content-length", b"6")),
     400, "bad-request", "header.duplicate_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"+5")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"-1")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"5, 5")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b" 5")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"5 ")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"0x10")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"")), 400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", "١".encode())),
     400, "bad-request", "header.bad_content_length"),
    ("POST", b"/", b"", _h((b"content-length", b"5"), (b"transfer-encoding", b"chunked")),
     400, "bad-request", "header.cl_and_te"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"chunked"), (b"content-length", b"0")),
     400, "bad-request", "header.cl_and_te"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"gzip")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"Chunked")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"chunked, chunked")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b" chunked")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"gzip, chunked")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("POST", b"/", b"", _h((b"transfer-encoding", b"chunked"), (b"transfer-encoding", b"chunked")),
     400, "bad-request", "header.bad_transfer_encoding"),
    ("get", b"/", b"", HOST, 400, "bad-request", "method.not_allowed"),
    ("TRACE", b"/", b"", HOST, 400, "bad-request", "method.not_allowed"),
    ("CONNECT", b"/", b"", HOST, 400, "bad-request", "method.not_allowed"),
    ("GE T", b"/", b"", HOST, 400, "bad-request", "method.invalid"),
    ("", b"/", b"", HOST, 400, "bad-request", "method.invalid"),
    ("GET\r\n", b"/", b"", HOST, 400, "bad-request", "method.invalid"),
    ("PO(ST", b"/", b"", HOST, 400, "bad-request", "method.invalid"),
    ("GÉT", b"/", b"", HOST, 400, "bad-request", "method.invalid"),
    ("POST", b"/", b"", _h((b"content-length", b"1048577")),
     413, "payload-too-large", "request.body_too_large"),
    ("POST", b"/", b"", _h((b"content-length", b"9" * 30)),
     413, "payload-too-large", "request.body_too_large"),
    ("POST", b"/", b"", _h((b"content-length", b"9" * 5000)),
     413, "payload-too-large", "request.body_too_large"),
    ("GET", b"/", b"", HOST * 101, 431, "headers-too-large", "request.headers_too_large"),
    ("GET", b"/", b"", _h((b"x-pad", b"x" * 16_384)), 431, "headers-too-large", "request.headers_too_large"),
]


@pytest.mark.parametrize(("method", "raw_path", "query", "headers", "status", "slug", "reason"),
                         HOSTILE_REQUESTS)
def test_hostile_requests_are_refused(method: str, raw_path: bytes, query: bytes, headers: Headers,
                                      status: int, slug: str, reason: str) -> None:
    result = inspect(raw_path, headers, method, query)
    assert isinstance(result, Rejection)
    assert (result.status, result.slug, result.reason) == (status, slug, reason)
    assert result.slug in PROBLEM_TITLES


def test_bounds_are_checked_before_parsing() -> None:
    # Too many headers wins over every other fault: nothing is parsed past a bound.
    result = inspect(b"/../%zz", [(b"content-length", b"x")] * 101, method="GE T")
    assert isinstance(result, Rejection)
    assert result.reason == "request.headers_too_large"


def test_header_bytes_bound_counts_names_and_values() -> None:
    cfg = NormalizeConfig(max_header_bytes=len(b"host") + len(b"api.example.com") + 10)
    assert isinstance(inspect(headers=_h((b"x", b"y" * 9)), cfg=cfg), Accepted)
    result = inspect(headers=_h((b"x", b"y" * 10)), cfg=cfg)
    assert isinstance(result, Rejection)
    assert result.status == 431


def test_rejection_detail_does_not_echo_input() -> None:
    marker = b"<script>zzmarker"
    for raw in (b"/a/../" + marker, b"/" + marker + b"%zz", b"/" + marker + b"%2f"):
        result = inspect(raw)
        assert isinstance(result, Rejection)
        problem = result.to_problem()
        assert b"zzmarker" not in problem.body("rid")
        assert (problem.status, problem.slug, problem.reason) == (400, "bad-request", result.reason)


# --- benign requests ------------------------------------------------------------------------

BENIGN_PATHS: list[tuple[bytes, str]] = [
    (b"/", "/"),
    (b"/v1/users/42", "/v1/users/42"),
    (b"/a/b/", "/a/b/"),
    (b"/a%20b", "/a b"),
    (b"/caf%C3%A9", "/café"),
    (b"/caf%c3%a9/men%C3%BC", "/café/menü"),
    (b"/%E2%82%AC/%F0%9F%98%80", "/€/😀"),
    (b"/.well-known/openid-configuration", "/.well-known/openid-configuration"),
    (b"/a/.hidden/b.c/..d/.../x.", "/a/.hidden/b.c/..d/.../x."),
    (b"/discount/100%25", "/discount/100%"),
    (b"/a%2Eb", "/a.b"),
    (b"/%2e%2e%2e", "/..."),
    (b"/~user/file-name_1.txt", "/~user/file-name_1.txt"),
    (b"/a;b=c/d", "/a;b=c/d"),
    (b"/q%3Fx%23y", "/q?x#y"),
    (b"/a%2B%26b", "/a+&b"),
    (b"/a:b@c!$&'()*+,=", "/a:b@c!$&'()*+,="),
    (b"/a%25zz", "/a%zz"),
]


@pytest.mark.parametrize(("raw_path", "decoded"), BENIGN_PATHS)
def test_benign_paths_are_decoded(raw_path: bytes, decoded: str) -> None:
    assert accepted(inspect(raw_path)).path == decoded


@pytest.mark.parametrize("query", [
    b"", b"q=..%2f..%2f&x=%00&y=\\", b"a=%zz%", b"\xff\xfe", b"x=//../", b"redirect=http://e/x?y#z",
])
def test_query_strings_are_not_inspected(query: bytes) -> None:
    assert accepted(inspect(b"/search", query=query)).path == "/search"


def test_url_length_limit_is_inclusive() -> None:
    cfg = NormalizeConfig(max_url_bytes=10)
    assert isinstance(inspect(b"/abcd", query=b"x=123", cfg=cfg), Accepted)
    assert isinstance(inspect(b"/abcd", query=b"x=1234", cfg=cfg), Rejection)


def test_empty_segments_allowed_when_configured_except_leading() -> None:
    cfg = NormalizeConfig(reject_empty_segments=False)
    assert accepted(inspect(b"/a//b/", cfg=cfg)).path == "/a//b/"
    result = inspect(b"//evil.example/x", cfg=cfg)
    assert isinstance(result, Rejection)
    assert result.reason == "path.empty_segment"


@pytest.mark.parametrize(("host", "expected"), [
    (b"API.Example.COM", "api.example.com"),
    (b"api.example.com:8443", "api.example.com:8443"),
    (b"[::1]:8080", "[::1]:8080"),
    (b"127.0.0.1", "127.0.0.1"),
    (b"my_service.internal", "my_service.internal"),
])
def test_host_is_lower_cased(host: bytes, expected: str) -> None:
    assert accepted(inspect(headers=[(b"host", host)])).host == expected


@pytest.mark.parametrize(("headers", "length"), [
    ([], None),
    ([(b"content-length", b"0")], 0),
    ([(b"content-length", b"1048576")], 1_048_576),
    ([(b"content-length", b"0" * 30 + b"1")], 1),
    ([(b"transfer-encoding", b"chunked")], None),
])
def test_framing_accepted(headers: Headers, length: int | None) -> None:
    assert accepted(inspect(headers=_h(*headers), method="POST")).content_length == length


def test_allowed_methods_are_configurable_and_case_sensitive() -> None:
    cfg = NormalizeConfig(allowed_methods=["GET", "PROPFIND"])
    assert isinstance(inspect(method="PROPFIND", cfg=cfg), Accepted)
    for method in ("POST", "propfind"):
        result = inspect(method=method, cfg=cfg)
        assert isinstance(result, Rejection)
        assert result.reason == "method.not_allowed"


def test_every_default_method_is_accepted() -> None:
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert isinstance(inspect(method=method), Accepted)


# --- configuration --------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "message"), [
    ({"trusted_proxies": ["10.0.0.0/33"]}, "'10.0.0.0/33'"),
    ({"trusted_proxies": ["10.0.0.0/8", "not-an-ip"]}, "'not-an-ip'"),
    ({"trusted_proxies": ["10.0.0.1/8"]}, "did you mean 10.0.0.0/8"),
    ({"trusted_proxies": ["2001:db8::/129"]}, "'2001:db8::/129'"),
    ({"max_body_bytes": -1}, "greater than 0"),
    ({"max_body_bytes": 0}, "greater than 0"),
    ({"max_header_bytes": -5}, "greater than 0"),
    ({"max_header_count": 0}, "greater than 0"),
    ({"max_url_bytes": -1}, "greater than 0"),
    ({"allowed_methods": []}, "at least one method"),
    ({"allowed_methods": ["GET", "GE T"]}, "'GE T' is not a valid HTTP method token"),
    ({"request_id_header": "x request id"}, "'x request id' is not a valid header name"),
    ({"max_body_byte": 10}, "Extra inputs are not permitted"),
])
def test_config_validation_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        NormalizeConfig(**kwargs)
    assert message in str(info.value)


def test_config_defaults_and_normalisation() -> None:
    cfg = NormalizeConfig(request_id_header="X-Correlation-ID", trusted_proxies=["10.0.0.0/8", "::1"])
    assert cfg.request_id_header == "x-correlation-id"
    assert cfg.trusted_proxies == ["10.0.0.0/8", "::1"]
    assert CFG.max_body_bytes == 1_048_576
    assert CFG.allowed_methods == ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    assert CFG.reject_empty_segments is True


def test_config_is_frozen() -> None:
    with pytest.raises(ValidationError):
        setattr(CFG, "max_body_bytes", 5)


# --- client address through trusted proxies --------------------------------------------------

PROXIES = ["10.0.0.0/8", "2001:db8:ffff::/48"]


@pytest.mark.parametrize(("peer", "xff", "client"), [
    # An untrusted peer is the client; its X-Forwarded-For is ignored.
    ("203.0.113.5", [b"198.51.100.7"], "203.0.113.5"),
    ("203.0.113.5", [b"10.0.0.1"], "203.0.113.5"),
    # A trusted peer: the rightmost untrusted entry.
    ("10.0.0.9", [b"198.51.100.7"], "198.51.100.7"),
    ("10.0.0.9", [b"198.51.100.7, 10.0.0.2, 10.0.0.3"], "198.51.100.7"),
    ("10.0.0.9", [b"198.51.100.7,10.0.0.2", b"10.0.0.3"], "198.51.100.7"),
    # The spoofed leftmost value is never taken.
    ("10.0.0.9", [b"6.6.6.6, 198.51.100.7"], "198.51.100.7"),
    ("10.0.0.9", [b"6.6.6.6", b"198.51.100.7, 10.0.0.2"], "198.51.100.7"),
    # A malformed entry stops the walk at the last hop we could verify.
    ("10.0.0.9", [b"198.51.100.7, garbage, 10.0.0.2"], "10.0.0.2"),
    ("10.0.0.9", [b"198.51.100.7, garbage"], "10.0.0.9"),
    ("10.0.0.9", [b"198.51.100.7, unknown"], "10.0.0.9"),
    ("10.0.0.9", [b"198.51.100.7,,10.0.0.2"], "10.0.0.2"),
    ("10.0.0.9", [b""], "10.0.0.9"),
    ("10.0.0.9", [b"1.2.3.4, \xff\xfe"], "10.0.0.9"),
    ("10.0.0.9", [b"1.2.3.4, 300.1.1.1"], "10.0.0.9"),
    ("10.0.0.9", [b"1.2.3.4, " + b"1" * 200], "10.0.0.9"),
    ("10.0.0.9", [b"1.2.3.4, 01.2.3.4"], "10.0.0.9"),
    # Every entry trusted: the leftmost proxy is the client.
    ("10.0.0.9", [b"10.0.0.1, 10.0.0.2"], "10.0.0.1"),
    ("10.0.0.9", [], "10.0.0.9"),
    # Ports, brackets, IPv6 and IPv4-mapped forms.
    ("10.0.0.9", [b"203.0.113.9:8080"], "203.0.113.9"),
    ("10.0.0.9", [b"[2001:DB8::0001]:443"], "2001:db8::1"),
    ("10.0.0.9", [b"2001:db8::1"], "2001:db8::1"),
    ("10.0.0.9", [b"::ffff:198.51.100.7"], "198.51.100.7"),
    ("::ffff:10.0.0.9", [b"198.51.100.7"], "198.51.100.7"),
    ("2001:db8:ffff::1", [b"198.51.100.7, 2001:db8:ffff::2"], "198.51.100.7"),
    ("10.0.0.9", [b"[2001:db8::1"], "10.0.0.9"),
    ("10.0.0.9", [b"[2001:db8::1]x"], "10.0.0.9"),
    ("10.0.0.9", [b"1.2.3.4:http"], "10.0.0.9"),
    # A peer that is not an IP at all (a unix socket) is never trusted.
    ("/run/portcullis.sock", [b"198.51.100.7"], "/run/portcullis.sock"),
    ("", [b"198.51.100.7"], ""),
])
def test_client_ip(peer: str, xff: list[bytes], client: str) -> None:
    assert TrustedProxies(PROXIES).client_ip(peer, xff) == client


def test_no_trusted_proxies_means_the_peer() -> None:
    proxies = TrustedProxies([])
    assert not proxies.is_trusted("10.0.0.1")
    assert proxies.client_ip("10.0.0.1", [b"198.51.100.7"]) == "10.0.0.1"


@pytest.mark.parametrize(("ip", "trusted"), [
    ("10.1.2.3", True), ("11.0.0.1", False), ("::ffff:10.0.0.1", True), ("2001:db8:ffff::9", True),
    ("2001:db8::9", False), ("not-an-ip", False), ("", False), ("10.0.0.1:80", False),
])
def test_is_trusted(ip: str, trusted: bool) -> None:
    proxies = TrustedProxies(PROXIES)
    assert proxies.is_trusted(ip) is trusted
    assert proxies.is_trusted(ip) is trusted  # the cached answer is the same


def test_caches_are_bounded() -> None:
    proxies = TrustedProxies(PROXIES, cache_size=4)
    for i in range(50):
        proxies.client_ip("10.0.0.9", [f"198.51.100.{i}".encode()])
        assert proxies.is_trusted(f"203.0.113.{i}") is False
    assert len(proxies._trust) <= 4
    assert len(proxies._hops) <= 4
    assert proxies.client_ip("10.0.0.9", [b"198.51.100.7, 10.0.0.2"]) == "198.51.100.7"


@pytest.mark.parametrize(("entry", "hop"), [
    (b" 1.2.3.4 ", "1.2.3.4"), (b"1.2.3.4:80", "1.2.3.4"), (b"[::1]", "::1"), (b"[::1]:80", "::1"),
    (b"::1", "::1"), (b"unknown", None), (b"_hidden", None), (b"", None), (b"1.2.3.4:", None),
    (b"[::1]:", None), (b"example.com", None), (b"1.2.3.4/8", None),
])
def test_parse_hop(entry: bytes, hop: str | None) -> None:
    assert parse_hop(entry) == hop


def test_parse_network_names_the_bad_value() -> None:
    assert str(parse_network("10.0.0.1")) == "10.0.0.1/32"
    with pytest.raises(ValueError, match=r"'10\.0\.0\.1/8'.*did you mean 10\.0\.0\.0/8"):
        parse_network("10.0.0.1/8")
    with pytest.raises(ValueError, match="'nope'"):
        TrustedProxies(["10.0.0.0/8", "nope"])


# --- the stage -------------------------------------------------------------------------------

async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


def make_exchange(raw_path: bytes = b"/v1/things", headers: Headers | None = None, *,
                  method: str = "GET", peer: str = "203.0.113.5", query: bytes = b"") -> Exchange:
    return Exchange(scope={"type": "http"}, receive=_receive, method=method, raw_path=raw_path,
                    query=query, headers=HOST if headers is None else headers,
                    request_id="generated-id", client_ip=peer)


def stage(**kwargs: Any) -> NormalizeStage:
    return NormalizeStage(NormalizeConfig(trusted_proxies=PROXIES, **kwargs))


def test_stage_satisfies_the_protocol() -> None:
    s: Stage = stage()
    assert s.name == "normalize"


async def test_stage_can_share_trusted_proxies() -> None:
    shared = TrustedProxies(["192.0.2.0/24"])
    s = NormalizeStage(NormalizeConfig(trusted_proxies=["192.0.2.0/24"]), shared)
    ex = make_exchange(headers=[*HOST, (b"x-forwarded-for", b"198.51.100.7")], peer="192.0.2.1")
    assert await s.on_request(ex) is None
    assert ex.client_ip == "198.51.100.7"
    assert shared.is_trusted("192.0.2.1")


async def test_stage_enriches_an_accepted_exchange() -> None:
    ex = make_exchange(b"/v1/caf%C3%A9/a%20b", [
        (b"host", b"API.Example.com:443"), (b"user-agent", b"curl/8.0"), (b"user-agent", b"second"),
        (b"x-forwarded-for", b"198.51.100.7"), (b"x-request-id", b"abc-123"),
    ])
    assert await stage().on_request(ex) is None
    assert ex.path == "/v1/café/a b"
    assert ex.host == "api.example.com:443"
    assert ex.user_agent == "curl/8.0"
    assert ex.client_ip == "203.0.113.5"  # untrusted peer: XFF ignored
    assert ex.request_id == "generated-id"  # untrusted peer: incoming id ignored
    assert "raw_path" not in ex.facts


async def test_stage_takes_client_ip_and_request_id_from_a_trusted_proxy() -> None:
    ex = make_exchange(headers=[*HOST, (b"x-forwarded-for", b"6.6.6.6, 198.51.100.7"),
                                (b"x-forwarded-for", b"10.0.0.2"), (b"x-request-id", b"edge:abc-123.4_5")],
                       peer="10.0.0.9")
    assert await stage().on_request(ex) is None
    assert ex.client_ip == "198.51.100.7"
    assert ex.request_id == "edge:abc-123.4_5"


async def test_stage_keeps_peer_without_forwarded_for() -> None:
    ex = make_exchange(peer="10.0.0.9")
    assert await stage().on_request(ex) is None
    assert ex.client_ip == "10.0.0.9"
    assert ex.request_id == "generated-id"


@pytest.mark.parametrize("ids", [
    [b"x" * 129], [b"has space"], [b"new\nline"], [b""], ["été".encode()], [b"a/b"], [b"abc", b"def"],
])
async def test_stage_ignores_insane_or_duplicate_request_ids(ids: list[bytes]) -> None:
    ex = make_exchange(headers=[*HOST, *((b"x-request-id", i) for i in ids)], peer="10.0.0.9")
    assert await stage().on_request(ex) is None
    assert ex.request_id == "generated-id"


async def test_stage_request_id_limit_is_128() -> None:
    ex = make_exchange(headers=[*HOST, (b"x-request-id", b"x" * 128)], peer="10.0.0.9")
    await stage().on_request(ex)
    assert ex.request_id == "x" * 128


async def test_stage_uses_the_configured_request_id_header() -> None:
    ex = make_exchange(headers=[*HOST, (b"x-request-id", b"wrong"), (b"x-correlation-id", b"right")],
                       peer="10.0.0.9")
    await stage(request_id_header="X-Correlation-ID").on_request(ex)
    assert ex.request_id == "right"


@pytest.mark.parametrize("peer", ["203.0.113.5", "10.0.0.9"])
async def test_stage_truncates_user_agent(peer: str) -> None:
    ex = make_exchange(headers=[*HOST, (b"user-agent", b"\xe9" + b"x" * 1000)], peer=peer)
    await stage().on_request(ex)
    assert ex.user_agent == "é" + "x" * 255


@pytest.mark.parametrize(("raw_path", "headers", "status", "slug", "reason"), [
    (b"/a/%2e%2e/admin", HOST, 400, "bad-request", "path.dot_segment"),
    (b"/a", [], 400, "bad-request", "header.missing_host"),
    (b"/a", [*HOST, (b"content-length", b"2000000")], 413, "payload-too-large", "request.body_too_large"),
    (b"/a", HOST * 101, 431, "headers-too-large", "request.headers_too_large"),
])
async def test_stage_turns_a_rejection_into_a_problem(raw_path: bytes, headers: Headers, status: int,
                                                      slug: str, reason: str) -> None:
    ex = make_exchange(raw_path, headers, method="POST", peer="10.0.0.9")
    problem = await stage().on_request(ex)
    assert problem is not None
    assert (problem.status, problem.slug, problem.reason) == (status, slug, reason)
    assert ex.path == ""
    assert ex.host == ""


async def test_stage_reads_no_identity_past_the_header_bounds() -> None:
    headers = [*HOST, (b"x-forwarded-for", b"198.51.100.7"), (b"user-agent", b"ua")] * 40
    ex = make_exchange(headers=headers, peer="10.0.0.9")
    problem = await stage().on_request(ex)
    assert problem is not None
    assert problem.status == 431
    assert ex.client_ip == "10.0.0.9"
    assert ex.user_agent == ""


async def test_stage_identifies_the_caller_even_on_refusal() -> None:
    ex = make_exchange(b"/a/../\r\n\xff", [*HOST, (b"x-forwarded-for", b"198.51.100.7"),
                                              (b"x-request-id", b"edge-1"), (b"user-agent", b"ua")],
                       peer="10.0.0.9")
    problem = await stage().on_request(ex)
    assert problem is not None
    assert problem.reason == "path.control_char"
    assert ex.path == ""
    # Who called is settled even when the request is refused: the audit event needs it.
    assert (ex.client_ip, ex.request_id, ex.user_agent) == ("198.51.100.7", "edge-1", "ua")


# --- properties ------------------------------------------------------------------------------

# Pieces of paths: the first list mostly yields accepted paths that still exercise dots,
# percent-encoding and ';'; the second is the hostile vocabulary of the tables above.
SAFE_ATOMS = [
    b"/", b"a", b"Z", b"2", b"e", b"f", b".", b"%2e", b"%2E", b"%25", b"%20", b"%C3%A9", b"~",
    b";", b"%3b", b"%3F", b"%e2%80%a6", b"%ef%bc%a1",
]
HOSTILE_ATOMS = [
    b"..", b"%2f", b"%2F", b"%5c", b"%c0%ae", b"%c0%af", b"%e0%80%ae", b"\\", b"%00", b"%", b"%z",
    b"%ef%bc%8e", b"%e2%80%a5", b"%e2%84%80", b"\x00", b"\t", b"\xff", b"%ff", b"%0a", b"%7f",
    b"%c2%85", b" ", b"?", b"#", b"//",
]
atoms = st.sampled_from(SAFE_ATOMS * 6 + HOSTILE_ATOMS)
paths = st.lists(atoms, max_size=16).map(lambda parts: b"/" + b"".join(parts))
any_paths = st.one_of(paths, st.lists(atoms, max_size=16).map(b"".join), st.binary(max_size=64))


def _segments_are_safe(path: str, reject_empty: bool) -> None:
    segments = path.split("/")
    assert segments[0] == ""
    for i, segment in enumerate(segments):
        assert segment.partition(";")[0] not in (".", "..")
        if reject_empty or i == 1:
            assert segment or i in (0, len(segments) - 1)


@settings(max_examples=1500)
@given(raw_path=paths, reject_empty=st.booleans())
def test_accepted_paths_are_unambiguous(raw_path: bytes, reject_empty: bool) -> None:
    result = inspect(raw_path, cfg=NormalizeConfig(reject_empty_segments=reject_empty))
    if isinstance(result, Rejection):
        return
    path = result.path
    assert "\\" not in path
    assert not CONTROL.search(path)
    _segments_are_safe(path, reject_empty)
    # And still so after compatibility normalisation, which some back ends apply.
    folded = unicodedata.normalize("NFKC", path)
    assert folded.count("/") == path.count("/")
    assert "\\" not in folded
    _segments_are_safe(folded, reject_empty)


@settings(max_examples=1500)
@given(raw_path=paths)
def test_decoding_never_moves_a_segment_boundary(raw_path: bytes) -> None:
    result = inspect(raw_path, cfg=NormalizeConfig(reject_empty_segments=False))
    if isinstance(result, Rejection):
        return
    raw_segments = raw_path.split(b"/")
    assert result.path.split("/") == [unquote(s.decode("ascii"), errors="strict") for s in raw_segments]


header_names = st.one_of(
    st.sampled_from([b"host", b"content-length", b"transfer-encoding", b"x-forwarded-for"]),
    st.binary(max_size=20),
)


@settings(max_examples=500)
@given(method=st.text(max_size=10), raw_path=any_paths, query=st.binary(max_size=32),
       headers=st.lists(st.tuples(header_names, st.binary(max_size=40)), max_size=8))
def test_inspect_request_never_raises(method: str, raw_path: bytes, query: bytes,
                                      headers: Headers) -> None:
    result = inspect_request(method, raw_path, query, headers, CFG)
    if isinstance(result, Rejection):
        assert result.to_problem().status == result.status
    else:
        assert isinstance(result, Accepted)


@settings(max_examples=300)
@given(peer=st.one_of(st.ip_addresses().map(str), st.text(max_size=20)),
       xff=st.lists(st.one_of(st.ip_addresses().map(lambda a: str(a).encode()), st.binary(max_size=30)),
                    max_size=4))
def test_client_ip_is_the_peer_or_from_the_header(peer: str, xff: list[bytes]) -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "fc00::/7"])
    client = proxies.client_ip(peer, xff)
    if not proxies.is_trusted(peer):
        assert client == peer
    else:
        assert client == peer or client in {parse_hop(e) for e in b",".join(xff).split(b",")}
