"""Canonical encoding and hash chaining of audit events.

Contract (stable: external verifiers and other store backends depend on it):

* ``canonical_bytes(event)`` is the JSON object of every `AuditEvent` field except
  ``hash`` (so it includes ``seq`` and ``prev_hash``), with sorted keys, separators
  ``","``/``":"``, ASCII-only output (non-ASCII as ``\\uXXXX`` escapes) and no NaN or
  infinity. Floats are rendered by Python's shortest round-trip ``repr``.
* ``chain_hash(prev_hash, event)`` is the lowercase hex SHA-256 of
  ``prev_hash.encode("ascii") + canonical_bytes(event)``.
* The first event's ``prev_hash`` is `GENESIS_HASH` (64 zeros).
* A checkpoint signs ``f"{seq}:{hash}:{ts!r}"`` (see `checkpoint_message`).

`normalize_event` must run before an event is chained: it rounds ``ts`` to microseconds
and ``latency_ms`` to 3 decimals, coerces fields to their declared types and turns
``extra`` into plain JSON values, so the value a store keeps and reads back is exactly
the value that was hashed.
"""

from __future__ import annotations

import hashlib
import json
import json.encoder
import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from portcullis.audit.events import AuditEvent

GENESIS_HASH = "0" * 64

# Field groups of AuditEvent by declared type; the writer-owned fields are excluded
# because normalization runs before they are assigned.
STR_FIELDS: tuple[str, ...] = (
    "kind", "request_id", "decision", "reason", "method", "host", "path", "route",
    "client_ip", "user_agent", "subject", "tenant", "credential_id", "credential_kind", "client_id",
)
INT_FIELDS: tuple[str, ...] = ("status", "bytes_in", "bytes_out")
FLOAT_FIELDS: tuple[str, ...] = ("ts", "latency_ms")
_HASHED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditEvent) if f.name != "hash")

# SQLite (and PostgreSQL BIGINT) integers are signed 64-bit.
_INT_MIN = -(2**63)
_INT_MAX = 2**63 - 1
# Deeper nesting in `extra` is stored as its string form rather than recursed into.
_MAX_EXTRA_DEPTH = 32


# Sorted field names with their JSON key prefix; names are ASCII identifiers.
_CANONICAL_PREFIXES: tuple[tuple[str, str], ...] = tuple((n, f'"{n}":') for n in sorted(_HASHED_FIELDS))
_escape = json.encoder.encode_basestring_ascii  # what json.dumps(ensure_ascii=True) uses for str


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def canonical_bytes(event: AuditEvent, extra_json: str | None = None) -> bytes:
    """The bytes that are hashed for `event`: every field but ``hash``, canonical JSON.

    `extra_json` may carry ``encode_extra(event.extra)`` when the caller has it already.
    Raises TypeError/ValueError if a field is not JSON-encodable (a normalized or
    correctly stored event never is).
    """
    # Byte-for-byte what `_dumps` of the field dict gives (a test holds the two equal),
    # built directly in sorted field order: this runs once per audited request.
    parts: list[str] = []
    for name, prefix in _CANONICAL_PREFIXES:
        value = getattr(event, name)
        kind = type(value)
        if kind is str:
            text = _escape(value)
        elif kind is int:
            text = int.__repr__(value)
        elif kind is float:
            if not math.isfinite(value):
                raise ValueError(f"audit event field {name!r} is not finite")
            text = float.__repr__(value)
        elif name == "extra" and extra_json is not None:
            text = extra_json
        else:
            text = _dumps(value)
        parts.append(prefix + text)
    return ("{" + ",".join(parts) + "}").encode("ascii")


def chain_hash(prev_hash: str, event: AuditEvent, extra_json: str | None = None) -> str:
    """Hex SHA-256 over ``prev_hash`` followed by ``canonical_bytes(event)``.

    Hashes the event exactly as given (no normalization), so a verifier hashes what
    is stored, not a cleaned-up version of it.
    """
    h = hashlib.sha256(prev_hash.encode("ascii", "backslashreplace"))
    h.update(canonical_bytes(event, extra_json))
    return h.hexdigest()


