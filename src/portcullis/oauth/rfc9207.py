"""RFC 9207: the authorization server's issuer identifier in authorization responses.

§2: "the authorization server MUST include the `iss` parameter in the authorization
response [...] in every authorization response, including error responses", so a client
talking to several servers detects a mix-up attack (RFC 9700 §4.4). §3: the server
advertises it with `authorization_response_iss_parameter_supported`.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

METADATA: dict[str, Any] = {"authorization_response_iss_parameter_supported": True}


def add_params(uri: str, params: list[tuple[str, str]]) -> str:
    """`uri` with `params` appended to its query (RFC 6749 §3.1.2: the registered query is kept)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode([*query, *params]), parts.fragment))


def authorization_response(redirect_uri: str, issuer: str, params: list[tuple[str, str]],
                           state: str | None) -> str:
    """The redirect for a success or error response: `params`, then `state` (exactly as
    received, RFC 6749 §4.1.2) and `iss` (§2)."""
    extra = [*params]
    if state is not None:
        extra.append(("state", state))
    extra.append(("iss", issuer))
    return add_params(redirect_uri, extra)
