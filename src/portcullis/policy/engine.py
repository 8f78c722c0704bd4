"""The Cedar policy engine: load, validate, decide, cache, reload.

Sources, in this order: the shipped library policies enabled by ``policy.library``, then
the operator's ``*.cedar`` files in ``policy.dir`` (sorted by name). The schema is the
dir's ``*.cedarschema`` file if there is one, else the one `mapping.generate_schema`
derives from the config. Everything is validated against the schema (a typo in an
attribute, entity type or action name is an error naming the file and line), the
schema's actions are checked against the route names, and one probe request per route
is built by the mapping and checked against the schema, so policies, schema and mapping
cannot drift apart silently.

State is parsed once into cedarpy handles (`PolicySet`, `Entities`) and swapped
atomically: a decision reads the state once, so it runs wholly on the old or wholly on
the new set. A reload that fails keeps the old state and reports the error.

Speed (an uncached decision is dominated by what Cedar parses and evaluates per call),
without changing any decision, reason or error: the state records which context keys
and entity attributes its policies can observe (`attribute_use`) and a decision sends
Cedar only those; each action is decided on the slice of policies whose action scope can
hold for it (`build_slice`, Cedar's policy ids kept); ready entity handles (base +
principal + resource) and trimmed principal JSON are kept in bounded LRUs that belong to
the state, so a new generation starts empty.

Decisions fail closed: anything but a clean Cedar ``Allow`` with no diagnostics errors
is a deny.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy
import orjson
from cedarpy import pst

from portcullis.exchange import Principal
from portcullis.policy.config import PolicyConfig
from portcullis.policy.mapping import (
    LIBRARY_DIR,
    DecisionInput,
    RequestMapper,
    RouteLike,
    check_routes,
    generate_schema,
    template_params,
)
from portcullis.policy.mapping import compact_json as _dumps
from portcullis.policy.owners import Owner
from portcullis.policy.shape import (
    RENAMED,
    ShapeRules,
    principal_shape,
    pst_children,
    read_strings,
    shape_key,
    shape_rules,
)

log = logging.getLogger("portcullis.policy")

MAX_POLICY_FILE_BYTES = 1024 * 1024
MAX_POLICY_FILES = 500
MAX_PRINCIPAL_ENTITIES = 4096
MAX_PAIR_ENTITIES = 4096  # (principal, resource) entity handles per state

# cedarpy's extension module takes the same request, prepared handles and returns the
# response JSON that `cedarpy.is_authorized` wraps in objects (after routing it through
# the batch API); calling it directly saves that wrapping per decision. If a cedarpy
# release moves it, the public API is used (tests check both agree).
try:
    from cedarpy import _internal as _cedar_native

    _native_is_authorized: Any = _cedar_native.is_authorized
except (ImportError, AttributeError):  # pragma: no cover - depends on the cedarpy build
    _native_is_authorized = None


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One problem in the policy sources, located as precisely as Cedar allows."""

    message: str
    file: str | None = None
    line: int | None = None
    policy: str | None = None  # the @id annotation, if the policy has one

    def __str__(self) -> str:
        where = self.file or "(policy)"
        if self.line is not None:
            where += f":{self.line}"
        if self.policy:
            where += f" [{self.policy}]"
        return f"{where}: {self.message}"


