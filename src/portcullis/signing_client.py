"""Client-side RFC 9421 signing for `portcullis sign`: what a partner's HTTP client does.

Uses the http-message-signatures library's signer (the same library the gateway
verifies with) on a minimal message object; the gateway's policy wants `@method`,
`@authority`, `@path`, `@query` when there is one, `content-digest` with a body, and
`created`, `nonce` and `keyid`.
"""

from __future__ import annotations

import secrets
import shlex
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from http_message_signatures import HTTPMessageSigner, MappingKeyResolver, algorithms


@dataclass
class _Message:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)


def signed_headers(method: str, url: str, *, private_key_pem: str, key_id: str, body: bytes | None,
                   extra_headers: dict[str, str]) -> dict[str, str]:
    """The request's headers with Content-Digest (if a body), Signature-Input and Signature."""
    key = serialization.load_pem_private_key(private_key_pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("the demo signs with Ed25519 keys only")
    msg = _Message(method.upper(), url, dict(extra_headers))
    components: tuple[str, ...] = ("@method", "@authority", "@path")
    if urlsplit(url).query:
        components += ("@query",)
    if body:
        components += ("content-digest",)
    signer = HTTPMessageSigner(signature_algorithm=algorithms.ED25519,
                               key_resolver=MappingKeyResolver(public_keys={}, private_keys={key_id: key}))
    signer.sign(msg, key_id=key_id, created=datetime.now(UTC), nonce=secrets.token_urlsafe(16),
                covered_component_ids=components, label="sig1", body=body or None)
    return msg.headers


def curl_command(method: str, url: str, headers: dict[str, str], body: bytes | None) -> str:
    """A shell-quoted curl command line sending exactly this request."""
    parts = ["curl", "-s", "-X", method.upper()]
    for k, v in headers.items():
        parts += ["-H", f"{k}: {v}"]
    if body:
        parts += ["--data-binary", body.decode()]
    parts.append(url)
    return " ".join(shlex.quote(p) for p in parts)
