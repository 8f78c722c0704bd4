"""Authentication context classes (`acr`, OpenID Connect Core §2) that Portcullis's
authorization server asserts, weakest first, and how they compare. Lives below both the
authorization server (which issues them) and the gateway stages (which check them for
RFC 9470 step-up)."""

from __future__ import annotations

ACR_PASSWORD = "urn:portcullis:acr:pwd"  # noqa: S105 - a URN, not a secret
ACR_MFA = "urn:portcullis:acr:mfa"
ACR_PHISHING_RESISTANT = "urn:portcullis:acr:phr"
ACR_ORDER: tuple[str, ...] = (ACR_PASSWORD, ACR_MFA, ACR_PHISHING_RESISTANT)


def acr_satisfies(have: str | None, want: str) -> bool:
    """True when context class `have` is at least as strong as `want` (unknown: False)."""
    if have not in ACR_ORDER or want not in ACR_ORDER:
        return False
    return ACR_ORDER.index(have) >= ACR_ORDER.index(want)
