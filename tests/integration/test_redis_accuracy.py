"""Rate limits stay accurate across nodes (DESIGN.md, "Durability and scale"): one
limit of N per minute, hammered through the shared Redis by two independent client
processes at once, admits N (the burst) plus what refills meanwhile, within 1 %."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.redis_harness import shared_redis_url, unique_prefix

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.services


def test_two_processes_share_one_limit_within_one_percent() -> None:
    url = shared_redis_url()
    prefix = unique_prefix()
    n, per_seconds = 3000, 60.0  # N per minute, all of it available at once (burst N)
    start = time.time() + 1.5  # both processes start together, after their imports
    stop = start + 1.5
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    args = [url, prefix, repr(start), repr(stop), str(n), str(per_seconds), str(n)]
    procs = [subprocess.Popen([sys.executable, "-m", "tests.integration.redis_hammer", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT)
             for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err.decode(errors="replace")[-2000:]
        results.append(json.loads(out.decode().strip().splitlines()[-1]))
    admitted = sum(r["admitted"] for r in results)
    attempts = sum(r["attempts"] for r in results)
    assert sum(r["errors"] for r in results) == 0
    assert all(r["admitted"] > 0 for r in results), results  # both really competed
    # GCRA: the burst, plus one request per interval that passed while hammering (from
    # the first call of either process to the last answer; a slow start is not counted).
    first = min(r["first"] for r in results)
    last = max(r["last"] for r in results)
    assert first < stop - 0.5, "the clients started too late to compete"
    expected = n + (last - first) * n / per_seconds
    assert attempts > 2 * expected, f"not saturated: {results}"
    print(f"admitted {admitted} of {attempts} attempts, expected {expected:.0f}: {results}")
    assert abs(admitted - expected) <= 0.01 * n, f"admitted {admitted}, expected {expected:.0f}: {results}"
