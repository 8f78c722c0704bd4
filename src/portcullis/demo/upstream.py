"""The demo SaaS API that sits behind the gateway in `portcullis demo`, and a way to serve it.

`DemoApi` is a framework-free ASGI 3 application over in-memory data seeded deterministically for the
tenants ``acme`` and ``globex``. It is the *upstream*: it trusts the gateway and does no authentication or
authorisation of its own. To make what the gateway passes on visible, every response carries
``x-demo-upstream: 1`` and the project listing echoes the forwarding headers it received.

Routes (anything else is 404; a known path with another method is 405 with ``Allow``)::

    GET    /bench                                   fixed ~200-byte JSON, for load tests
    GET    /v1/health                               {"status": "ok"}
    GET    /v1/tenants/{tenant}/projects            {"tenant", "projects", "seen_by_upstream"}
    POST   /v1/tenants/{tenant}/projects            JSON {"name", "description"?} -> 201 project
    GET    /v1/tenants/{tenant}/projects/{id}       project or 404
    DELETE /v1/tenants/{tenant}/projects/{id}       204 or 404
    GET    /v1/tenants/{tenant}/invoices            {"tenant", "invoices"}
    GET    /v1/tenants/{tenant}/users/{id}          user or 404

An unknown tenant is 404. Every response body is JSON (``application/json``, UTF-8) with
``content-length`` set, except 204, which has no body and (per RFC 9110) no ``content-length``.

`build_server` makes a quiet uvicorn server for any ASGI app; `UpstreamThread` runs one in a background
thread with its own event loop (uvicorn installs signal handlers only from the main thread, so the
host process keeps its own Ctrl-C/SIGTERM handling).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, TypeAlias

import uvicorn

__all__ = [
    "DEMO_TENANTS",
    "MAX_BODY_BYTES",
    "ASGIApp",
    "DemoApi",
    "Invoice",
    "Message",
    "Project",
    "Receive",
    "Scope",
    "Send",
    "UpstreamThread",
    "User",
    "build_server",
]

Scope: TypeAlias = dict[str, Any]
Message: TypeAlias = dict[str, Any]
Receive: TypeAlias = Callable[[], Awaitable[Message]]
Send: TypeAlias = Callable[[Message], Awaitable[None]]
ASGIApp: TypeAlias = Callable[[Scope, Receive, Send], Awaitable[None]]

_log = logging.getLogger(__name__)

#: The tenants the demo data is seeded for.
DEMO_TENANTS: Final[tuple[str, ...]] = ("acme", "globex")
#: Largest accepted request body, in bytes; larger is 413.
MAX_BODY_BYTES: Final[int] = 64 * 1024
#: Bounds on a created project's fields, in characters.
MAX_NAME_CHARS: Final[int] = 200
MAX_DESCRIPTION_CHARS: Final[int] = 2000
#: The request headers echoed by the project listing as ``seen_by_upstream``.
ECHOED_HEADERS: Final[tuple[str, ...]] = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
)
#: How long `UpstreamThread.start` / `stop` wait by default, in seconds.
DEFAULT_TIMEOUT: Final[float] = 10.0

_FIRST_CREATED_ID: Final[int] = 0x00001000
_PROJECT_FIELDS: Final[frozenset[str]] = frozenset({"name", "description"})


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Project:
    """A tenant's project."""

    id: str
    name: str
    description: str
    created_at: str


@dataclass(frozen=True, slots=True)
class Invoice:
    """A tenant's invoice; deliberately full of personal and payment data the gateway may redact."""

    id: str
    amount_cents: int
    currency: str
    status: str
    customer_email: str
    card_last4: str
    tax_id: str
    billing_address: str


@dataclass(frozen=True, slots=True)
class User:
    """A member of a tenant; ``role`` is ``tenant-admin`` or ``member``."""

    id: str
    email: str
    name: str
    role: str


