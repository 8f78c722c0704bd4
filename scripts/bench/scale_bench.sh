#!/usr/bin/env bash
# The scale-out benchmark (issue 6, docs/benchmarks.md): gateway requests/s as a ratio to
# nginx proxy_pass measured in the same run, for
#   single    one node as shipped: SQLite stores and audit, in-process (memory) GCRA limits;
#   shared    the scale-out setup: every store and the audit chain in PostgreSQL
#             (`storage.url`, a fresh schema in the shared server's database `test`), the
#             limits (the key's own and a per-tenant route limit) in Redis (`redis:`);
#   shared-w2 the same with `serve --workers 2` (only where there are >= 2 cores).
#
#   scripts/bench/scale_bench.sh [--seconds 10] [--connections 50]
#
# Reuses scripts/bench/bench.py (nginx upstream and reference proxy, wrk parsing, the CPU
# layout: the proxy under test on CPU 0, upstream nginx and wrk on CPU 1). With --workers 2
# the gateway is allowed both CPUs, so it competes with wrk and the upstream: on a 2-core
# machine that figure shows the cost of sharing, not a speed-up. PostgreSQL and Redis are
# the machine's shared servers (not pinned). Installs nginx and wrk (apt) when missing,
# like run.sh. Results also go to bench-out/scale.json.
set -euo pipefail
cd "$(dirname "$0")/../.."
need=()
for tool in nginx wrk taskset; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  pkgs=()
  for t in "${need[@]}"; do case "$t" in nginx) pkgs+=(nginx-light);; taskset) pkgs+=(util-linux);; *) pkgs+=("$t");; esac; done
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" >/dev/null
  else
    echo "missing: ${need[*]} (apt-get install ${pkgs[*]})" >&2; exit 1
  fi
fi
exec env PYTHONPATH=src:scripts/bench .venv/bin/python - "$@" <<'PY'
"""Orchestration: nginx reference, then each Portcullis variant on the same port and load."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

import redis
import sqlalchemy as sa

from bench import NGX, PATH, PCL, ROOT, UP, cpu_seconds, start_nginx, stop_all, taskset, wait_http, wrk

PG_URL = os.environ.get("PORTCULLIS_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("PORTCULLIS_BENCH_REDIS", "redis://127.0.0.1:6379/14")
PCL_BIN = str(ROOT / ".venv" / "bin" / "portcullis")

ap = argparse.ArgumentParser()
ap.add_argument("--seconds", type=int, default=10)
ap.add_argument("--connections", type=int, default=50)
ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "scale.json")
args = ap.parse_args()
cores = os.cpu_count() or 1

tmp = Path(tempfile.mkdtemp(prefix="portcullis-scale-"))
schema = f"bench_{secrets.token_hex(4)}"
prefix = f"bench:{secrets.token_hex(4)}:"
admin = sa.create_engine(PG_URL.replace("postgresql://", "postgresql+psycopg://"))
with admin.connect() as conn:
    conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    conn.commit()
sep = "&" if "?" in PG_URL else "?"
schema_url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"


def config(name: str, shared: bool) -> Path:
    d = tmp / name
    d.mkdir()
    cfg = d / "portcullis.yaml"
    extra = ""
    if shared:
        extra = f"""
storage: {{url: "{schema_url}"}}
redis: {{url: "{REDIS_URL}", key_prefix: "{prefix}{name}:", on_failure: {{limits: closed}}}}
"""
    cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {PCL}}}, metrics: null, log_level: warning}}
upstreams: {{app: {{url: "http://127.0.0.1:{UP}", pool_size: 64}}}}
rate_limits:
  per-tenant: {{requests: 100000000, per_seconds: 60, burst: 100000, key: tenant}}
routes:
  - name: list-projects
    path: "/v1/tenants/{{tenant}}/projects"
    methods: [GET]
    upstream: app
    auth: [api_key]
    scopes: [projects:read]
    tenant_param: tenant
    rate_limit: per-tenant
{extra}""")
    if shared:
        subprocess.run([PCL_BIN, "db", "upgrade", "--config", str(cfg)], check=True, capture_output=True)
    return cfg


