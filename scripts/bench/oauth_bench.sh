#!/usr/bin/env bash
# The authorization-server benchmark (issue 4, docs/benchmarks.md): client-credentials
# tokens/s (ES256 JWT access tokens, RFC 9068) and introspections/s (RFC 7662) on one
# worker, Portcullis against panva's oidc-provider configured the same way, in one run.
#
#   scripts/bench/oauth_bench.sh [--seconds 10] [--connections 50] [--rounds 4] [--only NAME]
#
# Installs wrk (apt, as scripts/bench/run.sh does) and oidc-provider (`npm ci` in
# scripts/bench/oidc-provider/) when missing. Layout on a 2-core machine, as in bench.py:
# the server under test (oidc-provider's node process, or `portcullis serve` with its
# audit writer thread) is pinned to CPU 0; wrk runs on CPU 1; as root both run at nice -10.
# Each measurement reports the CPU other work took meanwhile ("other work"): on a busy
# machine requests/s drop and CPU per request rises for both servers; use --rounds N to get
# back-to-back ratios that hold up better. Results also go to bench-out/oauth.json.
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
command -v node >/dev/null && command -v npm >/dev/null || { echo "missing: node and npm" >&2; exit 1; }
if [ ! -f scripts/bench/oidc-provider/node_modules/oidc-provider/package.json ]; then
  (cd scripts/bench/oidc-provider && npm ci --no-audit --no-fund --loglevel=error)
fi
exec .venv/bin/python - "$@" <<'PY'
"""Orchestration (embedded so the benchmark is one command): seed, start, load, report."""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path.cwd()
HERE = ROOT / "scripts" / "bench"
sys.path.insert(0, str(HERE))
from bench import measure_server, pin, stop_all  # noqa: E402

OP_PORT, PCL_PORT = 18201, 18202
SCOPE, AUDIENCE = "api:read", "https://api.bench"
OPAQUE_RESOURCE = "urn:bench:opaque"  # oidc-provider introspects opaque tokens only (server.mjs)



