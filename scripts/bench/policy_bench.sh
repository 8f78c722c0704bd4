#!/usr/bin/env bash
# The policy-decision benchmark (issue 5, docs/benchmarks.md): Cedar decisions in-process
# (PolicyEngine over examples/policies) and through Portcullis's forward-auth decision
# endpoint, against the Cerbos policy decision point (npm @cerbos/cerbos-linux-x64)
# answering the equivalent policy (scripts/bench/cerbos/policies/project.yaml) over its
# HTTP API (/api/check/resources), in one run.
#
#   scripts/bench/policy_bench.sh [--seconds 10] [--connections 50] [--rounds 2]
#                                 [--in-process 20000] [--only cerbos|portcullis]
#
# Installs wrk (apt) when missing and Cerbos (`npm ci` in scripts/bench/cerbos/). Layout on
# a 2-core machine, as in oauth_bench.sh: the server under test (cerbos, Go, GOMAXPROCS=1;
# or `portcullis serve` with its audit writer thread) is pinned to CPU 0, wrk (one thread)
# to CPU 1; as root both run at nice -10; the in-process measurement runs on CPU 0 before
# the servers start. Two workloads, the same for both servers:
#   repeated  one principal reads project p1 again and again (Portcullis answers from its
#             decision cache; Cerbos has none and evaluates every time);
#   distinct  four principals (viewer, editor, admin, billing) in turn read a project drawn
#             from a million ids: almost every decision is new to both.
# What each side does per decision differs, and the table says so: the decision endpoint
# authenticates an API key, runs the gateway's stages and writes an audit event; Cerbos is
# handed the principal's roles and attributes and only evaluates. Results also go to
# bench-out/policy.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v taskset >/dev/null || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${need[*]})" >&2; exit 1
  fi
fi
CERBOS_BIN=scripts/bench/cerbos/node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64
if [ ! -x "$CERBOS_BIN" ]; then
  command -v npm >/dev/null || { echo "missing: npm (to install Cerbos)" >&2; exit 1; }
  (cd scripts/bench/cerbos && npm ci --no-audit --no-fund --loglevel=error)