def checkpoint_message(seq: int, hash_: str, ts: float) -> bytes:
    """The bytes a checkpoint signature covers: ``f"{seq}:{hash}:{ts!r}"``."""
    return f"{seq}:{hash_}:{ts!r}".encode("ascii", "backslashreplace")


def encode_extra(extra: Mapping[str, Any]) -> str:
    """Canonical JSON text of a normalized ``extra``; what a store keeps in its column."""
    return _dumps(extra) if extra else "{}"


def _clean_str(value: object) -> str:
    if type(value) is str:
        if value.isascii():  # fast path: the common case on the request path
            return value
        s = value
    elif value is None:
        return ""
    else:
        try:
            s = str(value)
        except Exception:
            # Total by design: an unprintable value must not make an event unrecordable.
            s = f"<unprintable {type(value).__name__}>"
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape-decoded headers) cannot be stored
        # as UTF-8 text; keep them visible as escapes instead of failing the write.
        s = s.encode("utf-8", "backslashreplace").decode("utf-8")
    return s


def _jsonable(value: Any, depth: int) -> Any:
    """`value` as plain JSON data (dict/list/str/int/float/bool/None); total, never raises."""
    kind = type(value)
    if kind is str:
        return _clean_str(value)
    if value is None or kind is bool or kind is int:  # bool cannot be subclassed
        return value
    if isinstance(value, int):
        return int(value)  # drops int subclasses such as IntEnum
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else repr(float(value))
    if isinstance(value, str):
        return _clean_str(value)
    if depth >= _MAX_EXTRA_DEPTH:
        return _clean_str(repr(value))
    if isinstance(value, Mapping):
        return {_clean_str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if isinstance(value, (set, frozenset)):
        # Sets have no order; sort by representation so the stored order is deterministic.
        return sorted((_jsonable(v, depth + 1) for v in value), key=repr)
    return _clean_str(value)


def normalize_extra(extra: Mapping[str, Any]) -> dict[str, Any]:
    """``extra`` as plain JSON data: non-str keys and unknown values become strings,
    non-finite floats become their ``repr``, tuples and sets become lists."""
    return {_clean_str(k): _jsonable(v, 1) for k, v in extra.items()}


def normalize_event(event: AuditEvent) -> AuditEvent:
    """Normalize `event` in place (and return it) so it is stored exactly as hashed.

    Raises ValueError if the event cannot be recorded faithfully: a non-finite or
    non-numeric ``ts``/``latency_ms``, a non-integer or out-of-range integer field, or
    an ``extra`` that is not a mapping. Idempotent.
    """
    for name in FLOAT_FIELDS:
        raw = getattr(event, name)
        try:
            num = float(raw)
        except (TypeError, ValueError):
            raise ValueError(f"audit event field {name!r} is not a number") from None
        if not math.isfinite(num):
            raise ValueError(f"audit event field {name!r} is not finite")
        # `+ 0.0` turns -0.0 into 0.0: SQLite stores integral REALs as integers and
        # would hand back 0.0, whose repr (and so the hash) differs from "-0.0".
        setattr(event, name, round(num, 6 if name == "ts" else 3) + 0.0)
    for name in INT_FIELDS:
        raw = getattr(event, name)
        if isinstance(raw, float) and not raw.is_integer():
            raise ValueError(f"audit event field {name!r} is not an integer")
        try:
            num_i = int(raw)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"audit event field {name!r} is not an integer") from None
        if not _INT_MIN <= num_i <= _INT_MAX:
            raise ValueError(f"audit event field {name!r} is out of the 64-bit range")
        setattr(event, name, num_i)
    for name in STR_FIELDS:
        setattr(event, name, _clean_str(getattr(event, name)))
    if not isinstance(event.extra, Mapping):
        raise ValueError("audit event field 'extra' is not a mapping")
    event.extra = normalize_extra(event.extra)
    return event