def post_form(url: str, form: dict[str, str], client: tuple[str, str]) -> tuple[int, str]:
    """POST a form with client_secret_basic (RFC 6749 §2.3.1)."""
    basic = ":".join(urllib.parse.quote(p, safe="") for p in client)
    req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), method="POST", headers={
        "Authorization": "Basic " + base64.b64encode(basic.encode()).decode(),
        "Content-Type": "application/x-www-form-urlencoded", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def get_token(base: str, client: tuple[str, str], extra: dict[str, str] | None = None,
              timeout: float = 30) -> str:
    """Wait for the server, then one client-credentials token (fails with the last answer)."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            status, body = post_form(f"{base}/oauth2/token",
                                     {"grant_type": "client_credentials", "scope": SCOPE, **(extra or {})}, client)
        except OSError as exc:
            status, body = 0, str(exc)
        if status == 200 and '"access_token"' in body:
            return str(json.loads(body)["access_token"])
        last = f"{status} {body[:300]}"
        time.sleep(0.2)
    raise RuntimeError(f"{base}/oauth2/token gave no token: {last}")


def check_introspection(base: str, client: tuple[str, str], token: str) -> dict[str, Any]:
    status, body = post_form(f"{base}/oauth2/introspect", {"token": token}, client)
    doc = json.loads(body) if body.startswith("{") else {}
    if status != 200 or doc.get("active") is not True:
        raise RuntimeError(f"{base}/oauth2/introspect: {status} {body[:300]}")
    return doc





def seed_portcullis(data_dir: Path, issuer: str) -> tuple[str, str]:
    """One tenant and one confidential client, through the client directory as the CLI does."""
    from portcullis.gateway import open_key_store
    from portcullis.oauth.config import AuthServerConfig
    from portcullis.oauth.service import open_context

    store, hasher = open_key_store(data_dir)
    ctx = open_context(AuthServerConfig(issuer=issuer), data_dir, hasher, store)
    try:
        ctx.clients.create_tenant("acme")
        client, secret = ctx.clients.create_client(
            name="bench", tenant="acme", auth_method="client_secret_basic", grant_types=["client_credentials"],
            scopes=[SCOPE])
        assert secret is not None
        return client.client_id, secret
    finally:
        ctx.db.close()
        store.close()


def facts() -> dict[str, str]:
    def cmd(*args: str) -> str:
        try:
            return subprocess.run(args, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        except OSError:
            return "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    opv = json.loads((HERE / "oidc-provider/node_modules/oidc-provider/package.json").read_text())["version"]
    from portcullis import __version__
    return {"nproc": cmd("nproc"), "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "node": cmd("node", "--version"), "oidc-provider": opv, "portcullis": __version__,
            "wrk": " ".join(cmd("wrk", "--version").split()[:2]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3])}


def main() -> int:
    ap = argparse.ArgumentParser(prog="oauth_bench.sh")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=4, help="repeat the four measurements, alternating servers")
    ap.add_argument("--only", choices=["oidc-provider", "portcullis"],
                    help="measure one server alone (no ratios)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "oauth.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-oauthbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        servers: dict[str, tuple[str, tuple[str, str], subprocess.Popen[bytes], dict[str, str]]] = {}
        if args.only != "portcullis":
            # oidc-provider: one node process on CPU 0, production mode, its own random secret.
            op_client = ("bench-client", secrets.token_urlsafe(32))
            op = subprocess.Popen([*pin("0"), "node", str(HERE / "oidc-provider/server.mjs"), str(OP_PORT)],
                                  env={**os.environ, "NODE_ENV": "production", "BENCH_CLIENT_ID": op_client[0],
                                       "BENCH_CLIENT_SECRET": op_client[1], "BENCH_RESOURCE": AUDIENCE},
                                  stdout=subprocess.DEVNULL)
            procs.append(op)
            servers["oidc-provider"] = (f"http://127.0.0.1:{OP_PORT}", op_client, op, {"resource": OPAQUE_RESOURCE})
        if args.only != "oidc-provider":
            # Portcullis: the gateway with the authorization server mounted, one process on CPU 0.
            issuer = f"http://127.0.0.1:{PCL_PORT}"
            cfg = tmp / "portcullis.yaml"
            cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {PCL_PORT}}}, metrics: null, log_level: warning}}
auth_server: {{issuer: "{issuer}", signing_alg: ES256, default_audience: "{AUDIENCE}",
               access_token_lifetime_seconds: 600}}
upstreams: {{app: {{url: "http://127.0.0.1:9"}}}}
routes:
  - {{name: unused, path: "/v1/unused", methods: [GET], upstream: app, auth: [api_key], scopes: [{SCOPE}]}}
""")
            pcl_client = seed_portcullis(tmp / "data", issuer)
            gateway = subprocess.Popen([*pin("0"), str(ROOT / ".venv/bin/portcullis"), "serve",
                                        "--config", str(cfg)])
            procs.append(gateway)
            servers["portcullis"] = (issuer, pcl_client, gateway, {})
        tokens: dict[str, str] = {}
        for name, (base, client, _, extra) in servers.items():
            get_token(base, client)  # the JWT path works
            tokens[name] = get_token(base, client, extra)  # the token to introspect
            doc = check_introspection(base, client, tokens[name])
            print(f"{name}: token and introspection ok (introspected token: "
                  f"{'JWT' if tokens[name].count('.') == 2 else 'opaque'}, aud {doc.get('aud')})", file=sys.stderr)

        load = float(Path("/proc/loadavg").read_text().split()[0])
        if load > 1.0:
            print(f"warning: load average {load:.2f} before the run: other work shares the 2 cores, "
                  "absolute figures will be low and noisy; the back-to-back ratios hold up better", file=sys.stderr)
        results: dict[str, list[dict[str, float]]] = {}
        for rnd in range(args.rounds):
            order = list(servers) if rnd % 2 == 0 else list(reversed(servers))
            for kind, script in (("token", "oauth_token.lua"), ("introspect", "oauth_introspect.lua")):
                for name in order:
                    base, client, proc, _ = servers[name]
                    env = {"BENCH_CLIENT_ID": client[0], "BENCH_CLIENT_SECRET": client[1], "BENCH_TOKEN": tokens[name]}
                    r = measure_server(base, HERE / script, env, args.connections, args.seconds, proc.pid)
                    results.setdefault(f"{name}-{kind}", []).append(r)
                    print(f"round {rnd + 1} {name} {kind}: {r['rps']:.0f}/s p50 {r['p50']:.2f} ms "
                          f"p99 {r['p99']:.2f} ms, {r['cpu_us']:.0f} µs CPU/request, non-2xx {r['non2xx']:.0f}, "
                          f"bad {r['bad']:.0f}, other work {r['foreign_cpu']:.0%} of a core", file=sys.stderr)
        audit = "" if "portcullis" not in servers else subprocess.run(
            [str(ROOT / ".venv/bin/portcullis"), "audit", "verify", "--config", str(tmp / "portcullis.yaml")],
            capture_output=True, text=True, check=False).stdout.strip()
        info = facts()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"facts": info, "results": results, "audit_verify": audit,
                                        "args": vars(args) | {"out": str(args.out)}}, indent=2))

        if args.only:
            for key, runs in results.items():
                for r in runs:
                    print(f"{key}: {r['rps']:,.0f}/s, p50 {r['p50']:.2f} ms, p99 {r['p99']:.2f} ms, "
                          f"{r['cpu_us']:.0f} µs CPU/request, non-2xx {r['non2xx']:.0f}, bad {r['bad']:.0f}, "
                          f"other work {r['foreign_cpu']:.0%} of a core")
            return 0

        def median(vals: list[float]) -> float:
            vals, n = sorted(vals), len(vals)
            return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2

        def med(key: str, field: str) -> float:
            return median([r[field] for r in results[key]])

        def paired(kind: str) -> float:
            """Median over rounds of Portcullis/oidc-provider requests/s measured back to back:
            steadier than a ratio of medians when other work comes and goes."""
            return median([p["rps"] / o["rps"] for p, o in zip(results[f"portcullis-{kind}"],
                                                                 results[f"oidc-provider-{kind}"], strict=True)])

        print(f"\n{' · '.join(f'{k} {v}' for k, v in info.items())}")
        print(f"wrk -t1 -c{args.connections}, {args.seconds} s per measurement after a 3 s warm-up, "
              f"{args.rounds} round(s): medians; the ratio is the median of each round's back-to-back ratio\n")
        print("| measure | oidc-provider | Portcullis | Portcullis / oidc-provider |")
        print("|---|---|---|---|")
        for kind, label in (("token", "client-credentials tokens/s (ES256 JWT)"),
                            ("introspect", "introspections/s")):
            o, p = f"oidc-provider-{kind}", f"portcullis-{kind}"
            print(f"| {label} | {med(o, 'rps'):,.0f} | {med(p, 'rps'):,.0f} | "
                  f"**{paired(kind):.1%}** |")
            print(f"| {kind}: p50 latency at max load | {med(o, 'p50'):.2f} ms | {med(p, 'p50'):.2f} ms | "
                  f"{med(p, 'p50') - med(o, 'p50'):+.2f} ms |")
            print(f"| {kind}: p99 latency at max load | {med(o, 'p99'):.2f} ms | {med(p, 'p99'):.2f} ms | "
                  f"{med(p, 'p99') - med(o, 'p99'):+.2f} ms |")
            print(f"| {kind}: CPU per request (process + threads) | {med(o, 'cpu_us'):.0f} µs | "
                  f"{med(p, 'cpu_us'):.0f} µs | {med(o, 'cpu_us') / med(p, 'cpu_us'):.1%} (requests per CPU-second) |")
            bad_o = sum(r["non2xx"] + max(r["bad"], 0) for r in results[o])
            bad_p = sum(r["non2xx"] + max(r["bad"], 0) for r in results[p])
            print(f"| {kind}: other work on the machine during the measurement | "
                  f"{med(o, 'foreign_cpu'):.0%} of a core | {med(p, 'foreign_cpu'):.0%} of a core | |")
            print(f"| {kind}: failed or unexpected responses | {bad_o:.0f} | {bad_p:.0f} | |")
        tok = paired("token")
        intro = med("portcullis-introspect", "rps")
        print(f"\ntargets: tokens/s ≥ 50% of oidc-provider: {tok:.1%} ({'met' if tok >= 0.5 else 'missed'}); "
              f"introspections/s ≥ 5,000: {intro:,.0f} ({'met' if intro >= 5000 else 'missed'})")
        print(f"audit: {audit}")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


sys.exit(main())
PY
