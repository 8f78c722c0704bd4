"""In-process Cedar decisions over examples/policies (issue 5's benchmark, pytest-benchmark).

Skipped by `make test` (addopts has --benchmark-skip); `make bench-micro` (or
`pytest tests/bench/test_policy_bench.py --benchmark-only`) runs them. They assert
behaviour, never speed; each also records decisions/s, p50 and p99 per call in
``extra_info`` (see `--benchmark-json`) and prints them. Figures: docs/benchmarks.md.

- distinct, evaluated: every call a new input (another principal, another project) decided
  without the cache (`decide_uncached`), so the entity handles do not help either: the
  cost of a fresh Cedar decision;
- distinct, warm entities: the same without the cache, the (principal, project) pairs
  repeating: the entity handles are reused;
- distinct, by shape: the same distinct inputs through `decide`: users of one role each on
  a project of their tenant are one shape (`policy.shape`), so after the first of each
  shape the decision cache answers;
- build + decide, distinct: what the gateway does per request (the mapping, then decide);
- repeated: the same input again and again, answered from the decision cache.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portcullis.exchange import Principal
from portcullis.policy.engine import PolicyEngine
from portcullis.policy.mapping import DecisionInput
from portcullis.policy.owners import Owner
from portcullis.policy.testing import load_setup

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "policies"
NOW = 1741165200.0  # Wednesday 2025-03-05 10:00 Berlin: inside business hours
ROUNDS = 20_000
ROLES = ("viewer", "editor", "admin", "billing")


@pytest.fixture(scope="module")
def eng() -> PolicyEngine:
    cfg, routes = load_setup(EXAMPLES / "policy.yaml")
    return PolicyEngine(cfg, routes, EXAMPLES)


def _principal(i: int) -> Principal:
    return Principal(subject=f"user{i}", tenant="acme", credential_id=f"k{i}", credential_kind="jwt",
                     scopes=frozenset({"projects:read"}), roles=frozenset({ROLES[i % len(ROLES)]}))


def _build(eng: PolicyEngine, i: int, pid: int, ip: str = "10.1.2.3") -> DecisionInput:
    return eng.build_input(_principal(i), route="project", method="GET",
                           path_params={"tenant": "acme", "id": f"p{pid}"}, client_ip=ip, now=NOW,
                           owner=Owner(f"owner{pid}", "acme"))


def _record(benchmark: Any, label: str) -> None:
    data = sorted(benchmark.stats.stats.data)
    mean = sum(data) / len(data)
    info = {"decisions_per_s": round(1 / mean), "p50_us": round(data[len(data) // 2] * 1e6, 1),
            "p99_us": round(data[int(len(data) * 0.99)] * 1e6, 1), "mean_us": round(mean * 1e6, 1)}
    benchmark.extra_info.update(info)
    print(f"\n{label}: {info['decisions_per_s']:,}/s, mean {info['mean_us']} µs, p50 {info['p50_us']} µs, "
          f"p99 {info['p99_us']} µs")


def _run(benchmark: Any, fn: Callable[[Any], Any], args: Iterator[Any], label: str) -> list[Any]:
    out: list[Any] = []

    def call(a: Any) -> None:
        out.append(fn(a))

    benchmark.pedantic(call, setup=lambda: ((next(args),), {}), rounds=ROUNDS, iterations=1, warmup_rounds=200)
    _record(benchmark, label)
    return out


def test_decide_distinct_inputs_evaluated(benchmark: Any, eng: PolicyEngine) -> None:
    inputs = iter([_build(eng, i, i) for i in range(ROUNDS + 400)])
    decisions = _run(benchmark, eng.decide_uncached, inputs, "decide, distinct inputs, each evaluated")
    assert all(d.allowed and not d.cached for d in decisions)
    assert all("viewers-read" in d.policies for d in decisions)
    assert {d.policies for d in decisions} == {("viewers-read",), ("editors-write-projects", "viewers-read")}


def test_decide_distinct_inputs_warm_entities(benchmark: Any, eng: PolicyEngine) -> None:
    # 500 (principal, project) pairs; a new client address each call: no decision-cache hit.
    rng = random.Random(5)
    pairs = [(rng.randrange(1000), rng.randrange(1000)) for _ in range(500)]
    inputs = iter([_build(eng, p, r, ip=f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}")
                   for n, (p, r) in zip(range(ROUNDS + 400), itertools.cycle(pairs), strict=False)])
    decisions = _run(benchmark, eng.decide_uncached, inputs, "decide, distinct inputs, warm entity handles")
    assert all(d.allowed and not d.cached for d in decisions)


def test_decide_distinct_inputs_by_shape(benchmark: Any, eng: PolicyEngine) -> None:
    inputs = iter([_build(eng, i, i) for i in range(2 * 10**6, 2 * 10**6 + ROUNDS + 400)])
    eng.clear_cache()
    decisions = _run(benchmark, eng.decide, inputs, "decide, distinct inputs, decision cache by shape")
    assert all(d.allowed for d in decisions)
    assert sum(not d.cached for d in decisions) <= len(ROLES)  # one evaluation per role's shape


def test_build_and_decide_distinct(benchmark: Any, eng: PolicyEngine) -> None:
    ids = iter(range(10**6, 10**6 + ROUNDS + 400))
    eng.clear_cache()
    decisions = _run(benchmark, lambda i: eng.decide(_build(eng, i, i)), ids, "build_input + decide, distinct")
    assert all(d.allowed for d in decisions)


def test_decide_repeated_input(benchmark: Any, eng: PolicyEngine) -> None:
    inp = _build(eng, 0, 1)
    eng.decide(inp)
    decisions = _run(benchmark, eng.decide, itertools.repeat(inp), "decide, repeated input (cache hit)")
    assert all(d.allowed and d.cached for d in decisions)


def test_build_and_decide_repeated(benchmark: Any, eng: PolicyEngine) -> None:
    eng.decide(_build(eng, 0, 1))
    decisions = _run(benchmark, lambda _: eng.decide(_build(eng, 0, 1)), itertools.repeat(0),
                     "build_input + decide, repeated (cache hit)")
    assert all(d.allowed and d.cached for d in decisions)
