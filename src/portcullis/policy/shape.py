"""Decision shapes: one cached decision for every input Cedar cannot tell apart.

Cedar compares the strings of a request only for equality: with each other, with the
policies' literals, as set members and as entity ids. It reads their content in three
places only: ``like`` patterns, the extension constructors (``ip``, ``decimal``,
``datetime``, ``duration``) applied to a non-literal, and entity tags (``getTag``/
``hasTag`` take a string key). So renaming the request's strings one-to-one — leaving
untouched every string the policies or the base entities (roles, actions) name, and
every string found at an attribute whose content a policy reads (``principal.email like
"*@acme.com"``, ``ip(context.client_ip)``: `ShapeRules.read`) — changes no decision,
reason or error: the evaluation of the renamed request is the evaluation of the
original with the names swapped. (Cedar has no ordering, length, prefix or concatenation
on strings.) A policy set that reads content it cannot trace to an attribute (``like``
on a computed value, tags) gets no shapes.

`shape_key` is that renaming made canonical: each string outside the kept set becomes a
token numbered by first appearance (``"\\x00" + n``), so ``alice`` editing her own
project ``p1`` and ``bob`` editing his own ``p9`` have one key, while ``bob`` editing
``alice``'s project (owner and subject differ) has another, and so has anything whose
numbers, booleans, entity types, role parents, action, attribute names or kept strings
differ. Entity types are never renamed; entity ids (the request's entities and their
parents) are renamed like any other string unless kept — the configured roles and the
actions are base entities, so their ids always are. The base entity store holds kept
strings only, so the renaming maps it onto itself.

An input gets no shape (it is cached by its whole text, as before) when it holds a value
Cedar would read as more than plain data (an ``__entity``/``__extn``/``__expr`` escape,
or a nested record of just ``type`` and ``id``, an entity reference where a schema says
so), an entity field other than ``uid``/``attrs``/``parents`` (tags), or a read string
starting with NUL. A policy set gets no shapes at all when it reads string content it
cannot trace to an attribute, uses an operator or node not on the reviewed lists below,
or names a string starting with NUL (the renamed strings' prefix).

The decision cache uses the shape as its key when the policy set allows it
(`ShapeRules.keep` is not None); tests compare shape-cached decisions with fresh
evaluations on random and adversarial inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from cedarpy import pst

# Extension constructors parse their string argument: on request data they read content.
_PARSING_OPS = frozenset({"ip", "decimal", "datetime", "duration"})
# The operators known not to read string content (equality, logic, arithmetic, set
# membership, and methods of extension values, which only literals can make here). An
# operator outside these lists (a newer Cedar's) turns shapes off until it is reviewed.
_SAFE_UNARY = frozenset({"not", "neg", "is_empty", "is_ipv4", "is_ipv6", "is_loopback", "is_multicast",
                         "to_date", "to_time", "to_milliseconds", "to_seconds", "to_minutes", "to_hours",
                         "to_days"})
_SAFE_BINARY = frozenset({"eq", "not_eq", "less", "less_eq", "greater", "greater_eq", "and", "or", "add",
                          "sub", "mul", "in", "contains", "contains_all", "contains_any", "is_in_range",
                          "offset", "duration_since", "decimal_less_than", "decimal_less_eq",
                          "decimal_greater", "decimal_greater_eq"})
_TAG_OPS = frozenset({"get_tag", "has_tag"})
# Every node class of `cedarpy.pst` (`Like` has a branch of its own); anything else turns
# shapes off.
_KNOWN_NODES = (pst.ActionEq, pst.ActionIn, pst.BinaryOp, pst.BoolLit, pst.Char, pst.EntityLit, pst.EntityType,
                pst.EntityUid, pst.GetAttr, pst.HasAttr, pst.IfThenElse, pst.Is, pst.LongLit, pst.PolicySet,
                pst.Record, pst.ScopeAny, pst.ScopeEq, pst.ScopeIn, pst.ScopeIs, pst.ScopeIsIn, pst.Set,
                pst.Slot, pst.StringLit, pst.Template, pst.TemplateLink, pst.UnaryOp, pst.Unless, pst.Var,
                pst.When, pst.Wildcard)
_ESCAPES = frozenset({"__entity", "__extn", "__expr"})
RENAMED = "\x00"  # a renamed string is this and its number


@dataclass(frozen=True, slots=True)
class ShapeRules:
    """``keep``: the strings that stay as they are in a shape key (every string literal
    and entity id the policies name, every string of the base entities); None when the
    policy set reads string content where it cannot be traced, with ``reason`` saying
    where. ``read``: the attributes whose content the policies do read (``like``, an
    extension constructor), as (``principal``|``resource``|``context``|``action``, path):
    their strings are kept as they are in every key (`read_strings`)."""

    keep: frozenset[str] | None
    reason: str = ""
    read: frozenset[tuple[str, tuple[str, ...]]] = frozenset()


class _Shapeless(Exception):
    """The input cannot be renamed safely: key it by its whole text."""


def pst_children(node: Any) -> list[Any]:
    """What lies directly under a `cedarpy.pst` node, or in a mapping or sequence of them."""
    if isinstance(node, Mapping):
        return list(node.values())
    if isinstance(node, (tuple, list)):
        return list(node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [getattr(node, f.name) for f in dataclasses.fields(node)]
    return []


def shape_rules(root: Any, base_entities: Iterable[Mapping[str, Any]]) -> ShapeRules:
    """The rules for the policy set whose `cedarpy.pst` nodes are ``root`` (None: the
    set could not be read as nodes, so no shapes) over ``base_entities`` (Cedar JSON)."""
    if root is None:
        return ShapeRules(None, "the policies cannot be read as nodes")
    keep: set[str] = set()
    read: set[tuple[str, tuple[str, ...]]] = set()
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, pst.StringLit):
            keep.add(node.value)
        elif isinstance(node, pst.EntityUid):
            keep.add(node.id)
        elif isinstance(node, pst.Like):
            path = _attribute_path(node.base)
            if path is None:
                return ShapeRules(None, "a policy uses `like` on something other than an attribute")
            read.add(path)
        elif isinstance(node, pst.UnaryOp) and node.op not in _SAFE_UNARY:
            if node.op not in _PARSING_OPS:
                return ShapeRules(None, f"a policy uses the operator {node.op!r}, not reviewed for shapes")
            if not isinstance(node.arg, pst.StringLit):
                path = _attribute_path(node.arg)
                if path is None:
                    return ShapeRules(None, f"a policy applies {node.op}() to something other than an attribute")
                read.add(path)
        elif isinstance(node, pst.BinaryOp) and node.op not in _SAFE_BINARY:
            if node.op in _TAG_OPS:
                return ShapeRules(None, "a policy uses entity tags")
            return ShapeRules(None, f"a policy uses the operator {node.op!r}, not reviewed for shapes")
        elif dataclasses.is_dataclass(node) and not isinstance(node, _KNOWN_NODES):
            return ShapeRules(None, f"a policy has a {type(node).__name__} node, not reviewed for shapes")
        stack.extend(pst_children(node))
    _strings_of(list(base_entities), keep)
    if any(s.startswith(RENAMED) for s in keep):
        return ShapeRules(None, "a kept string starts with NUL")
    return ShapeRules(frozenset(keep), read=frozenset(read))


def _attribute_path(expr: Any) -> tuple[str, tuple[str, ...]] | None:
    """``principal.a.b`` as ("principal", ("a", "b")); None for anything else (a value
    computed some other way could come from anywhere in the request)."""
    names: list[str] = []
    while isinstance(expr, pst.GetAttr):
        names.append(expr.attr)
        expr = expr.base
    if names and isinstance(expr, pst.Var) and expr.name in ("principal", "resource", "context", "action"):
        return expr.name, tuple(reversed(names))
    return None


def read_strings(read: Iterable[tuple[str, tuple[str, ...]]], principal: Mapping[str, Any] | None,
                 resource: Mapping[str, Any] | None, context: Mapping[str, Any]) -> frozenset[str]:
    """Every string at the attributes in ``read`` of this request (the principal and
    resource entities as Cedar JSON, the context): the strings whose content the
    policies read, which a shape key must keep as they are, wherever they appear.
    (``action`` attributes come from the base entities, whose strings are kept anyway.)"""
    out: set[str] = set()
    roots = {"principal": principal.get("attrs") if principal is not None else None,
             "resource": resource.get("attrs") if resource is not None else None,
             "context": context}
    for var, path in read:
        v: Any = roots.get(var)
        for name in path:
            v = v.get(name) if isinstance(v, Mapping) else None
        if v is not None:
            _strings_of(v, out)
    return frozenset(out)


def _strings_of(value: Any, out: set[str]) -> None:
    if isinstance(value, str):
        out.add(value)
    elif isinstance(value, Mapping):
        for k, v in value.items():
            out.add(str(k))
            _strings_of(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _strings_of(v, out)


_RENAMED = tuple(RENAMED + str(n) for n in range(256))


def _name(s: str, keep: frozenset[str], names: dict[str, str]) -> str:
    if s in keep:
        return s
    t = names.get(s)
    if t is None:
        n = len(names)
        t = names[s] = _RENAMED[n] if n < 256 else RENAMED + str(n)
    return t


def _value(v: Any, keep: frozenset[str], names: dict[str, str]) -> Any:
    """``v`` with its strings renamed; JSON tells bools, ints and floats apart, so the
    dumped key does too (Python's ``True == 1`` never reaches the key)."""
    t = type(v)
    if t is str:
        return _name(v, keep, names)
    if t is bool or t is int or t is float or v is None:
        return v
    if t is list or t is tuple:
        return [_value(x, keep, names) for x in v]
    if t is dict:
        if v.keys() == {"type", "id"}:
            # A record Cedar reads as a record without a schema, but as an entity reference
            # where one declares it: its type must not be renamed, so no shape.
            raise _Shapeless
        return _record(v, keep, names)
    raise _Shapeless


def _record(d: dict[str, Any], keep: frozenset[str], names: dict[str, str]) -> dict[str, Any]:
    """A record (entity attributes, context, a nested record) renamed; the flat loop is
    the hot path (most values are plain strings, numbers and booleans)."""
    if not _ESCAPES.isdisjoint(d):
        raise _Shapeless
    out: dict[str, Any] = {}
    for k, v in d.items():
        t = type(v)
        if t is str:
            if v in keep:
                out[k] = v
            else:
                tok = names.get(v)
                if tok is None:
                    n = len(names)
                    tok = names[v] = _RENAMED[n] if n < 256 else RENAMED + str(n)
                out[k] = tok
        elif t is bool or t is int:
            out[k] = v
        else:
            out[k] = _value(v, keep, names)
    return out


def _uid(u: Any, keep: frozenset[str], names: dict[str, str]) -> tuple[str, str]:
    if type(u) is not dict or len(u) != 2:
        raise _Shapeless
    typ, eid = u.get("type"), u.get("id")
    if type(typ) is not str or type(eid) is not str:
        raise _Shapeless
    return typ, _name(eid, keep, names)


_ENTITY_FIELDS = frozenset({"uid", "attrs", "parents"})


def _entity(e: Mapping[str, Any], keep: frozenset[str], names: dict[str, str]) -> tuple[Any, ...]:
    if not _ENTITY_FIELDS.issuperset(e):
        raise _Shapeless  # tags, or anything Cedar might read that this does not model
    attrs = e.get("attrs", {})
    if type(attrs) is not dict:
        raise _Shapeless
    return (_uid(e.get("uid"), keep, names), _record(attrs, keep, names),
            [_uid(p, keep, names) for p in e.get("parents", ())])


def principal_shape(entity: Mapping[str, Any], keep: frozenset[str]) -> tuple[Any, dict[str, str]] | None:
    """The renamed principal entity and the names it used (the start of every key for
    this principal; memoized by the engine), or None if it is shapeless."""
    names: dict[str, str] = {}
    try:
        return _entity(entity, keep, names), names
    except _Shapeless:
        return None


def shape_key(principal: tuple[Any, dict[str, str]], *, rest: Sequence[Mapping[str, Any]],
              action: Mapping[str, str], uids: Sequence[Mapping[str, str]], context: Mapping[str, Any],
              keep: frozenset[str]) -> bytes | None:
    """The key of a decision input: the renamed principal (from `principal_shape`), the
    other entities, the action (as it is: it picks the policy slice), the request's
    principal and resource uids (``uids``) and the context — each exactly as Cedar
    receives it (trimmed). None if the input is shapeless."""
    head, seen = principal
    names = dict(seen)
    try:
        parts = (head, [_entity(e, keep, names) for e in rest], action.get("type"), action.get("id"),
                 [_uid(u, keep, names) for u in uids], _value(context, keep, names))
        return orjson.dumps(parts)
    except (_Shapeless, orjson.JSONEncodeError):
        return None


__all__ = ["RENAMED", "ShapeRules", "principal_shape", "pst_children", "read_strings", "shape_key", "shape_rules"]
