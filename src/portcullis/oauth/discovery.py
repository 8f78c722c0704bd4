"""Discovery documents: RFC 8414 (`/.well-known/oauth-authorization-server`) and
OpenID Connect Discovery 1.0 (`/.well-known/openid-configuration`), one document.

The token side contributes its endpoints and capabilities; every area adds its own to
`ctx.metadata` while installing. Lists present on both sides are merged (union, in
order). Grant types that OAuth 2.1 removed are never advertised (issue 4: no implicit,
no password grant). The document is built once, at the first request, after every area
has installed.
"""

from __future__ import annotations

import json
from typing import Any

from portcullis.oauth.client_auth import ASSERTION_ALGS, CONFIDENTIAL_METHODS
from portcullis.oauth.config import AuthServerConfig
from portcullis.oauth.dpop import DPOP_ALGS

FORBIDDEN_GRANTS = frozenset({"implicit", "password"})


def token_side_metadata(cfg: AuthServerConfig) -> dict[str, Any]:
    iss = cfg.issuer
    return {
        "issuer": iss,  # RFC 8414 §2, §3.3: identical to the issuer we sign with
        "token_endpoint": f"{iss}/oauth2/token",
        "jwks_uri": f"{iss}/oauth2/jwks",
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": list(CONFIDENTIAL_METHODS),
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "introspection_endpoint": f"{iss}/oauth2/introspect",
        "introspection_endpoint_auth_methods_supported": list(CONFIDENTIAL_METHODS),
        "introspection_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "revocation_endpoint": f"{iss}/oauth2/revoke",
        "revocation_endpoint_auth_methods_supported": [*CONFIDENTIAL_METHODS, "none"],
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "dpop_signing_alg_values_supported": list(DPOP_ALGS),  # RFC 9449 §5.1
        "tls_client_certificate_bound_access_tokens": True,  # RFC 8705 §3.3
        "access_token_signing_alg_values_supported": [cfg.signing_alg],
    }


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`extra` over `base`; lists in both are united, keeping order."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, list) and isinstance(out.get(k), list):
            out[k] = [*out[k], *(x for x in v if x not in out[k])]
        else:
            out[k] = v
    out["issuer"] = base["issuer"]
    if isinstance(out.get("grant_types_supported"), list):
        out["grant_types_supported"] = [g for g in out["grant_types_supported"] if g not in FORBIDDEN_GRANTS]
    return out


class Discovery:
    """The merged document, serialized once."""

    def __init__(self, cfg: AuthServerConfig, metadata: dict[str, Any]) -> None:
        self._cfg = cfg
        self._metadata = metadata
        self._body: bytes | None = None

    def document(self) -> dict[str, Any]:
        return merge(token_side_metadata(self._cfg), self._metadata)

    def body(self) -> bytes:
        if self._body is None:
            self._body = json.dumps(self.document(), separators=(",", ":")).encode()
        return self._body