procs: list[subprocess.Popen[bytes]] = []
results: dict[str, dict[str, float]] = {}
try:
    start_nginx(tmp, procs)
    wait_http(f"http://127.0.0.1:{UP}{PATH}")
    wait_http(f"http://127.0.0.1:{NGX}{PATH}")
    url_ngx = f"http://127.0.0.1:{NGX}{PATH}"
    wrk(url_ngx, None, args.connections, 3)
    results["nginx"] = wrk(url_ngx, None, args.connections, args.seconds)
    variants = [("single", False, 1), ("shared", True, 1)]
    if cores >= 2:
        variants.append(("shared-w2", True, 2))
    made: dict[bool, tuple[Path, str]] = {}  # `--workers 2` reuses the shared node's data directory
    for name, shared, workers in variants:
        if shared not in made:
            cfg = config(name, shared)
            out = subprocess.run([PCL_BIN, "keys", "create", "--config", str(cfg), "--name", f"bench-{name}",
                                  "--tenant", "acme", "--scope", "projects:read", "--rate-limit",
                                  "100000000/1m:100000", "--json"], capture_output=True, text=True, check=True)
            made[shared] = cfg, json.loads(out.stdout)["key"]
        cfg, key = made[shared]
        cpus = "0" if workers == 1 else "0,1"
        gw = subprocess.Popen([*taskset(cpus), PCL_BIN, "serve", "--config", str(cfg), "--workers", str(workers)])
        try:
            url = f"http://127.0.0.1:{PCL}{PATH}"
            wait_http(url, {"Authorization": f"Bearer {key}"})
            wrk(url, key, args.connections, 3)  # warm-up
            cpu0 = cpu_seconds(gw.pid) if workers == 1 else 0.0
            r = wrk(url, key, args.connections, args.seconds)
            if workers == 1:
                r["cpu_us_per_request"] = (cpu_seconds(gw.pid) - cpu0) / r["requests"] * 1e6
            r["ratio_to_nginx"] = r["rps"] / results["nginx"]["rps"]
            results[name] = r
        finally:
            stop_all([gw])
        verify = subprocess.run([PCL_BIN, "audit", "verify", "--config", str(cfg)], capture_output=True, text=True)
        results[name]["audit_verify_ok"] = float(verify.returncode == 0)
    # Afterwards, nginx again: the ratio uses the mean of both nginx runs (drift check).
    results["nginx-after"] = wrk(url_ngx, None, args.connections, args.seconds)
finally:
    stop_all(procs)
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        conn.commit()
    admin.dispose()
    shutil.rmtree(tmp, ignore_errors=True)

ngx = (results["nginx"]["rps"] + results["nginx-after"]["rps"]) / 2
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps({"results": results, "cpu_count": cores, "args": vars(args) | {"out": str(args.out)}},
                               indent=2))
print(f"\n| setup | requests/s (wrk -t1 -c{args.connections}, {args.seconds}s) | ratio to nginx | p50 | p99 "
      "| CPU/request | audit verify |")
print("|---|---|---|---|---|---|---|")
print(f"| nginx proxy_pass (before / after) | {results['nginx']['rps']:.0f} / {results['nginx-after']['rps']:.0f} "
      f"| 100% | {results['nginx']['p50']:.2f} ms | {results['nginx']['p99']:.2f} ms | | |")
labels = {"single": "Portcullis, one node: SQLite + memory limits, 1 worker",
          "shared": "Portcullis, scale-out: PostgreSQL audit/stores + Redis limits, 1 worker",
          "shared-w2": "Portcullis, scale-out, `--workers 2` (both CPUs)"}
for name, label in labels.items():
    if name in results:
        r = results[name]
        cpu = f"{r['cpu_us_per_request']:.0f} µs" if "cpu_us_per_request" in r else "n/a"
        print(f"| {label} | {r['rps']:.0f} | {r['rps'] / ngx:.1%} | {r['p50']:.2f} ms | {r['p99']:.2f} ms | {cpu} "
              f"| {'ok' if r['audit_verify_ok'] else 'FAILED'} |")
print(f"\nnon-2xx: " + ", ".join(f"{k} {v['non2xx']:.0f}" for k, v in results.items()))
PY
