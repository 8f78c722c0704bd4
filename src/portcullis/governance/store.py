"""Governance state (SQLAlchemy 2 Core): role assignments, change requests and a
revision counter, in the gateway's data directory (`governance.db`, 0600, WAL) or in the
shared database the data directory is bound to (PostgreSQL, `portcullis.storage.engine`).

The store is plain persistence; the rules (four eyes, bounds, expiry) live in
`portcullis.governance.service`. Every write goes through `write()`, which serializes
writers from its first statement — SQLite: ``BEGIN IMMEDIATE`` (the write lock);
PostgreSQL: ``SELECT ... FOR UPDATE`` on the revision row, which every writer takes
first — so a read-check-update inside it cannot race another writer, in this process,
another one, or on another node.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from portcullis.storage.engine import StorageConfig, external_engine, make_engine, sqlite_file_url

GOVERNANCE_DB = "governance.db"

RequestKind = Literal["role_assignment", "role_removal", "policy_change"]
# Approval applies a change in the same transaction, so requests go pending -> applied;
# "approved" is reserved for a backend that applies changes in a later step.
RequestStatus = Literal["pending", "approved", "rejected", "expired", "applied"]
AssignmentKind = Literal["standing", "jit", "break_glass"]
REQUEST_KINDS: tuple[RequestKind, ...] = ("role_assignment", "role_removal", "policy_change")
REQUEST_STATUSES: tuple[RequestStatus, ...] = ("pending", "approved", "rejected", "expired", "applied")
ASSIGNMENT_KINDS: tuple[AssignmentKind, ...] = ("standing", "jit", "break_glass")

metadata = sa.MetaData()
role_assignments = sa.Table(
    "role_assignments",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(200), nullable=False),
    sa.Column("principal", sa.String(256), nullable=False),
    sa.Column("role", sa.String(100), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("granted_by", sa.String(100), nullable=False),
    sa.Column("approved_by", sa.String(100), nullable=True),
    sa.Column("request_id", sa.String(32), nullable=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("granted_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=True),
    sa.Column("revoked_at", sa.Float, nullable=True),
    sa.Column("revoked_by", sa.String(100), nullable=True),
    sa.Index("ix_role_assignments_subject", "tenant", "principal"),
)
change_requests = sa.Table(
    "change_requests",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("requested_by", sa.String(100), nullable=False),
    sa.Column("requested_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("decided_by", sa.String(100), nullable=True),
    sa.Column("decided_at", sa.Float, nullable=True),
    sa.Column("decision_reason", sa.Text, nullable=True),
    sa.Index("ix_change_requests_status", "status"),
)
revision_table = sa.Table(
    "governance_revision",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("revision", sa.Integer, nullable=False),
)


def new_id(prefix: str) -> str:
    """A short random id (``req_`` / ``ra_`` + 12 hex digits), easy to type in the CLI."""
    return f"{prefix}_{secrets.token_hex(6)}"


@dataclass(frozen=True, slots=True)
class RoleAssignment:
    """One grant of `role` to `principal` in `tenant`. Active at `now` when not revoked
    and `expires_at` is None (standing) or later than `now`."""

    id: str
    tenant: str
    principal: str
    role: str
    kind: AssignmentKind
    granted_by: str
    approved_by: str | None
    request_id: str | None
    reason: str
    granted_at: float
    expires_at: float | None
    revoked_at: float | None = None
    revoked_by: str | None = None

    def active_at(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def status(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.active_at(now) else "expired"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "tenant": self.tenant, "principal": self.principal, "role": self.role,
                "kind": self.kind, "granted_by": self.granted_by, "approved_by": self.approved_by,
                "request_id": self.request_id, "reason": self.reason, "granted_at": self.granted_at,
                "expires_at": self.expires_at, "revoked_at": self.revoked_at, "revoked_by": self.revoked_by}


@dataclass(frozen=True, slots=True)
class ChangeRequest:
    """A change waiting for (or past) a second admin's decision. `payload` is the
    validated, normalized change (see `portcullis.governance.service`)."""

    id: str
    kind: RequestKind
    payload: dict[str, Any] = field(hash=False)
    requested_by: str
    requested_at: float
    expires_at: float
    status: RequestStatus
    reason: str = ""
    decided_by: str | None = None
    decided_at: float | None = None
    decision_reason: str | None = None

    def status_at(self, now: float) -> RequestStatus:
        """The status, counting a pending request past its expiry as expired."""
        return "expired" if self.status == "pending" and self.expires_at <= now else self.status

    def to_dict(self, *, with_text: bool = True) -> dict[str, Any]:
        payload = dict(self.payload) if with_text else {k: v for k, v in self.payload.items() if k != "text"}
        return {"id": self.id, "kind": self.kind, "payload": payload, "requested_by": self.requested_by,
                "requested_at": self.requested_at, "expires_at": self.expires_at, "status": self.status,
                "reason": self.reason, "decided_by": self.decided_by, "decided_at": self.decided_at,
                "decision_reason": self.decision_reason}


def _assignment(row: sa.Row[Any]) -> RoleAssignment:
    m = row._mapping
    return RoleAssignment(
        id=m["id"], tenant=m["tenant"], principal=m["principal"], role=m["role"], kind=m["kind"],
        granted_by=m["granted_by"], approved_by=m["approved_by"], request_id=m["request_id"],
        reason=m["reason"] or "", granted_at=float(m["granted_at"]),
        expires_at=None if m["expires_at"] is None else float(m["expires_at"]),
        revoked_at=None if m["revoked_at"] is None else float(m["revoked_at"]), revoked_by=m["revoked_by"],
    )


def _request(row: sa.Row[Any]) -> ChangeRequest:
    m = row._mapping
    return ChangeRequest(
        id=m["id"], kind=m["kind"], payload=json.loads(m["payload"]), requested_by=m["requested_by"],
        requested_at=float(m["requested_at"]), expires_at=float(m["expires_at"]), status=m["status"],
        reason=m["reason"] or "", decided_by=m["decided_by"],
        decided_at=None if m["decided_at"] is None else float(m["decided_at"]),
        decision_reason=m["decision_reason"],
    )


def _active(now: float) -> sa.ColumnElement[bool]:
    c = role_assignments.c
    return sa.and_(c.revoked_at.is_(None), sa.or_(c.expires_at.is_(None), c.expires_at > now))


class GovernanceStore:
    """Role assignments and change requests in one SQLite file; safe to share between
    threads and to open from several processes (the gateway and the CLI)."""

    def __init__(self, path: Path, *, busy_timeout: float = 5.0, engine: sa.Engine | None = None,
                 storage: StorageConfig | None = None) -> None:
        self._path = path
        if engine is None and (bound := external_engine(path.parent, sqlite_explicit_begin=True)) is not None:
            engine, storage = bound
        if engine is not None:
            from portcullis.storage.migrations import ensure_schema

            self._engine = engine
            self._sqlite = engine.dialect.name == "sqlite"
            try:
                ensure_schema(engine, storage or StorageConfig(), ["governance"])
            except BaseException:
                engine.dispose()
                raise
        else:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Born 0600; SQLite gives the -wal and -shm files the database's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self._sqlite = True
            self._engine = make_engine(sqlite_file_url(path), StorageConfig(busy_timeout_seconds=busy_timeout),
                                       sqlite_explicit_begin=True)
        self._write_engine = self._engine.execution_options(portcullis_begin="IMMEDIATE")
        try:
            try:
                with self._write_engine.begin() as conn:
                    if self._sqlite:
                        metadata.create_all(conn)
                    if conn.execute(sa.select(revision_table.c.revision)).first() is None:
                        conn.execute(revision_table.insert().values(id=1, revision=0))
            except IntegrityError:
                pass  # another process inserted the row first
        except BaseException:
            self._engine.dispose()
            raise

    @property
    def path(self) -> Path:
        return self._path

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """One write transaction, holding the write lock from its start; commits on a
        normal exit, rolls back on an exception."""
        with self._write_engine.begin() as conn:
            if not self._sqlite:
                # Every writer locks the one revision row first: writers run one at a time.
                conn.execute(sa.select(revision_table.c.id).with_for_update())
            yield conn

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """One read snapshot."""
        with self._engine.begin() as conn:
            yield conn

    # -- revision ------------------------------------------------------------------

    @staticmethod
    def bump(conn: sa.Connection) -> None:
        """Count a change; pollers (the gateway's entity builder) refresh on a new value."""
        conn.execute(revision_table.update().values(revision=revision_table.c.revision + 1))

    def revision(self, conn: sa.Connection | None = None) -> int:
        if conn is not None:
            return int(conn.execute(sa.select(revision_table.c.revision)).scalar_one())
        with self._engine.connect() as c:
            return int(c.execute(sa.select(revision_table.c.revision)).scalar_one())

    # -- change requests -------------------------------------------------------------

    @staticmethod
    def insert_request(conn: sa.Connection, req: ChangeRequest) -> None:
        conn.execute(change_requests.insert().values(
            id=req.id, kind=req.kind, payload=json.dumps(req.payload, sort_keys=True, separators=(",", ":")),
            requested_by=req.requested_by, requested_at=req.requested_at, expires_at=req.expires_at,
            status=req.status, reason=req.reason,
        ))

    @staticmethod
    def get_request(conn: sa.Connection, request_id: str) -> ChangeRequest | None:
        row = conn.execute(sa.select(change_requests).where(change_requests.c.id == request_id)).first()
        return _request(row) if row is not None else None

    @staticmethod
    def decide(conn: sa.Connection, request_id: str, status: RequestStatus, *, by: str | None, at: float,
               reason: str | None) -> bool:
        """Move a *pending* request to `status`; False if it was no longer pending."""
        c = change_requests.c
        res = conn.execute(change_requests.update().where(c.id == request_id, c.status == "pending").values(
            status=status, decided_by=by, decided_at=at, decision_reason=reason))
        return res.rowcount == 1

    @staticmethod
    def due_requests(conn: sa.Connection, now: float) -> list[ChangeRequest]:
        c = change_requests.c
        rows = conn.execute(sa.select(change_requests).where(c.status == "pending", c.expires_at <= now)
                            .order_by(c.requested_at)).all()
        return [_request(r) for r in rows]

    def requests(self, status: RequestStatus | None = None) -> list[ChangeRequest]:
        c = change_requests.c
        q = sa.select(change_requests).order_by(c.requested_at, c.id)
        if status is not None:
            q = q.where(c.status == status)
        with self.read() as conn:
            return [_request(r) for r in conn.execute(q).all()]

    # -- role assignments --------------------------------------------------------------

    @staticmethod
    def insert_assignment(conn: sa.Connection, a: RoleAssignment) -> None:
        conn.execute(role_assignments.insert().values(
            id=a.id, tenant=a.tenant, principal=a.principal, role=a.role, kind=a.kind, granted_by=a.granted_by,
            approved_by=a.approved_by, request_id=a.request_id, reason=a.reason, granted_at=a.granted_at,
            expires_at=a.expires_at, revoked_at=a.revoked_at, revoked_by=a.revoked_by,
        ))

    @staticmethod
    def get_assignment(conn: sa.Connection, assignment_id: str) -> RoleAssignment | None:
        row = conn.execute(sa.select(role_assignments).where(role_assignments.c.id == assignment_id)).first()
        return _assignment(row) if row is not None else None

    @staticmethod
    def revoke_assignment(conn: sa.Connection, assignment_id: str, *, at: float, by: str) -> bool:
        """Revoke an assignment that is active at `at`; False if there is none."""
        c = role_assignments.c
        res = conn.execute(role_assignments.update().where(c.id == assignment_id, _active(at))
                           .values(revoked_at=at, revoked_by=by))
        return res.rowcount == 1

    @staticmethod
    def active_for(conn: sa.Connection, tenant: str, principal: str, role: str, now: float) -> list[RoleAssignment]:
        c = role_assignments.c
        rows = conn.execute(sa.select(role_assignments).where(
            c.tenant == tenant, c.principal == principal, c.role == role, _active(now)).order_by(c.granted_at)).all()
        return [_assignment(r) for r in rows]

    @staticmethod
    def active_all(conn: sa.Connection, now: float) -> list[RoleAssignment]:
        rows = conn.execute(sa.select(role_assignments).where(_active(now))).all()
        return [_assignment(r) for r in rows]

    def assignments(self, *, active_at: float | None = None) -> list[RoleAssignment]:
        """Every assignment ever made, or only those active at `active_at`."""
        c = role_assignments.c
        q = sa.select(role_assignments).order_by(c.granted_at, c.id)
        if active_at is not None:
            q = q.where(_active(active_at))
        with self.read() as conn:
            return [_assignment(r) for r in conn.execute(q).all()]

    def close(self) -> None:
        self._engine.dispose()