_SEED_PROJECTS: Final[dict[str, tuple[Project, ...]]] = {
    "acme": (
        Project(
            "prj_ac000001",
            "Roadrunner Tracker",
            "Telemetry for the desert bird-detection pipeline.",
            "2024-01-15T09:30:00Z",
        ),
        Project(
            "prj_ac000002",
            "Rocket Skates v2",
            "Firmware for rocket-powered footwear.",
            "2024-02-03T14:05:00Z",
        ),
        Project(
            "prj_ac000003",
            "Anvil Logistics",
            "Delivery routing for heavy goods, mostly downwards.",
            "2024-03-21T08:00:00Z",
        ),
    ),
    "globex": (
        Project(
            "prj_9b000001",
            "Hammock District",
            "Campus planning for the Cypress Creek site.",
            "2024-01-22T10:00:00Z",
        ),
        Project(
            "prj_9b000002",
            "Project Volcano",
            "Geothermal research, strictly peaceful.",
            "2024-02-14T16:45:00Z",
        ),
        Project(
            "prj_9b000003", "Monorail Ops", "Scheduling for the campus monorail.", "2024-04-02T11:15:00Z"
        ),
    ),
}

_SEED_INVOICES: Final[dict[str, tuple[Invoice, ...]]] = {
    "acme": (
        Invoice(
            "inv_ac000001",
            129900,
            "USD",
            "paid",
            "ap@coyote-industries.example",
            "4242",
            "US-12-3456789",
            "1 Mesa Road, Tucson, AZ 85701, US",
        ),
        Invoice(
            "inv_ac000002",
            4500,
            "USD",
            "open",
            "billing@desert-supply.example",
            "0005",
            "US-98-7654321",
            "77 Canyon Drive, Flagstaff, AZ 86001, US",
        ),
    ),
    "globex": (
        Invoice(
            "inv_9b000001",
            250000,
            "EUR",
            "paid",
            "finance@cypress-creek.example",
            "1881",
            "DE123456789",
            "Hauptstraße 1, 10115 Berlin, DE",
        ),
        Invoice(
            "inv_9b000002",
            99000,
            "EUR",
            "void",
            "accounts@scorpio-holdings.example",
            "4444",
            "FR12345678901",
            "12 Rue de la Paix, 75002 Paris, FR",
        ),
    ),
}

_SEED_USERS: Final[dict[str, tuple[User, ...]]] = {
    "acme": (
        User("usr_ac000001", "alice@acme.example", "Alice Anderson", "tenant-admin"),
        User("usr_ac000002", "bob@acme.example", "Bob Baker", "member"),
    ),
    "globex": (
        User("usr_9b000001", "carol@globex.example", "Carol Chen", "tenant-admin"),
        User("usr_9b000002", "dave@globex.example", "Dave Diaz", "member"),
    ),
}


@dataclass(slots=True)
class _Tenant:
    """One tenant's mutable data. Projects and users are keyed by id, in insertion order."""

    projects: dict[str, Project]
    invoices: tuple[Invoice, ...]
    users: dict[str, User]


# ----------------------------------------------------------------------------------------- routing


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


class _ClientGone(Exception):
    """The client disconnected before its request body was read."""


class _BadRequest(Exception):
    """A request body that is not acceptable; the message is client-safe."""


_ROUTE_METHODS: Final[dict[str, tuple[str, ...]]] = {
    "bench": ("GET",),
    "health": ("GET",),
    "projects": ("GET", "POST"),
    "project": ("GET", "DELETE"),
    "invoices": ("GET",),
    "user": ("GET",),
}


def _match(path: str) -> tuple[str, tuple[str, ...]] | None:
    """Map a path to ``(route, params)``; params are ``(tenant,)`` or ``(tenant, id)``. None: no route."""
    parts = path.split("/")
    if parts[0] != "" or any(p == "" for p in parts[1:]):
        return None
    parts = parts[1:]
    if parts == ["bench"]:
        return "bench", ()
    if parts == ["v1", "health"]:
        return "health", ()
    if len(parts) < 4 or parts[:2] != ["v1", "tenants"]:
        return None
    tenant, rest = parts[2], parts[3:]
    match rest:
        case ["projects"]:
            return "projects", (tenant,)
        case ["projects", item]:
            return "project", (tenant, item)
        case ["invoices"]:
            return "invoices", (tenant,)
        case ["users", item]:
            return "user", (tenant, item)
    return None