fi
exec env PYTHONPATH=src .venv/bin/python - "$@" <<'PY'
"""Orchestration (embedded so the benchmark is one command): measure in-process, start, load, report."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path.cwd()
HERE = ROOT / "scripts" / "bench"
EXAMPLES = ROOT / "examples" / "policies"
CERBOS = HERE / "cerbos"
CERBOS_BIN = CERBOS / "node_modules/@cerbos/cerbos-linux-x64/cerbos-linux-x64"
sys.path.insert(0, str(HERE))
from bench import measure_server, pin, stop_all  # noqa: E402

CERBOS_PORT, CERBOS_GRPC, PCL_PORT, DECISION_PORT = 18301, 18302, 18311, 18312
NOCACHE_PORT, NOCACHE_DECISION_PORT = 18321, 18322
ROSTER = [("vera", "viewer"), ("eddie", "editor"), ("ann", "admin"), ("bill", "billing")]
WORKLOADS = {"repeated": {"principals": 1, "ids": 1}, "distinct": {"principals": 4, "ids": 1_000_000}}
NOW = 1741165200.0  # in-process: Wednesday 2025-03-05 10:00 Berlin, inside business hours



# -- in-process -------------------------------------------------------------------------

def in_process(n: int) -> dict[str, dict[str, float]]:
    """PolicyEngine over examples/policies on CPU 0: per-call times of decide() for n
    distinct inputs (new principal and project each call), of build_input + decide for n
    distinct requests, and of decide() on one repeated input (cache hits)."""
    from portcullis.exchange import Principal
    from portcullis.policy.engine import PolicyEngine
    from portcullis.policy.owners import Owner
    from portcullis.policy.testing import load_setup

    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) >= 2:
        os.sched_setaffinity(0, {0})
    cfg, routes = load_setup(EXAMPLES / "policy.yaml")
    eng = PolicyEngine(cfg, routes, EXAMPLES)

    def build(i: int) -> Any:
        name, role = ROSTER[i % 4]
        p = Principal(subject=f"key:{name}{i}", tenant="acme", credential_id=f"k{i}", credential_kind="api_key",
                      scopes=frozenset({"projects:read"}), roles=frozenset({role}))
        return eng.build_input(p, route="project", method="GET", path_params={"tenant": "acme", "id": f"p{i}"},
                               client_ip="10.1.2.3", now=NOW, owner=Owner(f"owner{i}", "acme"))

    def stats(samples: list[int]) -> dict[str, float]:
        samples.sort()
        mean = statistics.fmean(samples)
        return {"per_s": 1e9 / mean, "mean_us": mean / 1e3, "p50_us": samples[len(samples) // 2] / 1e3,
                "p99_us": samples[int(len(samples) * 0.99)] / 1e3}

    out: dict[str, dict[str, float]] = {}
    clock = time.perf_counter_ns
    for _ in range(2000):  # warm-up (distinct ids of their own)
        eng.decide_uncached(build(10**7 + _))
    inputs = [build(i) for i in range(n)]
    samples = []
    for inp in inputs:  # Cedar evaluates every one: the floor when no two inputs share a shape
        t0 = clock(); d = eng.decide_uncached(inp); samples.append(clock() - t0)  # noqa: E702
        assert d.allowed and not d.cached
    out["decide, distinct inputs, each evaluated (no cache)"] = stats(samples)
    eng.clear_cache()
    hits = eng.hits
    samples = []
    for inp in inputs:
        t0 = clock(); d = eng.decide(inp); samples.append(clock() - t0)  # noqa: E702
        assert d.allowed
    out["decide, distinct inputs (decision cache by shape)"] = {**stats(samples), "evaluated": n - (eng.hits - hits)}
    samples = []
    for i in range(n):
        t0 = clock(); d = eng.decide(build(2 * 10**6 + i)); samples.append(clock() - t0)  # noqa: E702
        assert d.allowed
    out["build_input + decide, distinct"] = stats(samples)
    one = inputs[0]
    eng.decide(one)  # long evicted from the decision cache: put it back
    samples = []
    for _ in range(n):
        t0 = clock(); d = eng.decide(one); samples.append(clock() - t0)  # noqa: E702
        assert d.allowed and d.cached
    out["decide, repeated input (cache hit)"] = stats(samples)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    return out


# -- servers --------------------------------------------------------------------------------

def portcullis_config(tmp: Path, port: int, decision_port: int, cache: bool = True) -> Path:
    """The gateway with the examples' routes and `policy:` section, and a decision listener
    (``cache`` False: no decision cache, Cedar evaluates every decision)."""
    setup = yaml.safe_load((EXAMPLES / "policy.yaml").read_text())
    policy = {**setup["policy"], "dir": str(EXAMPLES)}
    if not cache:
        policy["decision_cache_size"] = 0
    routes = [{**r, "upstream": "app", "auth": ["api_key"]} for r in setup["routes"]]
    doc = {"data_dir": "./data",
           "server": {"listen": {"host": "127.0.0.1", "port": port}, "metrics": None, "log_level": "warning"},
           "forward_auth": {"listen": {"host": "127.0.0.1", "port": decision_port}},
           "upstreams": {"app": {"url": "http://127.0.0.1:9"}}, "routes": routes, "policy": policy}
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "portcullis.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def seed_keys(config: Path) -> list[str]:
    """One API key per roster principal (tenant acme, the principal's one role)."""
    from portcullis.config import load_config
    from portcullis.keysadmin import create_key

    loaded = load_config(config)
    return [create_key(loaded.data_dir, name=name, tenant="acme", scopes=["projects:read"], roles=[role],
                       expires_at=None, rate_limit=None)[1] for name, role in ROSTER]


def http(method: str, url: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def wait(fn: Any, what: str, timeout: float = 30) -> None:
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            if fn():
                return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not come up: {last}")


def cerbos_check(principal: str, role: str, tenant: str, project: str) -> str:
    body = {"requestId": "check", "principal": {"id": f"acme/key:{principal}", "roles": [role], "attr": {
        "subject": f"key:{principal}", "tenant": tenant, "clearance": 1, "networks": ["office"], "mfa": False,
        "high_risk": False}}, "resources": [{"resource": {"kind": "project", "id": project, "attr": {
            "tenant": "acme", "path_tenant": "acme", "owned": True, "sensitivity": 1}}, "actions": ["read"]}]}
    status, text = http("POST", f"http://127.0.0.1:{CERBOS_PORT}/api/check/resources",
                        {"Content-Type": "application/json"}, json.dumps(body).encode())
    if status != 200:
        raise RuntimeError(f"cerbos: {status} {text[:300]}")
    return str(json.loads(text)["results"][0]["actions"]["read"])


def decision(key: str, uri: str, port: int = DECISION_PORT) -> int:
    return http("GET", f"http://127.0.0.1:{port}/nginx", {
        "X-Original-Method": "GET", "X-Original-URI": uri, "X-Real-IP": "10.1.2.3", "X-API-Key": key})[0]





def facts() -> dict[str, str]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except OSError:
            return "?"
    import cedarpy  # noqa: F401
    from importlib.metadata import version

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    from portcullis import __version__
    return {"nproc": cmd("nproc"), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "cedarpy": version("cedarpy"), "cerbos": cmd(str(CERBOS_BIN), "--version").split("\n", 1)[0],
            "portcullis": __version__, "wrk": " ".join(cmd("wrk", "--version").split()[:2]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def main() -> int:
    ap = argparse.ArgumentParser(prog="policy_bench.sh")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2, help="repeat the measurements, alternating servers")
    ap.add_argument("--in-process", type=int, default=20_000, metavar="N", help="calls per in-process measure (0: skip)")
    ap.add_argument("--only", choices=["cerbos", "portcullis"], help="measure one server alone (no ratios)")
    ap.add_argument("--no-uncached", action="store_true",
                    help="skip the second gateway that runs without a decision cache")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "policy.json")
    args = ap.parse_args()

    inproc = in_process(args.in_process) if args.in_process else {}
    for label, r in inproc.items():
        print(f"in-process {label}: {r['per_s']:,.0f}/s, mean {r['mean_us']:.1f} µs, p50 {r['p50_us']:.1f} µs, "
              f"p99 {r['p99_us']:.1f} µs", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="portcullis-policybench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers: dict[str, tuple[str, str, subprocess.Popen[bytes], Any]] = {}
        if args.only != "portcullis":
            cerbos = subprocess.Popen(
                [*pin("0"), str(CERBOS_BIN), "server", f"--config={CERBOS / 'config.yaml'}", "--log-level=error",
                 f"--set=server.httpListenAddr=127.0.0.1:{CERBOS_PORT}",
                 f"--set=server.grpcListenAddr=127.0.0.1:{CERBOS_GRPC}"],
                env={**os.environ, "CERBOS_POLICY_DIR": str(CERBOS / "policies")}, stdout=subprocess.DEVNULL,
                # Its log (wrk's closing connections show up as "context canceled") stays out of the report.
                stderr=(tmp / "cerbos.log").open("wb"))
            procs.append(cerbos)
            wait(lambda: cerbos_check("vera", "viewer", "acme", "p1") == "EFFECT_ALLOW", "cerbos")
            # The same policy: cross-tenant and under-cleared reads are refused.
            assert cerbos_check("vera", "viewer", "globex", "p1") == "EFFECT_DENY"
            assert cerbos_check("nobody", "stranger", "acme", "p1") == "EFFECT_DENY"
            servers["cerbos"] = (f"http://127.0.0.1:{CERBOS_PORT}", "cerbos_check.lua", cerbos,
                                 lambda w: {"BENCH_PRINCIPALS": str(w["principals"]), "BENCH_IDS": str(w["ids"])})
        if args.only != "cerbos":
            gateways = [("portcullis", PCL_PORT, DECISION_PORT, True)]
            if not args.no_uncached:
                gateways.append(("portcullis-nocache", NOCACHE_PORT, NOCACHE_DECISION_PORT, False))
            for name, port, dport, cache in gateways:
                config = portcullis_config(tmp / name, port, dport, cache)
                keys = seed_keys(config)
                gateway = subprocess.Popen([*pin("0"), str(ROOT / ".venv/bin/portcullis"), "serve", "--config",
                                            str(config)])
                procs.append(gateway)
                wait(lambda k=keys[0], d=dport: decision(k, "/v1/tenants/acme/projects/p1", d) == 200,
                     f"{name} decision endpoint")
                for k in keys:
                    assert decision(k, "/v1/tenants/acme/projects/p7", dport) == 200
                assert decision(keys[0], "/v1/tenants/globex/projects/g1", dport) == 403  # tenant isolation
                servers[name] = (f"http://127.0.0.1:{dport}", "forward_auth.lua", gateway,
                                 lambda w, ks=keys: {"BENCH_KEYS": " ".join(ks[:w["principals"]]),
                                                     "BENCH_IDS": str(w["ids"])})
        print("servers up; equivalent decisions checked (allow, cross-tenant deny)", file=sys.stderr)

        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load > 1.0:
            print(f"warning: load average {load:.2f} before the run: other work shares the 2 cores, "
                  "absolute figures will be low and noisy; the back-to-back ratios hold up better", file=sys.stderr)
        results: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for wname, w in WORKLOADS.items():
                for name in order:
                    base, script, proc, envf = servers[name]
                    env = envf(w)
                    r = measure_server(base, HERE / script, env, args.connections, args.seconds, proc.pid)
                    results.setdefault(f"{name}-{wname}", []).append(r)
                    print(f"round {rnd + 1} {name} {wname}: {r['rps']:.0f}/s p50 {r['p50']:.2f} ms "
                          f"p99 {r['p99']:.2f} ms, {r['cpu_us']:.0f} µs CPU/decision, non-2xx {r['non2xx']:.0f}, "
                          f"bad {r['bad']:.0f}, other work {r['foreign_cpu']:.0%} of a core", file=sys.stderr)
        info = facts()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"facts": info, "in_process": inproc, "results": results,
                                        "args": vars(args) | {"out": str(args.out)}}, indent=2))

        def median(vals: list[float]) -> float:
            vals, n = sorted(vals), len(vals)
            return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2

        def med(key: str, field: str) -> float:
            return median([r[field] for r in results[key]])

        print(f"\n{' · '.join(f'{k} {v}' for k, v in info.items())}")
        if inproc:
            print(f"\nin-process (PolicyEngine over examples/policies, CPU 0, {args.in_process:,} calls each)\n")
            print("| call | decisions/s | mean | p50 | p99 |")
            print("|---|---|---|---|---|")
            for label, r in inproc.items():
                print(f"| {label} | {r['per_s']:,.0f} | {r['mean_us']:.1f} µs | {r['p50_us']:.1f} µs | "
                      f"{r['p99_us']:.1f} µs |")
        print(f"\nwrk -t1 -c{args.connections}, {args.seconds} s per measurement after a 3 s warm-up, "
              f"{args.rounds} round(s): medians; the ratio is the median of each round's back-to-back ratio\n")
        if args.only:
            print("| workload | server | decisions/s | p50 | p99 | CPU/decision | failed |")
            print("|---|---|---|---|---|---|---|")
            for key, runs in results.items():
                name, wname = key.rsplit("-", 1)
                print(f"| {wname} | {name} | {med(key, 'rps'):,.0f} | {med(key, 'p50'):.2f} ms | "
                      f"{med(key, 'p99'):.2f} ms | {med(key, 'cpu_us'):.0f} µs | "
                      f"{sum(r['non2xx'] + max(r['bad'], 0) for r in runs):.0f} |")
            return 0
        nc = "portcullis-nocache" in servers
        print("| workload: measure | Cerbos (HTTP API) | Portcullis (decision endpoint) | Portcullis / Cerbos |"
              + (" Portcullis, no decision cache | no cache / Cerbos |" if nc else ""))
        print("|---|---|---|---|" + ("---|---|" if nc else ""))

        def row(label: str, fmt: Any, wname: str, ratio: Any = None) -> None:
            c, p, u = (f"{n}-{wname}" for n in ("cerbos", "portcullis", "portcullis-nocache"))
            cells = [fmt(c), fmt(p), ratio(p, c) if ratio else ""]
            if nc:
                cells += [fmt(u), ratio(u, c) if ratio else ""]
            print(f"| {wname}: {label} | " + " | ".join(cells) + " |")

        def rps_ratio(p: str, c: str) -> str:
            return f"**{median([a['rps'] / b['rps'] for a, b in zip(results[p], results[c], strict=True)]):.1%}**"

        for wname in WORKLOADS:
            row("decisions/s", lambda k: f"{med(k, 'rps'):,.0f}", wname, rps_ratio)
            row("p50 latency at max load", lambda k: f"{med(k, 'p50'):.2f} ms", wname,
                lambda p, c: f"{med(p, 'p50') / med(c, 'p50'):.2f}×")
            row("p99 latency at max load", lambda k: f"{med(k, 'p99'):.2f} ms", wname,
                lambda p, c: f"{med(p, 'p99') / med(c, 'p99'):.2f}×")
            row("CPU per decision", lambda k: f"{med(k, 'cpu_us'):.0f} µs", wname)
            row("other work on the machine", lambda k: f"{med(k, 'foreign_cpu'):.0%} of a core", wname)
            row("failed or unexpected answers",
                lambda k: f"{sum(r['non2xx'] + max(r['bad'], 0) for r in results[k]):.0f}", wname)

        def ratio_of(p: str, c: str, field: str = "rps") -> float:
            return median([a[field] / b[field] for a, b in zip(results[p], results[c], strict=True)])

        rep = ratio_of("portcullis-repeated", "cerbos-repeated")
        dis = ratio_of("portcullis-distinct", "cerbos-distinct")
        lat = max(med(f"portcullis-{w}", q) / med(f"cerbos-{w}", q) for w in WORKLOADS for q in ("p50", "p99"))
        print(f"\ntarget: decision endpoint ≥ Cerbos: repeated {rep:.1%}, distinct {dis:.1%} of its decisions/s, "
              f"latency at most {lat:.2f}× Cerbos's ({'met' if min(rep, dis) >= 1 and lat <= 1 else 'missed'})")
        if nc:
            nrep = ratio_of("portcullis-nocache-repeated", "cerbos-repeated")
            ndis = ratio_of("portcullis-nocache-distinct", "cerbos-distinct")
            print(f"without a decision cache: repeated {nrep:.1%}, distinct {ndis:.1%} of Cerbos's decisions/s")
        if inproc:
            d = inproc["decide, distinct inputs (decision cache by shape)"]
            u = inproc["decide, distinct inputs, each evaluated (no cache)"]
            print(f"target: in-process ≥ 30,000 decisions/s with p99 ≤ 100 µs: distinct inputs "
                  f"{d['per_s']:,.0f}/s, "
                  f"p99 {d['p99_us']:.0f} µs ({'met' if d['per_s'] >= 30000 and d['p99_us'] <= 100 else 'missed'}; "
                  f"{d['evaluated']:.0f} of {args.in_process:,} evaluated by Cedar); every one evaluated: "
                  f"{u['per_s']:,.0f}/s, p99 {u['p99_us']:.0f} µs; repeated input: "
                  f"{inproc['decide, repeated input (cache hit)']['per_s']:,.0f}/s")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


sys.exit(main())
PY
