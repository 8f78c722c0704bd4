"""Placeholder: replaced by the tokens area (see service.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from portcullis.oauth.service import AuthContext


def install(ctx: AuthContext) -> None:
    """Register this area's routes, grants and hooks on `ctx`."""
