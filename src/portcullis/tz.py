"""Time zones named in the config."""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def iana_zone(name: str) -> str:
    """`name` if it is an IANA time zone this machine knows; ValueError (for a pydantic
    validator: the message names what to write instead) otherwise."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin' or 'UTC')") from None
    return name
