"""Governance of who may do what: four-eyes changes, just-in-time access, break-glass.

Contracts:
- A change (role assignment, role removal, policy change) is *requested* by one admin
  and takes effect only when a *different* admin, allowed to approve by the config,
  approves it before it expires. Approval applies the change in the same transaction
  (a request goes from ``pending`` straight to ``applied``); two concurrent approvals of
  one request apply it exactly once. Neither the requester nor the principal who would
  gain the role may approve.
- Just-in-time (JIT) access is a role assignment request with a duration: once approved
  the role is held until approval time + duration (at most `jit_max_seconds`) and lapses
  by itself: every query filters on the current time, no background job is needed.
- Break-glass grants a role at once, without approval, for at most
  `break_glass_max_seconds`; it writes an audit event of kind ``alert``, logs at error
  level and calls the `alerts` hooks. It cannot grant the approver role.
- A policy change writes the new Cedar file (temp file + fsync + rename) only if the
  file still has the content the request was based on; otherwise it is refused as stale.
- Every step, and every refused attempt to approve, reject, revoke or break glass, is an
  audit event; a change whose audit event cannot be written does not happen.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, Self

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from portcullis.audit.events import AuditEvent
from portcullis.governance.store import (
    GOVERNANCE_DB,
    REQUEST_KINDS,
    ChangeRequest,
    GovernanceStore,
    RequestKind,
    RequestStatus,
    RoleAssignment,
    new_id,
)

log = logging.getLogger("portcullis.governance")

TENANT_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")
PRINCIPAL_PATTERN = re.compile(r"[A-Za-z0-9_.:@|/+=~-]{1,256}")
ROLE_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
ACTOR_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,100}")
POLICY_FILE_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,94}\.cedar")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
ID_PATTERN = re.compile(r"(req|ra)_[0-9a-f]{12}")
MAX_REASON = 500
MAX_POLICY_BYTES = 256 * 1024


# -- config ------------------------------------------------------------------------------


class GovernanceConfig(BaseModel):
    """`governance:` in the gateway config. Approvals are refused (fail closed) until
    `approvers` or `approver_role` names someone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_ttl_seconds: int = Field(default=86400, ge=60, le=30 * 86400,
                                     description="How long a request waits for approval unless told otherwise.")
    max_request_ttl_seconds: int = Field(default=7 * 86400, ge=60, le=30 * 86400)
    jit_max_seconds: int = Field(default=8 * 3600, ge=60, le=7 * 86400,
                                 description="The longest a just-in-time role is held after approval.")
    break_glass_max_seconds: int = Field(default=3600, ge=60, le=86400,
                                         description="The longest a break-glass role is held.")
    approvers: tuple[str, ...] = Field(default=(), description="Admin names that may approve.")
    approver_role: str | None = Field(default=None,
                                      description="Or anyone holding this role in `approver_tenant`.")
    approver_tenant: str = "platform"
    break_glass_actors: tuple[str, ...] = Field(
        default=(), description="Who may break glass, besides anyone who may approve.")
    policy_dir: str | None = Field(default=None,
                                   description="Where approved policy changes are written (relative: to the config).")
    cache_seconds: float = Field(default=1.0, ge=0, le=60,
                                 description="How long `active_roles` serves a snapshot before checking the revision.")

    @field_validator("approvers", "break_glass_actors")
    @classmethod
    def _names(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for name in v:
            if not ACTOR_PATTERN.fullmatch(name):
                raise ValueError(f"invalid admin name {name!r}: 1-100 of A-Z a-z 0-9 _ . : @ -")
        return v

    @field_validator("approver_role")
    @classmethod
    def _role(cls, v: str | None) -> str | None:
        if v is not None and not ROLE_PATTERN.fullmatch(v):
            raise ValueError(f"invalid role {v!r}: 1-100 of A-Z a-z 0-9 _ . : -")
        return v

    @field_validator("approver_tenant")
    @classmethod
    def _tenant(cls, v: str) -> str:
        if not TENANT_PATTERN.fullmatch(v):
            raise ValueError(f"invalid tenant {v!r}: 1-100 of A-Z a-z 0-9 _ . -")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.request_ttl_seconds > self.max_request_ttl_seconds:
            raise ValueError("request_ttl_seconds must not exceed max_request_ttl_seconds")
        return self

    def resolved(self, base: Path) -> GovernanceConfig:
        """A copy with `policy_dir` made absolute against `base` (the config's directory)."""
        if self.policy_dir is None or Path(self.policy_dir).is_absolute():
            return self
        return self.model_copy(update={"policy_dir": str((base / self.policy_dir).resolve())})


# -- errors, collaborators -----------------------------------------------------------------


class GovernanceError(Exception):
    """A refused governance step; `reason` is the audit reason code."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class NotFoundError(GovernanceError):
    """No such request or assignment."""


class ForbiddenError(GovernanceError):
    """The actor may not do this (self-approval, not an approver, ...)."""


class InvalidRequestError(GovernanceError):
    """The input is malformed or out of bounds."""


class ConflictError(GovernanceError):
    """The state does not allow it: not pending, expired, stale."""


class AuditSink(Protocol):
    """Where governance events go (the data directory's `SqliteAuditStore`)."""

    def append_batch(self, events: list[AuditEvent]) -> list[AuditEvent]: ...


@dataclass(frozen=True, slots=True)
class Alert:
    """Raised by break-glass; the gateway may forward it to signed webhooks."""

    kind: str  # "governance.break_glass"
    ts: float
    tenant: str
    principal: str
    role: str
    actor: str
    reason: str
    expires_at: float
    assignment_id: str


AlertHook = Callable[[Alert], None]
PolicyCheck = Callable[[str, str], Sequence[str]]
"""(file name, Cedar text) -> problems; empty means acceptable."""


def cedar_syntax_problems(name: str, text: str) -> list[str]:
    """The default `PolicyCheck`: the text must parse as Cedar policies. (The gateway
    passes a check against its Cedar schema instead.)"""
    import cedarpy

    try:
        cedarpy.policies_to_json_str(text)
    except ValueError as exc:
        return [f"{name}: {exc}"]
    return []


# -- small helpers -------------------------------------------------------------------------


def _check(pattern: re.Pattern[str], value: object, what: str, hint: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidRequestError(f"{what}: {value!r} is not valid ({hint})", "governance.invalid")
    return value


def _actor(value: object, what: str = "actor") -> str:
    return _check(ACTOR_PATTERN, value, what, "1-100 of A-Z a-z 0-9 _ . : @ -")


def _tenant(value: object) -> str:
    return _check(TENANT_PATTERN, value, "tenant", "1-100 of A-Z a-z 0-9 _ . -")


def _principal(value: object) -> str:
    return _check(PRINCIPAL_PATTERN, value, "principal", "1-256 of A-Z a-z 0-9 _ . : @ | / + = ~ -")


def _role(value: object) -> str:
    return _check(ROLE_PATTERN, value, "role", "1-100 of A-Z a-z 0-9 _ . : -")


def _reason(value: object, *, required: bool = False) -> str:
    if not isinstance(value, str) or len(value) > MAX_REASON or any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequestError(f"reason: at most {MAX_REASON} printable characters", "governance.invalid")
    if required and not value.strip():
        raise InvalidRequestError("reason: required", "governance.invalid")
    return value


def _seconds(value: object, what: str, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(f"{what}: a positive number of seconds", "governance.invalid")
    if value > maximum:
        raise InvalidRequestError(f"{what}: {value:g}s exceeds the maximum of {maximum}s",
                                  "governance.duration_exceeds_max")
    return math.ceil(value)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_policy_file(path: Path) -> bytes | None:
    """The file's bytes, None if absent. Refuses symlinks and non-regular files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvalidRequestError(f"{path.name}: cannot read ({exc.strerror}; symlinks are refused)",
                                  "governance.invalid") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise InvalidRequestError(f"{path.name}: not a regular file", "governance.invalid")
        return f.read()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so readers see the old or the new content, never a
    mix: a temp file in the same directory, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


@dataclass(frozen=True, slots=True)
class _Snapshot:
    revision: int
    standing: dict[tuple[str, str], frozenset[str]]
    timed: dict[tuple[str, str], tuple[tuple[str, float], ...]]


_EMPTY: frozenset[str] = frozenset()


# -- the service ---------------------------------------------------------------------------


class Governance:
    """Four-eyes requests, JIT and break-glass over a `GovernanceStore`; safe to share
    between threads. All times are wall-clock seconds from `clock` (inject one in tests)."""

    def __init__(
        self,
        store: GovernanceStore,
        cfg: GovernanceConfig,
        audit: AuditSink,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        alerts: Sequence[AlertHook] = (),
        policy_check: PolicyCheck = cedar_syntax_problems,
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        self._store = store
        self._cfg = cfg
        self._audit_sink = audit
        self._clock = clock
        self._monotonic = monotonic
        self.alerts: list[AlertHook] = list(alerts)
        self._policy_check = policy_check
        self._on_close = list(on_close)
        self._lock = threading.Lock()
        self._snapshot = _Snapshot(-1, {}, {})
        self._next_check = -math.inf

    @property
    def config(self) -> GovernanceConfig:
        return self._cfg

    @property
    def store(self) -> GovernanceStore:
        return self._store

    def close(self) -> None:
        self._store.close()
        for fn in self._on_close:
            fn()

    # -- audit -----------------------------------------------------------------------

    def _event(self, action: str, actor: str, *, tenant: str = "", decision: str = "allow",
               kind: str = "admin", extra: Mapping[str, object] | None = None) -> AuditEvent:
        return AuditEvent(ts=self._clock(), kind=kind, request_id=secrets.token_hex(8), decision=decision,
                          reason=action, subject=actor, tenant=tenant, credential_kind="governance",
                          extra=dict(extra or {}))

    def _write_audit(self, events: list[AuditEvent]) -> None:
        self._audit_sink.append_batch(events)

    def _deny(self, action: str, actor: str, exc: GovernanceError, facts: Mapping[str, object]) -> None:
        """Audit a refused step; the refusal stands even if this write fails."""
        try:
            self._write_audit([self._event(exc.reason, actor, decision="deny",
                                           extra={"action": action, **facts, "error": str(exc)})])
        except Exception as err:  # the caller raises the refusal anyway
            log.error("governance: cannot audit a refused %s: %s", action, type(err).__name__)

    @staticmethod
    def _request_facts(req: ChangeRequest) -> dict[str, object]:
        p = req.payload
        facts: dict[str, object] = {"change_id": req.id, "change_kind": req.kind, "requested_by": req.requested_by}
        for k in ("tenant", "principal", "role", "duration", "file", "base_sha256", "sha256"):
            if k in p:
                facts[k] = p[k]
        if req.reason:
            facts["change_reason"] = req.reason
        return facts

    # -- who may do what ------------------------------------------------------------------

    def _holds_approver_role(self, conn: sa.Connection, name: str, now: float) -> bool:
        role = self._cfg.approver_role
        return role is not None and bool(self._store.active_for(conn, self._cfg.approver_tenant, name, role, now))

    def may_approve(self, name: str) -> bool:
        """Whether `name` may approve, by the config's list or the approver role (read fresh)."""
        if name in self._cfg.approvers:
            return True
        with self._store.read() as conn:
            return self._holds_approver_role(conn, name, self._clock())

    def _may_approve(self, conn: sa.Connection, name: str, now: float) -> bool:
        return name in self._cfg.approvers or self._holds_approver_role(conn, name, now)

    # -- requests ---------------------------------------------------------------------

    def _policy_path(self, name: object) -> Path:
        fname = _check(POLICY_FILE_PATTERN, name, "file", "a plain name ending in .cedar, no directories")
        if self._cfg.policy_dir is None:
            raise InvalidRequestError("no policy directory configured (governance.policy_dir)",
                                      "governance.policy_dir_unset")
        return Path(self._cfg.policy_dir) / fname

    def current_policy_sha256(self, name: str) -> str | None:
        """The sha256 of the policy file as it is now; None if it does not exist."""
        data = read_policy_file(self._policy_path(name))
        return None if data is None else hashlib.sha256(data).hexdigest()

    def _normalize(self, kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        if kind not in REQUEST_KINDS:
            raise InvalidRequestError(f"kind: one of {', '.join(REQUEST_KINDS)}", "governance.invalid")
        if not isinstance(payload, Mapping):
            raise InvalidRequestError("payload: a mapping", "governance.invalid")
        allowed = {"role_assignment": {"tenant", "principal", "role", "duration"},
                   "role_removal": {"tenant", "principal", "role"},
                   "policy_change": {"file", "text", "base_sha256", "sha256"}}[kind]
        unknown = set(payload) - allowed
        if unknown:
            raise InvalidRequestError(f"payload: unknown field(s) {', '.join(sorted(unknown))}", "governance.invalid")
        if kind != "policy_change":
            out: dict[str, Any] = {"tenant": _tenant(payload.get("tenant")),
                                   "principal": _principal(payload.get("principal")),
                                   "role": _role(payload.get("role"))}
            if payload.get("duration") is not None:
                out["duration"] = _seconds(payload["duration"], "duration", self._cfg.jit_max_seconds)
            return out
        path = self._policy_path(payload.get("file"))
        text = payload.get("text")
        if not isinstance(text, str) or len(text.encode("utf-8", "surrogatepass")) > MAX_POLICY_BYTES:
            raise InvalidRequestError(f"text: Cedar policy text of at most {MAX_POLICY_BYTES} bytes",
                                      "governance.invalid")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequestError("text: not valid Unicode", "governance.invalid") from None
        base = payload.get("base_sha256")
        if base is not None:
            _check(SHA256_PATTERN, base, "base_sha256", "64 lowercase hex digits, or null for a new file")
        new = sha256_text(text)
        if payload.get("sha256") is not None and payload["sha256"] != new:
            raise InvalidRequestError("sha256: does not match the text", "governance.invalid")
        problems = list(self._policy_check(path.name, text))
        if problems:
            raise InvalidRequestError("policy rejected: " + "; ".join(problems)[:2000], "governance.policy_invalid")
        return {"file": path.name, "text": text, "base_sha256": base, "sha256": new}

    def request(self, kind: RequestKind, payload: Mapping[str, Any], requested_by: str,
                ttl: float | None = None, *, reason: str = "") -> ChangeRequest:
        """File a change for a second admin to approve within `ttl` seconds (default
        `request_ttl_seconds`, at most `max_request_ttl_seconds`).

        Payloads: role_assignment ``{tenant, principal, role[, duration]}`` (a duration
        makes it JIT); role_removal ``{tenant, principal, role}``; policy_change ``{file,
        text, base_sha256}`` where base_sha256 is the sha256 of the file's content the
        change is based on (None: the file must not exist yet). InvalidRequestError on
        bad input, ConflictError if already stale (held role, nothing to remove, file changed).
        """
        actor = _actor(requested_by, "requested_by")
        why = _reason(reason)
        ttl_s = self._cfg.request_ttl_seconds if ttl is None else \
            _seconds(ttl, "ttl", self._cfg.max_request_ttl_seconds)
        norm = self._normalize(kind, payload)
        now = self._clock()
        req = ChangeRequest(id=new_id("req"), kind=kind, payload=norm, requested_by=actor, requested_at=now,
                            expires_at=now + ttl_s, status="pending", reason=why)
        with self._store.write() as conn:
            if kind == "role_assignment":
                held = self._store.active_for(conn, norm["tenant"], norm["principal"], norm["role"], now)
                if any(a.kind == "standing" for a in held):
                    raise ConflictError(f"{norm['principal']} already holds {norm['role']} in {norm['tenant']}",
                                        "governance.already_held")
            elif kind == "role_removal":
                if not self._store.active_for(conn, norm["tenant"], norm["principal"], norm["role"], now):
                    raise ConflictError(f"{norm['principal']} does not hold {norm['role']} in {norm['tenant']}",
                                        "governance.not_held")
            elif self.current_policy_sha256(norm["file"]) != norm["base_sha256"]:
                raise ConflictError(f"{norm['file']} has changed since the request was based on it",
                                    "governance.stale")
            self._store.insert_request(conn, req)
            self._store.bump(conn)
            self._write_audit([self._event("governance.requested", actor, tenant=norm.get("tenant", ""),
                                           extra={**self._request_facts(req), "expires_at": req.expires_at})])
        self._invalidate()
        return req

    def request_role(self, tenant: str, principal: str, role: str, requested_by: str, *,
                     ttl: float | None = None, reason: str = "") -> ChangeRequest:
        """A standing role assignment, once approved."""
        return self.request("role_assignment", {"tenant": tenant, "principal": principal, "role": role},
                            requested_by, ttl, reason=reason)

    def request_removal(self, tenant: str, principal: str, role: str, requested_by: str, *,
                        ttl: float | None = None, reason: str = "") -> ChangeRequest:
        """Remove every active assignment of the role, once approved."""
        return self.request("role_removal", {"tenant": tenant, "principal": principal, "role": role},
                            requested_by, ttl, reason=reason)

    def request_jit(self, tenant: str, principal: str, role: str, *, duration: float, requested_by: str,
                    reason: str, ttl: float | None = None) -> ChangeRequest:
        """Just-in-time access: once approved, the role is held for `duration` seconds
        (at most `jit_max_seconds`) from the approval. A reason is required."""
        _reason(reason, required=True)
        _seconds(duration, "duration", self._cfg.jit_max_seconds)
        return self.request("role_assignment", {"tenant": tenant, "principal": principal, "role": role,
                                                "duration": duration}, requested_by, ttl, reason=reason)

    def request_policy_change(self, file: str, text: str, requested_by: str, *, ttl: float | None = None,
                              reason: str = "", base_sha256: str | None = None,
                              based_on_current: bool = True) -> ChangeRequest:
        """Replace (or create) policy `file` with `text`. By default the change is based on
        the file as it is now; pass `based_on_current=False` and `base_sha256` to base it
        on a version the author saw (refused as stale if the file differs already)."""
        base = self.current_policy_sha256(file) if based_on_current else base_sha256
        return self.request("policy_change", {"file": file, "text": text, "base_sha256": base},
                            requested_by, ttl, reason=reason)

    # -- decisions ----------------------------------------------------------------------

    def approve(self, request_id: str, approver: str) -> ChangeRequest:
        """Approve and apply a pending, unexpired request; returns it as applied.

        ForbiddenError: the approver is the requester, the principal who would gain the
        role, or not allowed to approve. ConflictError: not pending, expired (it is then
        marked expired) or stale (it is then marked rejected). NotFoundError.
        """
        actor = _actor(approver, "approver")
        try:
            rid = _check(ID_PATTERN, request_id, "request id", "req_ and 12 hex digits")
            return self._approve(rid, actor)
        except GovernanceError as exc:
            self._deny("approve", actor, exc, {"change_id": str(request_id)[:64]})
            raise

    def _approve(self, request_id: str, actor: str) -> ChangeRequest:
        now = self._clock()
        refusal: GovernanceError | None = None
        result: ChangeRequest | None = None
        undo: Callable[[], None] | None = None
        try:
            with self._store.write() as conn:
                req = self._store.get_request(conn, request_id)
                if req is None:
                    raise NotFoundError(f"no request {request_id}", "governance.not_found")
                if req.status != "pending":
                    raise ConflictError(f"request {request_id} is {req.status}", "governance.not_pending")
                if req.requested_by == actor:
                    raise ForbiddenError("four eyes: the requester cannot approve their own request",
                                         "governance.self_approval")
                if req.kind != "policy_change" and req.payload["principal"] == actor:
                    raise ForbiddenError("four eyes: the principal cannot approve their own role",
                                         "governance.self_approval")
                if not self._may_approve(conn, actor, now):
                    raise ForbiddenError(f"{actor} may not approve (governance.approvers / approver_role)",
                                         "governance.not_approver")
                facts = self._request_facts(req)
                if req.expires_at <= now:
                    self._store.decide(conn, req.id, "expired", by=None, at=now, reason="expired")
                    self._store.bump(conn)
                    self._write_audit([self._event("governance.expired", actor, tenant=req.payload.get("tenant", ""),
                                                   extra={**facts, "expires_at": req.expires_at})])
                    refusal = ConflictError(f"request {request_id} expired", "governance.request_expired")
                else:
                    result, undo, refusal = self._apply(conn, req, actor, now, facts)
        except BaseException:
            if undo is not None:
                undo()
            raise
        self._invalidate()
        if refusal is not None:
            raise refusal
        assert result is not None
        return result

    def _stale(self, conn: sa.Connection, req: ChangeRequest, err: GovernanceError, *, actor: str, now: float,
               facts: dict[str, object]) -> GovernanceError:
        """Close a request that can never apply (rejected, with the reason) and return the refusal."""
        self._store.decide(conn, req.id, "rejected", by=actor, at=now, reason=err.reason)
        self._store.bump(conn)
        self._write_audit([self._event("governance.rejected", actor, tenant=req.payload.get("tenant", ""),
                                       extra={**facts, "rejected_by": actor, "decision_reason": err.reason,
                                              "error": str(err)})])
        return err

    def _apply(self, conn: sa.Connection, req: ChangeRequest, actor: str, now: float, facts: dict[str, object],
               ) -> tuple[ChangeRequest | None, Callable[[], None] | None, GovernanceError | None]:
        p = req.payload
        applied_facts: dict[str, object] = {**facts, "approved_by": actor}
        undo: Callable[[], None] | None = None
        if req.kind == "role_assignment":
            duration = p.get("duration")
            expires = None if duration is None else now + min(float(duration), self._cfg.jit_max_seconds)
            a = RoleAssignment(id=new_id("ra"), tenant=p["tenant"], principal=p["principal"], role=p["role"],
                               kind="standing" if duration is None else "jit", granted_by=req.requested_by,
                               approved_by=actor, request_id=req.id, reason=req.reason, granted_at=now,
                               expires_at=expires)
            self._store.insert_assignment(conn, a)
            applied_facts |= {"assignment_id": a.id, "assignment_kind": a.kind, "expires_at": expires}
        elif req.kind == "role_removal":
            held = self._store.active_for(conn, p["tenant"], p["principal"], p["role"], now)
            if not held:
                return None, None, self._stale(conn, req, actor=actor, now=now, facts=facts, err=ConflictError(
                    f"{p['principal']} no longer holds {p['role']} in {p['tenant']}", "governance.stale"))
            for a in held:
                self._store.revoke_assignment(conn, a.id, at=now, by=actor)
            applied_facts["revoked"] = [a.id for a in held]
        else:
            try:
                path = self._policy_path(p["file"])
                old = read_policy_file(path)
            except GovernanceError as err:
                return None, None, self._stale(conn, req, err, actor=actor, now=now, facts=facts)
            current = None if old is None else hashlib.sha256(old).hexdigest()
            if current != p["base_sha256"]:
                return None, None, self._stale(conn, req, actor=actor, now=now, facts=facts, err=ConflictError(
                    f"{p['file']} has changed since the request was made; request the change again",
                    "governance.stale"))
            problems = list(self._policy_check(path.name, p["text"]))
            if problems:
                return None, None, self._stale(conn, req, actor=actor, now=now, facts=facts, err=ConflictError(
                    "policy rejected: " + "; ".join(problems)[:2000], "governance.policy_invalid"))
            mode = 0o644 if old is None else stat.S_IMODE(os.stat(path).st_mode)
            data = p["text"].encode("utf-8")

            def restore() -> None:
                try:
                    if old is None:
                        path.unlink(missing_ok=True)
                    else:
                        write_atomic(path, old, mode)
                except OSError as exc:
                    log.error("governance: cannot restore %s after a failed approval: %s", path, exc.strerror)

            undo = restore
        if not self._store.decide(conn, req.id, "applied", by=actor, at=now, reason=None):
            raise ConflictError(f"request {req.id} is no longer pending", "governance.not_pending")
        self._store.bump(conn)
        tenant = p.get("tenant", "")
        try:
            if req.kind == "policy_change":
                write_atomic(path, data, mode)
            self._write_audit([
                self._event("governance.approved", actor, tenant=tenant, extra={**facts, "approved_by": actor}),
                self._event("governance.applied", actor, tenant=tenant, extra=applied_facts),
            ])
        except BaseException:
            if undo is not None:
                undo()
            raise
        done = self._store.get_request(conn, req.id)
        assert done is not None
        return done, undo, None

    def reject(self, request_id: str, actor: str, reason: str = "") -> ChangeRequest:
        """Close a pending request unapplied: an approver rejects it, or its requester
        withdraws it. ForbiddenError, ConflictError (not pending), NotFoundError."""
        who = _actor(actor)
        try:
            rid = _check(ID_PATTERN, request_id, "request id", "req_ and 12 hex digits")
            why = _reason(reason)
            now = self._clock()
            with self._store.write() as conn:
                req = self._store.get_request(conn, rid)
                if req is None:
                    raise NotFoundError(f"no request {rid}", "governance.not_found")
                if req.status != "pending":
                    raise ConflictError(f"request {rid} is {req.status}", "governance.not_pending")
                if who != req.requested_by and not self._may_approve(conn, who, now):
                    raise ForbiddenError(f"{who} may not reject (only an approver or the requester)",
                                         "governance.not_approver")
                self._store.decide(conn, rid, "rejected", by=who, at=now, reason=why)
                self._store.bump(conn)
                self._write_audit([self._event("governance.rejected", who, tenant=req.payload.get("tenant", ""),
                                               extra={**self._request_facts(req), "rejected_by": who,
                                                      "decision_reason": why})])
                done = self._store.get_request(conn, rid)
        except GovernanceError as exc:
            self._deny("reject", who, exc, {"change_id": str(request_id)[:64]})
            raise
        self._invalidate()
        assert done is not None
        return done

    def expire_due(self, now: float | None = None) -> list[ChangeRequest]:
        """Mark every pending request past its expiry as expired (audited); returns them."""
        at = self._clock() if now is None else now
        with self._store.write() as conn:
            due = self._store.due_requests(conn, at)
            if not due:
                return []
            for req in due:
                self._store.decide(conn, req.id, "expired", by=None, at=at, reason="expired")
            self._store.bump(conn)
            self._write_audit([self._event("governance.expired", "system", tenant=r.payload.get("tenant", ""),
                                           extra={**self._request_facts(r), "expires_at": r.expires_at})
                               for r in due])
        self._invalidate()
        return [replace(r, status="expired", decided_by=None, decided_at=at, decision_reason="expired") for r in due]

    # -- break-glass and revocation --------------------------------------------------------

    def break_glass(self, tenant: str, principal: str, role: str, *, duration: float, actor: str,
                    reason: str) -> RoleAssignment:
        """Grant a role at once, without approval, for at most `break_glass_max_seconds`;
        raises an alert (audit event of kind ``alert``, an error log line, the `alerts` hooks).

        ForbiddenError if `actor` is neither in `break_glass_actors` nor an approver, or
        the role is the approver role. InvalidRequestError on a missing reason or too long
        a duration.
        """
        who = _actor(actor)
        facts: dict[str, object] = {"tenant": str(tenant)[:100], "principal": str(principal)[:256],
                                    "role": str(role)[:100]}
        try:
            t, p, r = _tenant(tenant), _principal(principal), _role(role)
            why = _reason(reason, required=True)
            secs = _seconds(duration, "duration", self._cfg.break_glass_max_seconds)
            if t == self._cfg.approver_tenant and r == self._cfg.approver_role:
                raise ForbiddenError("break-glass cannot grant the approver role", "governance.forbidden_role")
            now = self._clock()
            a = RoleAssignment(id=new_id("ra"), tenant=t, principal=p, role=r, kind="break_glass", granted_by=who,
                               approved_by=None, request_id=None, reason=why, granted_at=now, expires_at=now + secs)
            with self._store.write() as conn:
                if who not in self._cfg.break_glass_actors and not self._may_approve(conn, who, now):
                    raise ForbiddenError(f"{who} may not break glass (governance.break_glass_actors)",
                                         "governance.not_break_glass_actor")
                self._store.insert_assignment(conn, a)
                self._store.bump(conn)
                extra = {**facts, "assignment_id": a.id, "duration": secs, "expires_at": a.expires_at,
                         "break_glass_reason": why}
                self._write_audit([
                    self._event("governance.break_glass", who, tenant=t, extra=extra),
                    self._event("governance.break_glass", who, tenant=t, kind="alert", extra=extra),
                ])
        except GovernanceError as exc:
            self._deny("break_glass", who, exc, facts)
            raise
        self._invalidate()
        assert a.expires_at is not None
        log.error("break-glass: %s granted role %s to %s in tenant %s for %ss (assignment %s): %s",
                  who, r, p, t, secs, a.id, why)
        alert = Alert(kind="governance.break_glass", ts=now, tenant=t, principal=p, role=r, actor=who, reason=why,
                      expires_at=a.expires_at, assignment_id=a.id)
        for hook in list(self.alerts):
            try:
                hook(alert)
            except Exception as exc:  # a broken webhook must not undo the grant
                log.error("governance: alert hook failed: %s", type(exc).__name__)
        return a

    def revoke(self, assignment_id: str, actor: str, reason: str = "") -> RoleAssignment:
        """End an active assignment at once (no second person needed to take access
        away). Allowed to approvers and to whoever granted it. NotFoundError,
        ConflictError (not active), ForbiddenError."""
        who = _actor(actor)
        try:
            aid = _check(ID_PATTERN, assignment_id, "assignment id", "ra_ and 12 hex digits")
            why = _reason(reason)
            now = self._clock()
            with self._store.write() as conn:
                a = self._store.get_assignment(conn, aid)
                if a is None:
                    raise NotFoundError(f"no assignment {aid}", "governance.not_found")
                if not a.active_at(now):
                    raise ConflictError(f"assignment {aid} is {a.status(now)}", "governance.not_active")
                if who != a.granted_by and not self._may_approve(conn, who, now):
                    raise ForbiddenError(f"{who} may not revoke (only an approver or the grantor)",
                                         "governance.not_approver")
                self._store.revoke_assignment(conn, aid, at=now, by=who)
                self._store.bump(conn)
                self._write_audit([self._event("governance.revoked", who, tenant=a.tenant, extra={
                    "assignment_id": aid, "assignment_kind": a.kind, "principal": a.principal, "role": a.role,
                    "granted_by": a.granted_by, "revoke_reason": why})])
                done = self._store.get_assignment(conn, aid)
        except GovernanceError as exc:
            self._deny("revoke", who, exc, {"assignment_id": str(assignment_id)[:64]})
            raise
        self._invalidate()
        assert done is not None
        return done

    # -- reads ----------------------------------------------------------------------------

    def get_request(self, request_id: str) -> ChangeRequest:
        rid = _check(ID_PATTERN, request_id, "request id", "req_ and 12 hex digits")
        with self._store.read() as conn:
            req = self._store.get_request(conn, rid)
        if req is None:
            raise NotFoundError(f"no request {rid}", "governance.not_found")
        return req

    def requests(self, status: RequestStatus | None = None) -> list[ChangeRequest]:
        """Requests as stored (`ChangeRequest.status_at` shows a lapsed pending one as expired)."""
        return self._store.requests(status)

    def assignments(self, *, active_only: bool = False) -> list[RoleAssignment]:
        return self._store.assignments(active_at=self._clock() if active_only else None)

    def revision(self) -> int:
        """Bumped by every change; poll it to know when to rebuild Cedar entities."""
        return self._store.revision()

    def _invalidate(self) -> None:
        self._next_check = -math.inf

    def _current(self) -> _Snapshot:
        t = self._monotonic()
        if t < self._next_check:
            return self._snapshot
        with self._lock:
            if t < self._next_check:
                return self._snapshot
            rev = self._store.revision()
            if rev != self._snapshot.revision:
                with self._store.read() as conn:
                    rev = self._store.revision(conn)
                    rows = self._store.active_all(conn, self._clock())
                standing: dict[tuple[str, str], set[str]] = {}
                timed: dict[tuple[str, str], list[tuple[str, float]]] = {}
                for a in rows:
                    key = (a.tenant, a.principal)
                    if a.expires_at is None:
                        standing.setdefault(key, set()).add(a.role)
                    else:
                        timed.setdefault(key, []).append((a.role, a.expires_at))
                self._snapshot = _Snapshot(rev, {k: frozenset(v) for k, v in standing.items()},
                                           {k: tuple(v) for k, v in timed.items()})
            self._next_check = t + self._cfg.cache_seconds
            return self._snapshot

    def active_roles(self, tenant: str, principal_id: str, now: float | None = None) -> frozenset[str]:
        """The roles `principal_id` holds in `tenant` at `now` (default: the clock).

        Served from a snapshot rebuilt when the store's revision changes (checked at
        most every `cache_seconds`; at once after a change made through this object).
        Time-bound roles are filtered on every call, so they lapse on time."""
        snap = self._current()
        key = (tenant, principal_id)
        standing = snap.standing.get(key, _EMPTY)
        timed = snap.timed.get(key)
        if not timed:
            return standing
        at = self._clock() if now is None else now
        live = [role for role, exp in timed if exp > at]
        return standing.union(live) if live else standing


def governance_db_path(data_dir: Path) -> Path:
    return data_dir / GOVERNANCE_DB


def open_governance(data_dir: Path, cfg: GovernanceConfig, *, clock: Callable[[], float] = time.time,
                    alerts: Sequence[AlertHook] = (), policy_check: PolicyCheck = cedar_syntax_problems,
                    ) -> Governance:
    """Governance over the data directory's `governance.db` and audit log (both
    created if absent); `close()` closes both."""
    from portcullis.gateway import open_audit_store

    audit = open_audit_store(data_dir)
    try:
        store = GovernanceStore(governance_db_path(data_dir))
    except BaseException:
        audit.close()
        raise
    return Governance(store, cfg, audit, clock=clock, alerts=alerts, policy_check=policy_check,
                      on_close=[audit.close])
