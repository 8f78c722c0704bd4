"""`auth_server:` in the config file. Lifetimes are bounded by the security rules:
access tokens 5-15 minutes (DESIGN.md), codes at most 60 s (issue 4)."""

from __future__ import annotations

from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class LoginThrottleConfig(BaseModel):
    """Credential-stuffing and brute-force defence (see identity/throttle.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Failures per account before delays start, and the delay growth (doubling, capped).
    free_failures_per_account: int = Field(default=3, ge=1, le=100)
    max_delay_seconds: float = Field(default=30.0, ge=1.0, le=3600.0)
    # After this many failures the account is locked for `lock_seconds`; the lock lifts by
    # itself (so an attacker cannot lock a victim out indefinitely) and a passkey login is
    # never blocked by it.
    lock_after_failures: int = Field(default=10, ge=3, le=1000)
    lock_seconds: float = Field(default=900.0, ge=10.0, le=86400.0)
    # Per source IP: failures per window before that IP is slowed.
    free_failures_per_ip: int = Field(default=20, ge=1, le=100_000)
    ip_window_seconds: float = Field(default=600.0, ge=10.0, le=86400.0)


class AuthServerConfig(BaseModel):
    """The authorization server mounted on the gateway's origin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The public base URL: the `iss` of every token and the prefix of every endpoint.
    issuer: str = Field(pattern=r"^https?://[^/?#]+$")
    signing_alg: Literal["ES256", "EdDSA"] = "ES256"
    # A new signing key every `key_rotation_days`; the old one stays published until
    # every token it signed has expired.
    key_rotation_days: float = Field(default=30.0, gt=0, le=365)
    access_token_lifetime_seconds: int = Field(default=600, ge=300, le=900)
    id_token_lifetime_seconds: int = Field(default=300, ge=60, le=3600)
    code_lifetime_seconds: int = Field(default=60, ge=5, le=60)
    par_lifetime_seconds: int = Field(default=60, ge=10, le=600)
    refresh_idle_seconds: int = Field(default=14 * 86400, ge=300, le=365 * 86400)
    refresh_absolute_seconds: int = Field(default=90 * 86400, ge=300, le=3 * 365 * 86400)
    session_idle_seconds: int = Field(default=3600, ge=60, le=30 * 86400)
    session_absolute_seconds: int = Field(default=12 * 3600, ge=300, le=90 * 86400)
    # Every client must use PAR (RFC 9126 §5); a client can also be required to alone.
    require_par: bool = False
    # Demand a DPoP-Nonce at the token endpoint (RFC 9449 §8).
    dpop_nonce_required: bool = False
    # The claim carrying the tenant in issued tokens (the gateway reads the same claim).
    tenant_claim: str = Field(default="tenant", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # Default `aud` of access tokens when the client names no resource (RFC 8707).
    default_audience: str | None = None
    # Resources a client may name (RFC 8707 §2); the issuer URL is always allowed.
    resources: list[str] = Field(default_factory=list, max_length=100)
    login_throttle: LoginThrottleConfig = LoginThrottleConfig()

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        # RFC 8414 §2 / OIDC Discovery §3: the issuer is an https URL; plain http only on
        # loopback, for development and the demo (cookies cannot be Secure there).
        host = urlsplit(v).hostname or ""
        if v.startswith("http://") and host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError("the issuer must use https (http only for 127.0.0.1, ::1 or localhost)")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _lifetimes(self) -> AuthServerConfig:
        if self.refresh_idle_seconds > self.refresh_absolute_seconds:
            raise ValueError("refresh_idle_seconds cannot exceed refresh_absolute_seconds")
        if self.session_idle_seconds > self.session_absolute_seconds:
            raise ValueError("session_idle_seconds cannot exceed session_absolute_seconds")
        return self

    @property
    def audience(self) -> str:
        return self.default_audience or self.issuer