def _dumps(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _json(status: int, value: object, *headers: tuple[bytes, bytes]) -> _Response:
    return _Response(status, _dumps(value), headers)


def _error(status: int, code: str, message: str, *headers: tuple[bytes, bytes]) -> _Response:
    return _json(status, {"error": code, "message": message}, *headers)


_BENCH_BODY: Final[bytes] = _dumps(
    {
        "tenant": "acme",
        "project": {
            "id": "prj_bench001",
            "name": "Benchmark",
            "description": "A fixed response for load tests.",
            "created_at": "2024-01-01T00:00:00Z",
        },
        "items": [1, 2, 3, 4, 5, 6, 7, 8],
        "ok": True,
    }
)
_BENCH_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-type", b"application/json"),
    (b"content-length", str(len(_BENCH_BODY)).encode("ascii")),
    (b"x-demo-upstream", b"1"),
)


def _header(scope: Scope, name: bytes) -> str | None:
    """The value of request header `name` (lower-case); repeated fields are joined with ``", "``."""
    values = [v.decode("latin-1") for k, v in scope.get("headers", ()) if k == name]
    return ", ".join(values) if values else None


def _is_json_content_type(value: str | None) -> bool:
    """True for ``application/json``, optionally with ``charset=utf-8``; parameters are case-insensitive."""
    if value is None:
        return False
    media_type, *params = (p.strip().lower() for p in value.split(";"))
    if media_type != "application/json":
        return False
    for param in params:
        key, _, val = param.partition("=")
        if key.strip() == "charset" and val.strip().strip('"') not in ("utf-8", "utf8"):
            return False
    return True


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _BadRequest(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> object:
    raise _BadRequest(f"{name} is not valid JSON")


def _parse_json_object(body: bytes) -> dict[str, Any]:
    """Strict UTF-8 JSON object: no duplicate keys, no NaN/Infinity. Raises `_BadRequest`."""
    try:
        text = body.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise _BadRequest("body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"body is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise _BadRequest("body is nested too deeply") from None
    if not isinstance(value, dict):
        raise _BadRequest("body must be a JSON object")
    return value


def _checked_text(obj: dict[str, Any], field: str, max_chars: int, *, required: bool) -> str:
    """Field `field` of `obj` as a string of at most `max_chars` characters. Raises `_BadRequest`."""
    value = obj.get(field)
    if value is None:
        if required:
            raise _BadRequest(f"{field!r} is required")
        return ""
    if not isinstance(value, str):
        raise _BadRequest(f"{field!r} must be a string")
    if len(value) > max_chars:
        raise _BadRequest(f"{field!r} must be at most {max_chars} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _BadRequest(f"{field!r} contains an unpaired surrogate") from None
    return value


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it exceeds `limit` bytes. Raises `_ClientGone`."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _utcnow() -> datetime:
    return datetime.now(UTC)


# ------------------------------------------------------------------------------------------- app


class DemoApi:
    """The demo SaaS API as an ASGI 3 application over per-instance in-memory data.

    Each instance starts from the same deterministic seed (see `DEMO_TENANTS`, `project_ids`,
    `user_ids`); created projects get ids ``prj_<8 hex>`` from a per-instance counter. Not thread-safe:
    serve an instance from one event loop. `clock` supplies ``created_at`` for new projects (UTC).
    """

    def __init__(self, *, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock if clock is not None else _utcnow
        self._next_id = _FIRST_CREATED_ID
        self._tenants: dict[str, _Tenant] = {
            name: _Tenant(
                projects={p.id: p for p in _SEED_PROJECTS[name]},
                invoices=_SEED_INVOICES[name],
                users={u.id: u for u in _SEED_USERS[name]},
            )
            for name in DEMO_TENANTS
        }

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenant names, in seed order."""
        return tuple(self._tenants)

    def project_ids(self, tenant: str) -> list[str]:
        """The ids of `tenant`'s current projects, oldest first. Raises KeyError for an unknown tenant."""
        return list(self._tenants[tenant].projects)

    def user_ids(self, tenant: str) -> list[str]:
        """The ids of `tenant`'s users, in seed order. Raises KeyError for an unknown tenant."""
        return list(self._tenants[tenant].users)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI 3 entry point: serves ``http``; completes ``lifespan``; closes ``websocket``."""
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind == "websocket":
            await send({"type": "websocket.close", "code": 1000})
            return
        if kind != "http":
            return
        if scope["path"] == "/bench" and scope["method"] == "GET":  # the hot path, kept short
            await send({"type": "http.response.start", "status": 200, "headers": list(_BENCH_HEADERS)})
            await send({"type": "http.response.body", "body": _BENCH_BODY})
            return
        try:
            response = await self._handle(scope, receive)
        except _ClientGone:
            return
        except Exception:
            _log.exception("demo upstream: unhandled error on %s %s", scope.get("method"), scope.get("path"))
            response = _error(500, "internal_error", "internal error")
        await self._send(send, response)

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    async def _send(send: Send, response: _Response) -> None:
        headers: list[tuple[bytes, bytes]] = [(b"x-demo-upstream", b"1")]
        if response.status != 204:
            headers.append((b"content-type", b"application/json"))
            headers.append((b"content-length", str(len(response.body)).encode("ascii")))
        headers.extend(response.headers)
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _handle(self, scope: Scope, receive: Receive) -> _Response:
        matched = _match(scope["path"])
        if matched is None:
            return _error(404, "not_found", "no such route")
        route, params = matched
        method: str = scope["method"]
        allowed = _ROUTE_METHODS[route]
        if method not in allowed:
            allow = (b"allow", ", ".join(allowed).encode("ascii"))
            return _error(405, "method_not_allowed", f"use {', '.join(allowed)}", allow)
        if route == "bench":
            return _Response(200, _BENCH_BODY)
        if route == "health":
            return _json(200, {"status": "ok"})
        tenant_name = params[0]
        tenant = self._tenants.get(tenant_name)
        if tenant is None:
            return _error(404, "not_found", "no such tenant")
        match route, method:
            case "projects", "GET":
                seen = {name: _header(scope, name.encode("ascii")) for name in ECHOED_HEADERS}
                projects = [dataclasses.asdict(p) for p in tenant.projects.values()]
                return _json(200, {"tenant": tenant_name, "projects": projects, "seen_by_upstream": seen})
            case "projects", "POST":
                return await self._create_project(scope, receive, tenant_name, tenant)
            case "project", "GET":
                project = tenant.projects.get(params[1])
                if project is None:
                    return _error(404, "not_found", "no such project")
                return _json(200, dataclasses.asdict(project))
            case "project", "DELETE":
                if tenant.projects.pop(params[1], None) is None:
                    return _error(404, "not_found", "no such project")
                return _Response(204)
            case "invoices", "GET":
                invoices = [dataclasses.asdict(i) for i in tenant.invoices]
                return _json(200, {"tenant": tenant_name, "invoices": invoices})
            case "user", "GET":
                user = tenant.users.get(params[1])
                if user is None:
                    return _error(404, "not_found", "no such user")
                return _json(200, dataclasses.asdict(user))
        raise AssertionError(f"unrouted {method} {route}")  # pragma: no cover - _ROUTE_METHODS is exhaustive

    async def _create_project(
        self, scope: Scope, receive: Receive, tenant_name: str, tenant: _Tenant
    ) -> _Response:
        """POST body checks in order: 415 media type, 413 size, 400 JSON and fields; then 201 + Location."""
        if not _is_json_content_type(_header(scope, b"content-type")):
            return _error(415, "unsupported_media_type", "content-type must be application/json")
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, "payload_too_large", f"body must be at most {MAX_BODY_BYTES} bytes")
        body = await _read_body(receive, MAX_BODY_BYTES)
        if body is None:
            return _error(413, "payload_too_large", f"body must be at most {MAX_BODY_BYTES} bytes")
        try:
            obj = _parse_json_object(body)
            unknown = sorted(set(obj) - _PROJECT_FIELDS)
            if unknown:
                raise _BadRequest(f"unknown field(s): {', '.join(unknown)}")
            name = _checked_text(obj, "name", MAX_NAME_CHARS, required=True)
            if not name.strip():
                raise _BadRequest("'name' must not be blank")
            description = _checked_text(obj, "description", MAX_DESCRIPTION_CHARS, required=False)
        except _BadRequest as exc:
            return _error(400, "invalid_request", str(exc))
        project = Project(
            self._new_project_id(),
            name,
            description,
            self._clock().astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        tenant.projects[project.id] = project
        location = f"/v1/tenants/{tenant_name}/projects/{project.id}".encode()
        return _json(201, dataclasses.asdict(project), (b"location", location))

    def _new_project_id(self) -> str:
        """A ``prj_<8 hex>`` id not used by any tenant."""
        while True:
            candidate = f"prj_{self._next_id:08x}"
            self._next_id += 1
            if all(candidate not in t.projects for t in self._tenants.values()):
                return candidate


# ----------------------------------------------------------------------------------------- serving


def build_server(app: ASGIApp, host: str, port: int) -> uvicorn.Server:
    """A quiet uvicorn server for `app` on `host`:`port` (not started).

    httptools, uvloop when importable (else asyncio), lifespan off, no access log, log level warning.
    It does not reconfigure logging (``log_config=None``) nor rewrite the client address from
    ``X-Forwarded-*`` (``proxy_headers=False``): forwarding headers reach `app` untouched.
    """
    loop = "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop=loop,
        http="httptools",
        lifespan="off",
        log_level="warning",
        log_config=None,
        access_log=False,
        proxy_headers=False,
    )
    return uvicorn.Server(config)


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _free_port(host: str) -> int:
    """A port on `host` that was free a moment ago (bound with port 0, then released)."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


class UpstreamThread:
    """Serves an ASGI app (by default a fresh `DemoApi`) with uvicorn in a daemon thread with its own loop.

    `port` is fixed at construction: 0 means "pick a free port now", so `.port` and `.url` are valid
    before `start`. `start` binds the socket in the calling thread (raising OSError if it cannot) and
    returns once the server accepts connections; `stop` shuts it down and joins the thread. Usable as a
    context manager. One-shot: a stopped instance cannot be started again.
    """

    def __init__(self, app: ASGIApp | None = None, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.app: ASGIApp = app if app is not None else DemoApi()
        self.host = host
        self.port = port if port != 0 else _free_port(host)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:54321``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def is_alive(self) -> bool:
        """True while the server thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Start serving; return once accepting. Raises RuntimeError if already started, if the server
        dies during startup, or if it is not up within `timeout` seconds (it is then stopped)."""
        if self._thread is not None:
            raise RuntimeError("UpstreamThread can only be started once")
        sock = socket.socket(_family(self.host), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except BaseException:
            sock.close()
            raise
        server = build_server(self.app, self.host, self.port)
        thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"portcullis-demo-upstream:{self.port}", daemon=True
        )
        self._server, self._thread = server, thread
        thread.start()
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError(f"demo upstream exited during startup: {self._error!r}")
            if time.monotonic() >= deadline:
                self.stop(timeout)
                raise RuntimeError(f"demo upstream did not start within {timeout} s")
            time.sleep(0.005)

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn exits startup failures with SystemExit
            self._error = exc
        finally:
            sock.close()

    def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Ask the server to exit and join its thread (forcing exit after `timeout` s). Idempotent; a no-op
        if never started. Raises RuntimeError if the thread is still alive after a forced exit."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
            if thread.is_alive():
                raise RuntimeError("demo upstream thread did not stop")

    def __enter__(self) -> UpstreamThread:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