class PolicyError(Exception):
    """The policies, schema or mapping are invalid; ``problems`` says where."""

    def __init__(self, problems: list[PolicyProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision: ``policies`` are the ids of the policies that determined it (the
    permits for an allow, the forbids for an explicit deny; empty for a default deny),
    ``errors`` Cedar's diagnostics or the engine's (any error denies)."""

    allowed: bool
    policies: tuple[str, ...]
    errors: tuple[str, ...] = ()
    cached: bool = False
    generation: int = 0

    @property
    def reason(self) -> str:
        """A reason code for the audit event."""
        if self.allowed:
            return "policy.allow"
        if self.errors:
            return "policy.error"
        return "policy.forbid" if self.policies else "policy.no_permit"


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """Where a policy of the loaded set came from."""

    label: str  # the @id annotation, else "<file>:<line>"
    file: str
    line: int
    text: str


@dataclass(slots=True)
class _State:
    generation: int
    policies: cedarpy.PolicySet
    schema: cedarpy.Schema
    base: cedarpy.Entities
    mapper: RequestMapper
    info: dict[str, PolicyInfo]  # Cedar's positional id -> where it came from
    fingerprint: tuple[tuple[str, str], ...]  # (file, sha256) of every operator source
    schema_text: str
    use: AttributeUse = field(default_factory=lambda: AttributeUse(None, None))
    # The policies as nodes (None: no slicing by action) and each action's ancestors.
    nodes: Any = None
    action_ancestors: dict[str, frozenset[str]] = field(default_factory=dict)
    slices: dict[str, _Slice] = field(default_factory=dict)  # action id -> its slice (filled lazily)
    principals: OrderedDict[str, _Principal] = field(default_factory=OrderedDict)  # by entity JSON
    pairs: OrderedDict[tuple[str, str], cedarpy.Entities] = field(default_factory=OrderedDict)
    shape: ShapeRules = field(default_factory=lambda: ShapeRules(None, "not computed"))


@dataclass(slots=True)
class _Principal:
    """A principal entity as a decision sends it: trimmed, its JSON (made when Cedar
    first needs it) and its renamed form (`shape.principal_shape`; None: shapeless or
    shapes off)."""

    trimmed: dict[str, Any]
    shape: tuple[Any, dict[str, str]] | None
    json: str | None = None


@dataclass(frozen=True, slots=True)
class _Prepared:
    """What one decision sends Cedar, before it is serialized: the slice, the context
    keys (None: the whole context), the principal and the other entities, trimmed."""

    slice: _Slice
    context: dict[str, Any] | None
    pjson: str
    principal: _Principal
    rest: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Slice:
    """The policies whose action scope can match one action (Cedar's ids kept), and the
    context keys they name (None: all)."""

    policies: cedarpy.PolicySet
    context: frozenset[str] | None
    context_keys: tuple[str, ...] | None = field(init=False)  # `context` in a fixed order

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_keys", None if self.context is None else tuple(sorted(self.context)))


@dataclass(frozen=True, slots=True)
class AttributeUse:
    """What a policy set can observe of a request: ``context`` the context keys (None:
    the context as a whole is used, send all of it), ``attrs`` every attribute name any
    policy reads or tests with ``has`` (None: unknown, send every entity attribute).

    An entity attribute is observable only by naming it (``e.a``, ``e has a``), and the
    context only by naming a key or by using ``context`` itself; so dropping what no
    policy names changes no decision, reason or error."""

    context: frozenset[str] | None
    attrs: frozenset[str] | None


def attribute_use(policies: cedarpy.PolicySet) -> AttributeUse:
    """The `AttributeUse` of ``policies`` (templates and links included), read from its
    parsed form; anything unexpected means "all of it"."""
    root = _pst(policies)
    return AttributeUse(None, None) if root is None else _use_of(root)


def _pst(policies: cedarpy.PolicySet) -> Any:
    """``policies`` as `cedarpy.pst` nodes, or None for syntax cedarpy cannot express as
    nodes (then: every attribute is sent, no slices, no shapes)."""
    try:
        return policies.to_pst()
    except Exception:
        return None


def _use_of(root: Any) -> AttributeUse:
    ctx: set[str] = set()
    attrs: set[str] = set()
    whole_context = False
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, (pst.GetAttr, pst.HasAttr)):
            names = (node.attr,) if isinstance(node, pst.GetAttr) else tuple(node.attrs)
            attrs.update(names)
            if isinstance(node.base, pst.Var) and node.base.name == "context":
                ctx.add(names[0])  # `context has a.b` tests key a, then a's field b
                continue
            stack.append(node.base)
        elif isinstance(node, pst.Var):
            if node.name == "context":
                whole_context = True  # e.g. `context == {...}`: keep every key
        elif isinstance(node, (pst.UnaryOp, pst.BinaryOp)) and node.op in ("get_tag", "has_tag"):
            return AttributeUse(None, None)  # tags are not attributes; stay out of the way
        else:
            stack.extend(pst_children(node))
    return AttributeUse(None if whole_context else frozenset(ctx), frozenset(attrs))


def _policy_nodes(policies: cedarpy.PolicySet, root: Any) -> Any:
    """``root`` (the policies as nodes, from `_pst`) if they can be sliced by action
    (static policies only, every one expressible as nodes), else None."""
    if root is None or root.templates or root.template_links or len(root.static_policies) != len(policies):
        return None
    return root


def action_ancestors(entities: cedarpy.Entities) -> dict[str, frozenset[str]]:
    """Every ``Action`` entity's id -> the ids of the actions it is in, transitively (what
    Cedar's ``action in Action::"g"`` consults), read from the entities' JSON rendering."""
    parents: dict[str, set[str]] = {}
    for e in json.loads(str(entities)):
        if e["uid"]["type"] == "Action":
            parents[e["uid"]["id"]] = {p["id"] for p in e.get("parents", ()) if p["type"] == "Action"}
    out: dict[str, frozenset[str]] = {}
    for a, direct in parents.items():
        seen: set[str] = set()
        stack = list(direct)
        while stack:
            x = stack.pop()
            if x not in seen:
                seen.add(x)
                stack.extend(parents.get(x, ()))
        out[a] = frozenset(seen)
    return out


def _scope_may_match(scope: Any, action: str, ancestors: frozenset[str]) -> bool:
    """Whether a policy's action scope can hold for ``Action::"<action>"`` (unknown shapes: yes)."""
    def hit(uid: Any) -> bool:
        return bool(uid.type.basename == "Action" and not uid.type.namespace
                    and (uid.id == action or uid.id in ancestors))
    if isinstance(scope, pst.ActionEq):
        return bool(scope.entity.type.basename == "Action" and not scope.entity.type.namespace
                    and scope.entity.id == action)
    if isinstance(scope, pst.ActionIn):
        return any(hit(u) for u in scope.entities)
    return True


def build_slice(st: _State, action: str) -> _Slice:
    """The policies of ``st`` that can apply to ``Action::"<action>"``: a policy whose
    action scope does not hold is neither satisfied nor evaluated by Cedar, so leaving it
    out changes no decision, reason or error (ids are kept: `from_pst` keeps them)."""
    if st.nodes is None:
        return _Slice(st.policies, st.use.context)
    anc = st.action_ancestors.get(action, frozenset())
    kept = {pid: pol for pid, pol in st.nodes.static_policies.items() if _scope_may_match(pol.action, action, anc)}
    if len(kept) == len(st.nodes.static_policies):
        return _Slice(st.policies, st.use.context)
    sub = pst.PolicySet(templates={}, static_policies=kept, template_links=())
    try:
        return _Slice(cedarpy.PolicySet.from_pst(sub), _use_of(sub).context)
    except Exception:  # nodes cedarpy cannot turn back into policies: the whole set is always right
        log.warning("policy slice for action %r failed; using the whole set", action, exc_info=True)
        return _Slice(st.policies, st.use.context)


def _trim_entity(entity: dict[str, Any], attrs: frozenset[str] | None) -> dict[str, Any]:
    if attrs is None:
        return entity
    kept = {k: v for k, v in entity.get("attrs", {}).items() if k in attrs}
    return {**entity, "attrs": kept}


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload check did: ``changed`` False means nothing to do."""

    changed: bool
    ok: bool
    generation: int
    problems: tuple[PolicyProblem, ...] = ()


# ---------------------------------------------------------------------------------
# Sources


@dataclass(frozen=True, slots=True)
class _Statement:
    file: str
    line: int
    text: str


def split_statements(text: str, file: str) -> list[_Statement]:
    """Split Cedar policy text into statements at top-level ``;`` (outside strings and
    ``//`` comments), each with the line its first token is on."""
    out: list[_Statement] = []
    i, n, line = 0, len(text), 1
    start: int | None = None
    start_line = 1
    seg_begin = 0
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
            continue
        if c == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c.isspace():
            i += 1
            continue
        if start is None:
            start, start_line = i, line
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
            i += 1
            continue
        if c == ";":
            out.append(_Statement(file, start_line, text[seg_begin:i + 1]))
            start = None
            seg_begin = i + 1
        i += 1
    if start is not None:  # trailing text without ';': let Cedar report it
        out.append(_Statement(file, start_line, text[seg_begin:]))
    return out


_ID_ANNOTATION = re.compile(r'@id\s*\(\s*"((?:[^"\\]|\\.)*)"\s*\)')
_SCHEMA_ACTION = re.compile(r'^action\s+((?:"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*)'
                            r'(?:\s*,\s*(?:"(?:[^"\\]|\\.)*"|[A-Za-z_][A-Za-z0-9_]*))*)', re.M)


def schema_actions(schema: cedarpy.Schema) -> set[str]:
    """The action names a schema declares (read from its normalized Cedar rendering)."""
    names: set[str] = set()
    for m in _SCHEMA_ACTION.finditer(str(schema)):
        for part in re.findall(r'"((?:[^"\\]|\\.)*)"|([A-Za-z_][A-Za-z0-9_]*)', m.group(1)):
            names.add(json.loads(f'"{part[0]}"') if part[0] or not part[1] else part[1])
    return names


def _read(path: Path) -> str:
    data = path.read_bytes()
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise ValueError(f"larger than {MAX_POLICY_FILE_BYTES} bytes")
    return data.decode("utf-8")


def scan_dir(policy_dir: Path | None) -> tuple[list[Path], list[Path]]:
    """The operator's policy files and schema files in ``policy_dir``, sorted."""
    if policy_dir is None:
        return [], []
    files = sorted(p for p in policy_dir.glob("*.cedar") if p.is_file())
    schemas = sorted(p for p in policy_dir.glob("*.cedarschema") if p.is_file())
    return files, schemas


_generations = itertools.count(1)


def _probe_principal(tenant: str) -> Principal:
    return Principal(subject="probe", tenant=tenant, credential_id="probe", credential_kind="jwt",
                     scopes=frozenset(), roles=frozenset(), acr="", amr=(), auth_time=0.0)


def build_state(cfg: PolicyConfig, routes: Sequence[RouteLike], policy_dir: Path | None) -> _State:
    """Load, validate and parse everything; `PolicyError` listing every problem found."""
    problems: list[PolicyProblem] = []
    route_problems = check_routes(cfg, routes)
    problems += [PolicyProblem(e, file="config") for e in route_problems]
    mapper = RequestMapper(cfg, routes)

    files, schema_files = scan_dir(policy_dir)
    if policy_dir is not None and not policy_dir.is_dir():
        problems.append(PolicyProblem("policy directory does not exist", file=str(policy_dir)))
    if len(files) > MAX_POLICY_FILES:
        problems.append(PolicyProblem(f"more than {MAX_POLICY_FILES} policy files", file=str(policy_dir)))
        files = files[:MAX_POLICY_FILES]
    digest: list[tuple[str, str]] = []

    # Schema.
    schema_text: str | None = None
    schema_name = "(generated schema)"
    if len(schema_files) > 1:
        problems.append(PolicyProblem("more than one *.cedarschema file; keep one", file=str(policy_dir)))
    elif schema_files:
        schema_name = str(schema_files[0])
        try:
            schema_text = _read(schema_files[0])
            digest.append((schema_name, hashlib.sha256(schema_text.encode()).hexdigest()))
        except (OSError, ValueError) as exc:
            problems.append(PolicyProblem(f"cannot read: {exc}", file=schema_name))
    if schema_text is None and not schema_files:
        schema_text = generate_schema(cfg, routes)
    schema: cedarpy.Schema | None = None
    if schema_text is not None:
        try:
            schema = cedarpy.Schema.from_str(schema_text)
        except ValueError as exc:
            problems.append(PolicyProblem(f"invalid Cedar schema: {exc}", file=schema_name))

    # Policies: library first, then the operator's files.
    sources = [(f"library/{name}.cedar", LIBRARY_DIR / f"{name}.cedar") for name in cfg.library]
    sources += [(str(p), p) for p in files]
    statements: list[_Statement] = []
    for label, path in sources:
        try:
            text = _read(path)
        except (OSError, ValueError) as exc:
            problems.append(PolicyProblem(f"cannot read: {exc}", file=label))
            continue
        if not label.startswith("library/"):
            digest.append((label, hashlib.sha256(text.encode()).hexdigest()))
        stmts = split_statements(text, label)
        try:
            cedarpy.PolicySet.from_str(text)
        except ValueError as exc:
            # Cedar's parse errors carry no position: find the statement that fails.
            located = False
            for st in stmts:
                try:
                    cedarpy.PolicySet.from_str(st.text)
                except ValueError as exc2:
                    problems.append(PolicyProblem(f"syntax error: {exc2}", file=label, line=st.line))
                    located = True
                    break
            if not located:
                problems.append(PolicyProblem(f"syntax error: {exc}", file=label))
            continue
        statements += stmts

    combined = "\n".join(s.text for s in statements)
    info: dict[str, PolicyInfo] = {}
    for i, st in enumerate(statements):
        m = _ID_ANNOTATION.search(_head(st.text))
        label = json.loads(f'"{m.group(1)}"') if m else f"{Path(st.file).name}:{st.line}"
        info[f"policy{i}"] = PolicyInfo(label, st.file, st.line, st.text.strip())

    policies: cedarpy.PolicySet | None = None
    if not problems:
        try:
            policies = cedarpy.PolicySet.from_str(combined)
        except ValueError as exc:  # pragma: no cover - each file parsed alone above
            problems.append(PolicyProblem(f"syntax error: {exc}"))
        else:
            if len(policies) != len(statements):  # pragma: no cover - splitter and Cedar disagree
                problems.append(PolicyProblem("could not attribute policies to files (statement count mismatch)"))

    if schema is not None and policies is not None and not problems:
        result = cedarpy.validate_policies(combined, schema)
        for err in result.errors:
            where = info.get(err.policy_id)
            msg = err.error.replace(f"for policy `{err.policy_id}`, ", "")
            if where is None:
                problems.append(PolicyProblem(msg, file=schema_name))
            else:
                problems.append(PolicyProblem(msg, file=where.file, line=where.line,
                                              policy=where.label if not where.label.endswith(
                                                  f":{where.line}") else None))

    base: cedarpy.Entities | None = None
    if schema is not None:
        declared = schema_actions(schema)
        groups = set(cfg.action_groups)
        for r in routes:
            if r.name not in declared:
                problems.append(PolicyProblem(f"route {r.name!r} has no action in the schema "
                                              f"(add: action {json.dumps(r.name)} appliesTo {{...}})",
                                              file=schema_name))
        names = {r.name for r in routes}
        for a in sorted(declared - names - groups):
            problems.append(PolicyProblem(f"action {a!r} names no route (a typo, or a removed route?)",
                                          file=schema_name))
        try:
            base = cedarpy.Entities.from_json_str(json.dumps(mapper.role_entities()), schema)
        except ValueError as exc:
            problems.append(PolicyProblem(f"roles do not fit the schema: {exc}", file=schema_name))
        # One probe request per route: the mapping's output must fit the schema.
        if base is not None and policies is not None and not problems:
            for r in routes:
                params = dict.fromkeys(template_params(r.path), "probe")
                inp = mapper.build(_probe_principal("probe"), route=r.name, method=r.methods[0],
                                   path_params=params, client_ip="127.0.0.1", now=0.0,
                                   owner=Owner("probe", "probe"), country="ZZ")
                try:
                    ents = base.with_added_json_str(inp.entities_json, schema)
                    res = cedarpy.is_authorized(_request(inp), policies, ents, schema)
                except ValueError as exc:
                    problems.append(PolicyProblem(f"route {r.name!r}: the request entities do not fit the "
                                                  f"schema: {exc}", file=schema_name))
                    continue
                for e in res.diagnostics.errors:
                    if "failed to build request" in e or "while parsing context" in e:
                        problems.append(PolicyProblem(f"route {r.name!r}: the request does not fit the "
                                                      f"schema: {e}", file=schema_name))

    problems = list(dict.fromkeys(problems))  # the validator repeats a problem per entity type
    if problems or schema is None or policies is None or base is None or schema_text is None:
        raise PolicyError(problems or [PolicyProblem("policies could not be loaded")])
    root = _pst(policies)  # read once: attribute use, slices and shape rules all come from it
    use = AttributeUse(None, None) if root is None else _use_of(root)
    state = _State(next(_generations), policies, schema, base, mapper, info, tuple(digest), schema_text,
                   use, _policy_nodes(policies, root), action_ancestors(base))
    state.shape = shape_rules(root, mapper.role_entities())
    if state.shape.keep is None:
        log.info("decision cache keyed by whole inputs: %s", state.shape.reason)
    return state


def _head(text: str) -> str:
    """The annotations of a statement: its text before the effect keyword."""
    m = re.search(r"\b(permit|forbid)\s*\(", text)
    return text[:m.start()] if m else text


def _authorize(request: dict[str, Any], policies: cedarpy.PolicySet,
               entities: cedarpy.Entities) -> tuple[bool, list[str], list[str]]:
    """Cedar's (allow, reasons, errors) for one request on prepared handles."""
    inner = getattr(entities, "_inner", None)
    if _native_is_authorized is not None and inner is not None:
        resp = orjson.loads(_native_is_authorized(request, policies, inner, None, False))
        diag = resp.get("diagnostics") or {}
        return resp.get("decision") == "Allow", list(diag.get("reason", ())), list(diag.get("errors", ()))
    res = cedarpy.is_authorized(request, policies, entities)
    return (res.decision == cedarpy.Decision.Allow, list(res.diagnostics.reasons),
            list(res.diagnostics.errors))


def _request(inp: DecisionInput) -> dict[str, Any]:
    return {"principal": inp.principal, "action": inp.action, "resource": inp.resource,
            "context": inp.context_json}


# ---------------------------------------------------------------------------------
# The engine


class PolicyEngine:
    """Decides requests against the current policy state; thread-safe.

    ``decide`` never raises: on any error it returns a deny with the error.
    """

    def __init__(self, cfg: PolicyConfig, routes: Sequence[RouteLike], policy_dir: Path | None) -> None:
        """Load everything; `PolicyError` if anything is invalid (nothing is served then)."""
        self._cfg = cfg
        self._routes = list(routes)
        self._dir = policy_dir
        self._state = build_state(cfg, routes, policy_dir)
        self._cache: OrderedDict[tuple[int, str | bytes], Decision] = OrderedDict()  # whole input | shape
        self._cache_size = cfg.decision_cache_size
        self._lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._snapshot = self._stat()
        self.last_problems: tuple[PolicyProblem, ...] = ()
        # Counters (read by the metrics collector): cache hits in all, those by shape, and
        # decisions Cedar evaluated through `decide` (errors included; misses: those cached).
        self.hits = 0
        self.shape_hits = 0
        self.misses = 0
        self.evaluations = 0

    # -- state -------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """Changes whenever policies, schema or entities (roles) change."""
        return self._state.generation

    @property
    def shapes(self) -> bool:
        """Whether the current policy set lets the decision cache key by shape."""
        return self._state.shape.keep is not None

    @property
    def shapes_reason(self) -> str:
        """Why it does not ("" when it does)."""
        return self._state.shape.reason

    @property
    def mapper(self) -> RequestMapper:
        return self._state.mapper

    @property
    def schema_text(self) -> str:
        return self._state.schema_text

    def policy_info(self, label_or_id: str) -> PolicyInfo | None:
        """Where a policy came from, by its label (as in `Decision.policies`)."""
        for pi in self._state.info.values():
            if pi.label == label_or_id:
                return pi
        return None

    def build_input(self, principal: Principal, **kw: Any) -> DecisionInput:
        """`RequestMapper.build` with the current mapper."""
        return self._state.mapper.build(principal, **kw)

    # -- deciding ------------------------------------------------------------------

    def decide(self, inp: DecisionInput) -> Decision:
        """Allow or deny ``inp``; cached by the state generation and the whole input, and
        by the input's shape (`policy.shape`: the input with its strings renamed
        one-to-one, where the policies cannot tell the difference)."""
        st = self._state  # read once: this decision runs wholly on one state
        if not self._cache_size:
            return self._evaluate(st, inp)
        exact: tuple[int, str | bytes] = (st.generation, inp.key)
        with self._lock:
            hit = self._cache.get(exact)
            if hit is not None:
                self._cache.move_to_end(exact)
                self.hits += 1
                return hit
        try:
            prep = self._prepare(st, inp)
            shape = self._shape(st, inp, prep)
        except Exception:  # a malformed input: evaluating it reports the error and denies
            return self._evaluate(st, inp)
        by_shape: tuple[int, str | bytes] | None = None if shape is None else (st.generation, shape)
        if by_shape is not None:
            with self._lock:
                hit = self._cache.get(by_shape)
                if hit is not None:
                    self._cache.move_to_end(by_shape)
                    self.hits += 1
                    self.shape_hits += 1
            if hit is not None:
                self._remember([exact], hit)  # this input again: no renaming needed
                return hit
        decision = self._evaluate(st, inp, prep)
        with self._lock:
            self.evaluations += 1
            if not decision.errors:
                self.misses += 1
        if not decision.errors:
            self._remember([exact] if by_shape is None else [by_shape, exact],
                           Decision(decision.allowed, decision.policies, decision.errors, True, decision.generation))
        return decision

    def _remember(self, keys: list[tuple[int, str | bytes]], decision: Decision) -> None:
        with self._lock:
            for k in keys:
                self._cache[k] = decision
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def decide_uncached(self, inp: DecisionInput) -> Decision:
        """Evaluate without touching the cache (explain, tests, benchmarks)."""
        return self._evaluate(self._state, inp)

    def _evaluate(self, st: _State, inp: DecisionInput, prep: _Prepared | None = None) -> Decision:
        try:
            if prep is None:
                prep = self._prepare(st, inp)
            ents = self._entities(st, inp, prep)
            ctx = inp.context_json if prep.context is None else _dumps(prep.context)
            request = {"principal": inp.principal, "action": inp.action, "resource": inp.resource,
                       "context": ctx}
            allowed, reasons, errs = _authorize(request, prep.slice.policies, ents)
            labels = tuple(sorted(st.info[r].label if r in st.info else r for r in reasons))
            errors = tuple(errs)
            return Decision(allowed and not errors, labels, errors, False, st.generation)
        except Exception as exc:  # fail closed on anything the engine throws
            log.warning("policy engine error: %s: %s", type(exc).__name__, exc)
            return Decision(False, (), (f"engine error: {type(exc).__name__}: {exc}",), False, st.generation)

    @staticmethod
    def _slice(st: _State, action: dict[str, str]) -> _Slice:
        """The slice of ``st`` for ``action``, built on first use (one per action of the
        schema; anything else gets the whole set)."""
        aid = action.get("id", "")
        sl = st.slices.get(aid) if action.get("type") == "Action" else None
        if sl is None:
            if action.get("type") != "Action" or aid not in st.action_ancestors:
                return _Slice(st.policies, st.use.context)  # not a schema action: the whole set
            sl = build_slice(st, aid)
            st.slices[aid] = sl  # bounded by the schema's actions; a racing thread builds the same
        return sl

    def _prepare(self, st: _State, inp: DecisionInput) -> _Prepared:
        """The slice, context keys and trimmed entities of ``inp`` (only the attributes
        the policies name). The trimmed principal and its renamed form are kept per state
        in a bounded LRU, by the principal's entity JSON."""
        sl = self._slice(st, inp.action)
        keys = sl.context_keys
        if keys is None:
            ctx = None
        else:
            full = inp.context
            ctx = {k: full[k] for k in keys if k in full}
        pjson = inp.entity_jsons[0] if inp.entity_jsons else _dumps(inp.entities[0])
        attrs = st.use.attrs
        with self._lock:
            principal = st.principals.get(pjson)
        if principal is None:
            trimmed = _trim_entity(inp.entities[0], attrs)
            keep = st.shape.keep
            principal = _Principal(trimmed, None if keep is None else principal_shape(trimmed, keep))
            with self._lock:
                st.principals[pjson] = principal
                while len(st.principals) > MAX_PRINCIPAL_ENTITIES:
                    st.principals.popitem(last=False)
        rest = tuple(_trim_entity(e, attrs) for e in inp.entities[1:])
        return _Prepared(sl, ctx, pjson, principal, rest)

    @staticmethod
    def _shape(st: _State, inp: DecisionInput, prep: _Prepared) -> bytes | None:
        keep = st.shape.keep
        head = prep.principal.shape
        if keep is None or head is None:
            return None
        ctx = inp.context if prep.context is None else prep.context
        if st.shape.read:
            # Strings whose content a policy reads stay as they are, everywhere in the key;
            # then the principal's memoized renaming may not fit: redo it with them kept.
            if prep.principal.trimmed.get("uid") != inp.principal:
                return None  # the principal's attributes are not where they are looked for
            resource = next((e for e in prep.rest if e.get("uid") == inp.resource), None)
            extra = read_strings(st.shape.read, prep.principal.trimmed, resource, ctx) - keep
            if extra:
                if any(s.startswith(RENAMED) for s in extra):
                    return None
                keep = keep | extra
                head = principal_shape(prep.principal.trimmed, keep)
                if head is None:
                    return None
        return shape_key(head, rest=prep.rest, action=inp.action, uids=(inp.principal, inp.resource),
                         context=ctx, keep=keep)

    def _entities(self, st: _State, inp: DecisionInput, prep: _Prepared) -> cedarpy.Entities:
        """Base + the input's trimmed entities as a handle. Per state, a bounded LRU keeps
        the handle per (principal, rest) (adding one or two entities to the base costs the
        same, so a handle per principal alone would not save anything)."""
        ejs = inp.entity_jsons or tuple(_dumps(e) for e in inp.entities)
        pair_key = (prep.pjson, ",".join(ejs[1:]))
        with self._lock:
            handle = st.pairs.get(pair_key)
            if handle is not None:
                st.pairs.move_to_end(pair_key)
                return handle
        pj = prep.principal.json
        if pj is None:
            pj = prep.principal.json = _dumps(prep.principal.trimmed)
        delta = "[" + ",".join([pj, *(_dumps(e) for e in prep.rest)]) + "]"
        handle = st.base.with_added_json_str(delta)
        with self._lock:
            st.pairs[pair_key] = handle
            while len(st.pairs) > MAX_PAIR_ENTITIES:
                st.pairs.popitem(last=False)
        return handle

    def clear_cache(self) -> None:
        """Drop cached decisions (an entity outside the input changed)."""
        with self._lock:
            self._cache.clear()

    # -- reloading -------------------------------------------------------------------

    def _stat(self) -> tuple[tuple[str, int, int], ...]:
        files, schemas = scan_dir(self._dir)
        out = []
        for p in (*files, *schemas):
            try:
                s = p.stat()
            except OSError:
                continue
            out.append((str(p), s.st_mtime_ns, s.st_size))
        return tuple(out)

    def reload_if_changed(self) -> ReloadOutcome:
        """Rebuild if a policy or schema file changed (mtime, size, then content hash).
        On success the new state replaces the old at once; on failure the old stays."""
        with self._reload_lock:
            snap = self._stat()
            if snap == self._snapshot:
                return ReloadOutcome(False, True, self.generation)
            try:
                new = build_state(self._cfg, self._routes, self._dir)
            except PolicyError as exc:
                self._snapshot = snap  # report a broken file once, not every poll
                self.last_problems = tuple(exc.problems)
                log.error("policy reload failed; keeping generation %d:\n%s", self.generation, exc)
                return ReloadOutcome(True, False, self.generation, tuple(exc.problems))
            self._snapshot = snap
            self.last_problems = ()
            if new.fingerprint == self._state.fingerprint:  # touched, not changed
                return ReloadOutcome(False, True, self.generation)
            self._swap(new)
            log.info("policies reloaded: generation %d", new.generation)
            return ReloadOutcome(True, True, new.generation)

    def update(self, cfg: PolicyConfig, routes: Sequence[RouteLike] | None = None) -> ReloadOutcome:
        """Apply a new policy config (roles, resources, networks...): an entity change.
        `PolicyError` problems are returned and the old state kept."""
        with self._reload_lock:
            rts = list(routes) if routes is not None else self._routes
            try:
                new = build_state(cfg, rts, self._dir)
            except PolicyError as exc:
                return ReloadOutcome(True, False, self.generation, tuple(exc.problems))
            self._cfg, self._routes = cfg, rts
            self._cache_size = cfg.decision_cache_size
            self._snapshot = self._stat()
            self._swap(new)
            return ReloadOutcome(True, True, new.generation)

    def _swap(self, new: _State) -> None:
        self._state = new  # one reference assignment: atomic for readers
        self.clear_cache()

    async def watch(self, stop: asyncio.Event) -> None:
        """Poll for changes every ``reload_poll_seconds`` until ``stop`` is set; the
        rebuild runs in a worker thread."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._cfg.reload_poll_seconds)
            if stop.is_set():
                return
            try:
                await asyncio.to_thread(self.reload_if_changed)
            except Exception:  # pragma: no cover - keep watching whatever happens
                log.exception("policy reload check failed")


def decision_facts(d: Decision) -> dict[str, Any]:
    """The facts an audit event records for a decision."""
    out: dict[str, Any] = {"policy_decision": "allow" if d.allowed else "deny",
                           "policy_reason": d.reason, "policies": list(d.policies),
                           "policy_generation": d.generation}
    if d.errors:
        out["policy_errors"] = list(d.errors)[:5]
    if d.cached:
        out["policy_cached"] = True
    return out


__all__ = [
    "AttributeUse",
    "Decision",
    "DecisionInput",
    "PolicyEngine",
    "PolicyError",
    "PolicyInfo",
    "PolicyProblem",
    "ReloadOutcome",
    "attribute_use",
    "build_state",
    "decision_facts",
    "schema_actions",
    "split_statements",
]



def candidate_problems(cfg: PolicyConfig, routes: Sequence[RouteLike], policy_dir: Path, name: str,
                       text: str) -> list[str]:
    """The problems the policy set would have with file `name` replaced by `text`: the
    whole set is loaded off to the side (a copy of `policy_dir`) and validated against the
    schema exactly as a reload would, so a four-eyes policy change is checked before it is
    approved and again before it is applied."""
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory(prefix="portcullis-policy-") as tmp:
        staged = Path(tmp) / "policies"
        shutil.copytree(policy_dir, staged, symlinks=False)
        (staged / name).write_text(text, encoding="utf-8")
        try:
            build_state(cfg, routes, staged)
        except PolicyError as exc:
            return [str(p).replace(str(staged), str(policy_dir)) for p in exc.problems]
    return []
