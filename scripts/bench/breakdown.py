"""Where a request's CPU goes: the gateway with parts of the pipeline switched off.

Runs the benchmark's route behind an nginx upstream (as bench.py does), pinned to one
core, once per variant, and reports CPU microseconds per request (process + threads,
from /proc) under wrk load. Variants are made by rewiring the built gateway in this
process — a measuring tool only; nothing here is a product setting.

    .venv/bin/python scripts/bench/breakdown.py            # all variants
    .venv/bin/python scripts/bench/breakdown.py --child full CONFIG   (internal)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import PATH, UP, cpu_seconds, nginx_conf, taskset, wait_http  # noqa: E402

ROOT = HERE.parents[1]
PORT = 18104
VARIANTS = {
    "full": "the whole pipeline, audit on (what bench.py measures)",
    "audit-not-stored": "audit events built and submitted, but the writer discards them",
    "no-record": "no audit events at all (record stage and writer off)",
    "no-record-no-metrics": "no audit, no metrics",
    "proxy-only": "normalize + route + proxy only: no auth, limits, audit or metrics",
}


def child(variant: str, config: str) -> int:
    """Serve CONFIG with `variant` applied (runs in the measured process)."""
    from portcullis import server
    from portcullis.config import load_config
    from portcullis.gateway import Gateway, build_gateway

    def build(loaded: object) -> Gateway:
        gw = build_gateway(loaded)  # type: ignore[arg-type]
        app = gw.app
        if variant == "audit-not-stored":
            gw.writer.submit = lambda event: True  # type: ignore[method-assign]
        if variant in ("no-record", "no-record-no-metrics", "proxy-only"):
            app._completions = [c for c in app._completions if "RecordStage" not in repr(c)]
        if variant in ("no-record-no-metrics", "proxy-only"):
            app._completions = [c for c in app._completions if "MetricsStage" not in repr(c)]
        if variant == "proxy-only":
            keep = ("NormalizeStage", "RouteStage", "ProxyStage")
            app._request_stages = [s for s in app._request_stages if any(k in repr(s) for k in keep)]
        return gw

    server.build_gateway = build  # type: ignore[assignment]
    return server.serve(load_config(Path(config)))


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-breakdown-"))
    body = json.dumps({"tenant": "acme", "projects": []})
    up = nginx_conf(tmp, "upstream", f"""server {{ listen 127.0.0.1:{UP};
      location / {{ default_type application/json; return 200 '{body}'; }} }}""")
    nginx = subprocess.Popen([*taskset("1"), "nginx", "-c", str(up), "-p", str(tmp)])
    pcl = str(ROOT / ".venv" / "bin" / "portcullis")
    try:
        wait_http(f"http://127.0.0.1:{UP}{PATH}")
        print("| variant | what runs | requests/s | CPU µs per request |\n|---|---|---|---|")
        for variant, what in VARIANTS.items():
            d = tmp / variant
            d.mkdir()
            cfg = d / "gw.yaml"
            cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {PORT}}}, metrics: null, log_level: warning}}
upstreams: {{app: {{url: "http://127.0.0.1:{UP}", pool_size: 64}}}}
routes:
  - {{name: list-projects, path: "/v1/tenants/{{tenant}}/projects", methods: [GET], upstream: app,
      auth: [api_key], scopes: [projects:read], tenant_param: tenant}}
""")
            out = subprocess.run([pcl, "keys", "create", "--config", str(cfg), "--name", "bench", "--tenant", "acme",
                                  "--scope", "projects:read", "--rate-limit", "100000000/1m:100000", "--json"],
                                 capture_output=True, text=True, check=True)
            key = json.loads(out.stdout)["key"]
            proc = subprocess.Popen([*taskset("0"), sys.executable, __file__, "--child", variant, str(cfg)])
            try:
                url = f"http://127.0.0.1:{PORT}{PATH}"
                wait_http(url, {"Authorization": f"Bearer {key}"})
                hdr = ["-H", f"Authorization: Bearer {key}"]
                warm = [*taskset("1"), "wrk", "-t1", "-c50", "-d3s", *hdr, url]
                subprocess.run(warm, capture_output=True, check=True)
                c0 = cpu_seconds(proc.pid)
                res = subprocess.run([*taskset("1"), "wrk", "-t1", "-c50", "-d10s", *hdr, url], capture_output=True,
                                     text=True, check=True).stdout
                used = cpu_seconds(proc.pid) - c0
                n = int(res.split(" requests in")[0].split()[-1])
                rps = float(res.split("Requests/sec:")[1].split()[0])
                print(f"| {variant} | {what} | {rps:.0f} | {used / n * 1e6:.0f} |", flush=True)
            finally:
                proc.terminate()
                proc.wait(20)
                time.sleep(0.5)
        return 0
    finally:
        nginx.terminate()
        nginx.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3]))
    os.chdir(ROOT)
    sys.exit(main())
