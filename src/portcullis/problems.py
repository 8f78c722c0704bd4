"""RFC 9457 problem details: every refusal the gateway makes is one of these.

A `Problem` carries a stable `type` URI (one per kind of refusal, documented in
docs/problems.md), the HTTP status, a client-safe `detail`, and a `reason` code that
lands in the audit event but is never sent to the client: reasons tell apart, say, an
unknown key from a wrong secret, which would be an oracle for an attacker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

PROBLEM_BASE = "https://portcullis.dev/problems/"
PROBLEM_CONTENT_TYPE = b"application/problem+json"

#: Stable problem types: slug -> title. The slug is the last segment of the type URI.
PROBLEM_TITLES: dict[str, str] = {
    "bad-request": "Ambiguous or malformed request",
    "payload-too-large": "Request body too large",
    "headers-too-large": "Request headers too large",
    "not-found": "No such route",
    "method-not-allowed": "Method not allowed on this route",
    "unauthenticated": "Authentication required",
    "invalid-credential": "Invalid credential",
    "insufficient-scope": "Insufficient scope",
    "insufficient-user-authentication": "Stronger or more recent authentication required",
    "forbidden": "Forbidden",
    "tenant-mismatch": "Resource belongs to another tenant",
    "rate-limited": "Too many requests",
    "bad-gateway": "Upstream unavailable",
    "gateway-timeout": "Upstream timed out",
    "service-unavailable": "Gateway temporarily unavailable",
    "internal-error": "Internal gateway error",
}


@dataclass(slots=True)
class Problem:
    """A refusal. `reason` is the audit reason code (e.g. ``auth.key_revoked``)."""

    status: int
    slug: str
    reason: str
    detail: str
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.slug not in PROBLEM_TITLES:  # a programming error, caught by tests
            raise ValueError(f"unknown problem slug {self.slug!r}")

    @property
    def type_uri(self) -> str:
        return PROBLEM_BASE + self.slug

    def body(self, request_id: str) -> bytes:
        """The JSON body; contains nothing but client-safe fields."""
        doc = {
            "type": self.type_uri,
            "title": PROBLEM_TITLES[self.slug],
            "status": self.status,
            "detail": self.detail,
            "request_id": request_id,
        }
        return json.dumps(doc, separators=(",", ":")).encode()


def bearer_challenge(error: str | None = None, description: str | None = None,
                     scope: str | None = None) -> tuple[bytes, bytes]:
    """A `WWW-Authenticate: Bearer` header value per RFC 6750 §3.

    `error` is one of ``invalid_request``, ``invalid_token``, ``insufficient_scope``
    (§3.1); no `error` when the request carried no credential at all (§3.1, last paragraph).
    """
    parts = ['realm="portcullis"']
    if error:
        parts.append(f'error="{error}"')
    if description:
        # quoted-string: the descriptions we emit never contain '"' or '\'.
        parts.append(f'error_description="{description}"')
    if scope:
        parts.append(f'scope="{scope}"')
    return (b"www-authenticate", ("Bearer " + ", ".join(parts)).encode())
