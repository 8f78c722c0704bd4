"""The identity cookies: a session and a half-finished login ("flow"). HttpOnly,
SameSite=Lax, Path=/; under https also Secure with the `__Host-` prefix, which pins the
cookie to this exact origin (RFC 6265bis §4.1.3.2)."""

from __future__ import annotations

SESSION = "pc_session"
FLOW = "pc_login"


def is_secure(issuer: str) -> bool:
    return issuer.startswith("https://")


def cookie_name(base: str, issuer: str) -> str:
    return f"__Host-{base}" if is_secure(issuer) else base


def set_cookie(base: str, value: str, issuer: str, max_age: int) -> tuple[str, str]:
    attrs = f"{cookie_name(base, issuer)}={value}; Path=/; HttpOnly; SameSite=Lax; Max-Age={max_age}"
    return ("set-cookie", attrs + ("; Secure" if is_secure(issuer) else ""))


def clear_cookie(base: str, issuer: str) -> tuple[str, str]:
    return set_cookie(base, "", issuer, 0)
