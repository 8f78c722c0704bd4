"""TLS termination at the gateway: the server context and client certificates.

TLS 1.2 is the minimum; with TLS 1.2 only AEAD suites with forward secrecy are offered
(ECDHE with AES-GCM or ChaCha20-Poly1305); TLS 1.3 suites are all AEAD. Client
certificates (RFC 8705 mutual TLS) are requested when `client_ca_file` is set and
verified against it: Python's `ssl` cannot request a certificate without verifying
it, so self-signed client certificates (RFC 8705 §2.2) must be added to that bundle.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

AEAD_CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!RC4:!3DES:!SHA1"


class TlsConfig(BaseModel):
    """`server.tls`: TLS termination, optional client certificates, HSTS."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: str
    key_file: str
    min_version: Literal["1.2", "1.3"] = "1.2"
    client_ca_file: str | None = None
    client_certificates: Literal["none", "optional", "required"] = "none"
    hsts_max_age_seconds: int = Field(default=31_536_000, ge=0, le=63_072_000)
    hsts_include_subdomains: bool = False
    handshake_timeout_seconds: float = Field(default=10.0, ge=0.5, le=120.0)

    @model_validator(mode="after")
    def _check(self) -> TlsConfig:
        if self.client_certificates != "none" and self.client_ca_file is None:
            raise ValueError("client_certificates needs client_ca_file (the CAs client certificates must chain to)")
        return self

    def resolve(self, base: Path | None) -> TlsConfig:
        """Relative file names resolve against the config file's directory."""
        def r(p: str | None) -> str | None:
            if p is None or base is None or Path(p).is_absolute():
                return p
            return str((base / p).resolve())

        return self.model_copy(update={"cert_file": r(self.cert_file), "key_file": r(self.key_file),
                                       "client_ca_file": r(self.client_ca_file)})

    def hsts(self) -> bytes:
        value = f"max-age={self.hsts_max_age_seconds}"
        if self.hsts_include_subdomains:
            value += "; includeSubDomains"
        return value.encode()


def server_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The listening socket's context; raises OSError/ssl.SSLError on unusable files."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(AEAD_CIPHERS_TLS12)  # TLS 1.2 list; TLS 1.3 suites are AEAD by definition
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"server.tls: cannot load {cfg.cert_file} / {cfg.key_file}: {exc}") from None
    if cfg.client_ca_file is not None and cfg.client_certificates != "none":
        try:
            ctx.load_verify_locations(cfg.client_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ValueError(f"server.tls: cannot load client_ca_file {cfg.client_ca_file}: {exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if cfg.client_certificates == "required" else ssl.CERT_OPTIONAL
    return ctx


def tls_extension(transport: Any) -> dict[str, Any] | None:
    """The ASGI TLS extension (asgiref "TLS extension") for a connection, or None.

    `client_cert_der` (bytes) is added beside the spec's PEM chain: the binding check
    hashes the DER form (RFC 8705 §3.1, ``x5t#S256``).
    """
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    cipher = ssl_object.cipher()
    return {
        "tls_version": {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}.get(ssl_object.version() or ""),
        "cipher_suite": cipher[0] if cipher else None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_der": der,
        "client_cert_error": None,
    }


def cert_thumbprint(der: bytes) -> str:
    """RFC 8705 §3.1: base64url(SHA-256(DER certificate)), unpadded: the ``x5t#S256`` value."""
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
