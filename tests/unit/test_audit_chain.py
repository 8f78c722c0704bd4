"""Canonical encoding and hash chaining (portcullis.audit.chain)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portcullis.audit.chain import (
    GENESIS_HASH,
    canonical_bytes,
    chain_hash,
    checkpoint_message,
    normalize_event,
)
from portcullis.audit.events import AuditEvent


def make_event(**overrides: Any) -> AuditEvent:
    base: dict[str, Any] = {
        "ts": 1714564800.123456, "kind": "request", "request_id": "req-1", "decision": "allow",
        "reason": "ok", "method": "GET", "host": "api.example.com", "path": "/v1/items",
        "route": "items", "status": 200, "bytes_in": 10, "bytes_out": 20, "latency_ms": 3.25,
        "client_ip": "203.0.113.9", "user_agent": "curl/8", "subject": "alice", "tenant": "acme",
        "credential_id": "k1", "credential_kind": "api_key", "client_id": "c1",
        "extra": {"b": 1, "a": [1, 2]}, "seq": 7, "prev_hash": "ab" * 32,
    }
    base.update(overrides)
    return AuditEvent(**base)


def test_genesis_is_64_zeros() -> None:
    assert GENESIS_HASH == "0" * 64


def test_canonical_bytes_is_pinned_format() -> None:
    # Pinned byte-for-byte: external verifiers and other backends rely on this format.
    ev = AuditEvent(ts=1.5, kind="admin", request_id="r", decision="allow", reason="keys.create",
                    extra={"z": "é", "a": None}, seq=1, prev_hash=GENESIS_HASH, hash="ignored")
    expected = (
        '{"bytes_in":0,"bytes_out":0,"client_id":"","client_ip":"","credential_id":"",'
        '"credential_kind":"","decision":"allow","extra":{"a":null,"z":"\\u00e9"},"host":"",'
        '"kind":"admin","latency_ms":0.0,"method":"","path":"","prev_hash":"' + GENESIS_HASH + '",'
        '"reason":"keys.create","request_id":"r","route":"","seq":1,"status":0,"subject":"",'
        '"tenant":"","ts":1.5,"user_agent":""}'
    ).encode("ascii")
    assert canonical_bytes(ev) == expected
    assert chain_hash(GENESIS_HASH, ev) == hashlib.sha256(GENESIS_HASH.encode() + expected).hexdigest()


def test_hash_field_is_not_hashed() -> None:
    a = make_event(hash="")
    b = make_event(hash="f" * 64)
    assert canonical_bytes(a) == canonical_bytes(b)
    assert b"f" * 64 not in canonical_bytes(b)


def test_key_order_of_extra_does_not_matter() -> None:
    a = make_event(extra={"x": 1, "y": {"q": 1, "p": 2}})
    b = make_event(extra={"y": {"p": 2, "q": 1}, "x": 1})
    assert chain_hash(GENESIS_HASH, a) == chain_hash(GENESIS_HASH, b)


def _changed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value + 0.001
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, dict):
        return {**value, "b": 2}
    raise AssertionError(f"unhandled type {type(value)}")


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(AuditEvent) if f.name != "hash"])
def test_every_hashed_field_changes_the_hash(name: str) -> None:
    ev = make_event()
    before = chain_hash(GENESIS_HASH, ev)
    setattr(ev, name, _changed(getattr(ev, name)))
    assert chain_hash(GENESIS_HASH, ev) != before


def test_prev_hash_argument_changes_the_hash() -> None:
    ev = make_event()
    assert chain_hash(GENESIS_HASH, ev) != chain_hash("1" * 64, ev)


def test_hash_is_lowercase_hex_sha256() -> None:
    h = chain_hash(GENESIS_HASH, make_event())
    assert len(h) == 64
    assert h == h.lower()
    int(h, 16)


def test_normalize_rounds_floats() -> None:
    ev = normalize_event(make_event(ts=1714564800.1234567891, latency_ms=1.23456))
    assert ev.ts == round(1714564800.1234567891, 6)
    assert ev.latency_ms == 1.235


def test_normalize_turns_negative_zero_into_zero() -> None:
    # SQLite hands -0.0 back as 0.0; hashing "-0.0" would make a clean event look tampered.
    ev = normalize_event(make_event(latency_ms=-0.0, ts=-0.0000001))
    assert repr(ev.latency_ms) == "0.0"
    assert repr(ev.ts) == "0.0"


def test_normalize_makes_extra_plain_json() -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing"

    ev = normalize_event(make_event(extra={
        "t": (1, 2), "s": {3}, "nan": float("nan"), "inf": float("inf"), "o": Thing(), 5: "int-key",
        "b": b"\x00", "nested": {"deep": [(1,)]},
    }))
    assert ev.extra == {
        "t": [1, 2], "s": [3], "nan": "nan", "inf": "inf", "o": "thing", "5": "int-key",
        "b": "b'\\x00'", "nested": {"deep": [[1]]},
    }
    # What is stored (JSON text) decodes to exactly what was hashed.
    assert json.loads(json.dumps(ev.extra)) == ev.extra


def test_normalize_survives_unprintable_values() -> None:
    class Broken:
        def __str__(self) -> str:
            raise RuntimeError("no")

    ev = normalize_event(make_event(subject=Broken(), extra={"b": Broken()}))
    assert ev.subject == "<unprintable Broken>"
    assert ev.extra == {"b": "<unprintable Broken>"}


def test_normalize_coerces_declared_types() -> None:
    ev = make_event(status="201", bytes_in=True, host=None, ts=5)
    normalize_event(ev)
    assert (ev.status, ev.bytes_in, ev.host, ev.ts) == (201, 1, "", 5.0)
    assert isinstance(ev.ts, float)


def test_normalize_escapes_lone_surrogates() -> None:
    ev = normalize_event(make_event(user_agent="bad\udcffua", extra={"k\udc80": "v\udc81"}))
    assert ev.user_agent == "bad\\udcffua"
    assert ev.extra == {"k\\udc80": "v\\udc81"}
    ev.user_agent.encode("utf-8")


@pytest.mark.parametrize(("name", "value"), [
    ("ts", float("nan")), ("ts", float("inf")), ("ts", "yesterday"), ("latency_ms", float("-inf")),
    ("status", 1.5), ("status", "abc"), ("bytes_out", 2**63), ("extra", ["not", "a", "mapping"]),
])
def test_normalize_rejects_unrecordable_values(name: str, value: Any) -> None:
    ev = make_event()
    setattr(ev, name, value)
    with pytest.raises(ValueError, match=name):
        normalize_event(ev)


def test_normalize_is_idempotent() -> None:
    ev = normalize_event(make_event(ts=1.0000004, extra={"x": (1, {2})}))
    first = canonical_bytes(ev)
    assert canonical_bytes(normalize_event(ev)) == first


def test_checkpoint_message_format() -> None:
    assert checkpoint_message(12, "ab" * 32, 1714564800.5) == f"12:{'ab' * 32}:1714564800.5".encode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)


@given(
    ts=st.floats(min_value=0, max_value=4e9),
    latency=st.floats(min_value=0, max_value=1e7),
    text=st.text(),
    extra=st.dictionaries(st.text(), json_values, max_size=5),
)
def test_normalized_event_survives_json_round_trip(ts: float, latency: float, text: str,
                                                   extra: dict[str, Any]) -> None:
    """The stored form (floats as REAL, extra as JSON text) re-encodes to the hashed bytes."""
    ev = normalize_event(make_event(ts=ts, latency_ms=latency, path=text, extra=extra))
    before = chain_hash(GENESIS_HASH, ev)
    copy = dataclasses.replace(ev, extra=json.loads(json.dumps(ev.extra)),
                               ts=float(repr(ev.ts)), latency_ms=float(repr(ev.latency_ms)))
    assert chain_hash(GENESIS_HASH, copy) == before


@given(st.text(), st.text(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
       st.floats(allow_nan=False, allow_infinity=False),
       st.dictionaries(st.text(max_size=5), st.one_of(st.integers(), st.text(), st.booleans(), st.none())))
def test_fast_canonical_encoding_equals_json_dumps(path: str, agent: str, status: int, latency: float,
                                                   extra: dict[str, object]) -> None:
    """The hand-built encoding is exactly json.dumps(sort_keys=True) of the fields."""
    ev = AuditEvent(ts=1.5, kind="request", request_id="r", decision="allow", reason="ok", path=path,
                    user_agent=agent, status=status, latency_ms=latency, extra=dict(extra))
    expected = json.dumps({f.name: getattr(ev, f.name) for f in dataclasses.fields(ev) if f.name != "hash"},
                          sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    assert canonical_bytes(ev) == expected
