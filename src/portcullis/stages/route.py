"""route: host + method + path template -> a route (DESIGN.md, request path step 3).

Templates are literal segments and ``{name}`` parameters, each matching exactly one
non-empty segment. The most specific match wins: a route bound to the request's host
beats a host-less one, then, segment by segment from the left, a literal beats a
parameter. Among the routes whose path matches, the most specific one that allows
the method is taken; a path that matches only routes of other methods is a 405 with
``Allow``; no path match is a 404.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from portcullis.exchange import Exchange
from portcullis.problems import Problem

_PARAM = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@%]+$")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
AUTH_METHODS = ("api_key", "jwt", "introspection")


class RouteConfig(BaseModel):
    """One route of the config. Cross-references (upstream, rate limit) are checked by
    `portcullis.config` once all names are known."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    path: str
    methods: list[str] = Field(min_length=1)
    upstream: str
    host: str | None = None
    public: bool = False
    auth: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=list)
    tenant_param: str | None = None
    rate_limit: str | None = None
    upstream_path: str | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=600)
    audience: str | None = Field(default=None, min_length=1, max_length=2048)  # tokens must name this `aud`
    require_signature: bool = False  # RFC 9421: every request must be signed by a known key
    sign_responses: bool = False  # RFC 9421: the gateway signs the upstream's answers
    # Step-up (RFC 9470): the token's `acr` must satisfy one of these classes, and its
    # `auth_time` be at most this old; otherwise 401 insufficient_user_authentication.
    acr_values: list[str] = Field(default_factory=list, max_length=10)
    max_auth_age_seconds: int | None = Field(default=None, ge=0, le=366 * 86400)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        out = [m.upper() for m in v]
        for m in out:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; expected one of {', '.join(METHODS)}")
        if len(set(out)) != len(out):
            raise ValueError("duplicate method")
        return out

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        parse_template(v)
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        return v.lower() if v else v

    @field_validator("auth")
    @classmethod
    def _auth(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in AUTH_METHODS:
                raise ValueError(f"unknown auth method {m!r}; expected one of {', '.join(AUTH_METHODS)}")
        if len(set(v)) != len(v):
            raise ValueError("duplicate auth method")
        return v


def parse_template(template: str) -> tuple[tuple[str, bool], ...]:
    """Segments of a path template as ``(text, is_param)``; ValueError if invalid."""
    if not template.startswith("/"):
        raise ValueError("path must start with '/'")
    if template == "/":
        return ()
    parts = template[1:].split("/")
    seen: set[str] = set()
    out: list[tuple[str, bool]] = []
    for part in parts:
        m = _PARAM.match(part)
        if m:
            name = m.group(1)
            if name in seen:
                raise ValueError(f"parameter {{{name}}} appears twice")
            seen.add(name)
            out.append((name, True))
        elif part in ("", ".", "..") or not _LITERAL.match(part) or "{" in part or "}" in part:
            raise ValueError(f"invalid path segment {part!r}")
        else:
            out.append((part, False))
    return tuple(out)


@dataclass(slots=True, eq=False)
class CompiledRoute:
    """A route ready for matching and for the stages that read it."""

    config: RouteConfig
    segments: tuple[tuple[str, bool], ...]
    methods: frozenset[str]
    specificity: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.config.name

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for (text, is_param), part in zip(self.segments, parts, strict=True):
            if is_param:
                if not part:
                    return None
                params[text] = part
            elif text != part:
                return None
        return params


class Router:
    """Matches (host, method, path) to a route. Built once; lookups allocate little."""

    def __init__(self, routes: list[RouteConfig]) -> None:
        compiled = []
        for r in routes:
            segs = parse_template(r.path)
            spec = (1 if r.host else 0, *[0 if p else 1 for _, p in segs])
            compiled.append(CompiledRoute(r, segs, frozenset(r.methods), spec))
        # Most specific first; stable for equal specificity (config order).
        compiled.sort(key=lambda c: c.specificity, reverse=True)
        self._by_len: dict[int, list[CompiledRoute]] = {}
        for c in compiled:
            self._by_len.setdefault(len(c.segments), []).append(c)

    def resolve(self, host: str, method: str, path: str) -> tuple[CompiledRoute, dict[str, str]] | list[str]:
        """The route and its parameters, or the methods allowed on this path (empty: 404)."""
        parts = [] if path == "/" else path[1:].split("/")
        allowed: set[str] = set()
        for c in self._by_len.get(len(parts), ()):
            if c.config.host is not None and c.config.host != host:
                continue
            params = c.match(parts)
            if params is None:
                continue
            if method in c.methods or (method == "HEAD" and "GET" in c.methods):
                return c, params
            allowed |= c.methods
        if "GET" in allowed:
            allowed.add("HEAD")  # GET routes serve HEAD too (RFC 9110 §9.3.2)
        return sorted(allowed)


class RouteStage:
    """Finds the route; 404/405 problems otherwise."""

    name: ClassVar[str] = "route"

    def __init__(self, router: Router) -> None:
        self._router = router

    async def on_request(self, ex: Exchange) -> Problem | None:
        host = ex.host.split(":", 1)[0] if not ex.host.startswith("[") else ex.host.split("]", 1)[0] + "]"
        found = self._router.resolve(host, ex.method, ex.path)
        if isinstance(found, list):
            if not found:
                return Problem(404, "not-found", "route.not_found", "No route matches this path.")
            return Problem(
                405,
                "method-not-allowed",
                "route.method_not_allowed",
                f"Method {ex.method} is not allowed here.",
                headers=[(b"allow", ", ".join(found).encode())],
            )
        ex.route, ex.path_params = found
        return None
