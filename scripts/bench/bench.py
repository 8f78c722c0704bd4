"""Gateway benchmark: nginx `proxy_pass` vs Portcullis, same upstream, same load, one run.

Layout on a 2-core machine: the proxy under test (nginx or Portcullis, one worker) is
pinned to CPU 0; the upstream nginx and the load generator share CPU 1, so each proxy
gets one whole core. Throughput comes from wrk (closed loop, fixed connections); the
latency at a fixed 1,000 requests/s from hey (`-q` paces each worker).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BODY = json.dumps({"tenant": "acme", "projects": [{"id": "prj_ac000001", "name": "Roadrunner Tracker",
                                                     "description": "Telemetry for bird detection."}]})
UP, NGX, PCL = 18101, 18102, 18103
PATH = "/v1/tenants/acme/projects"


def taskset(cpu: str) -> list[str]:
    return ["taskset", "-c", cpu] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def nginx_conf(tmp: Path, name: str, server_block: str) -> Path:
    conf = tmp / f"{name}.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 1000000;
  {server_block}
}}
""")
    return conf


def start_nginx(tmp: Path, procs: list[subprocess.Popen[bytes]], *, forward_for: bool = True) -> None:
    """The upstream nginx (fixed JSON, CPU 1) and the reference nginx proxy_pass (CPU 0)."""
    up = nginx_conf(tmp, "upstream", f"""server {{ listen 127.0.0.1:{UP};
      location / {{ default_type application/json; return 200 '{BODY}'; }} }}""")
    xff = "proxy_set_header X-Forwarded-For $remote_addr;" if forward_for else ""
    ngx = nginx_conf(tmp, "proxy", f"""upstream app {{ server 127.0.0.1:{UP}; keepalive 64; }}
      server {{ listen 127.0.0.1:{NGX};
        location / {{ proxy_pass http://app; proxy_http_version 1.1; proxy_set_header Connection ""; {xff} }} }}""")
    procs.append(subprocess.Popen([*taskset("1"), "nginx", "-c", str(up), "-p", str(tmp)]))
    procs.append(subprocess.Popen([*taskset("0"), "nginx", "-c", str(ngx), "-p", str(tmp)]))


def stop_all(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop the newest first (the gateway before the nginx it talks to), each in turn."""
    for proc in reversed(procs):
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:
                if r.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, key: str | None, conns: int, seconds: int) -> dict[str, float]:
    cmd = [*taskset("1"), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {p: _ms(re.search(rf"^\s+{p}%\s+(\S+)", out, re.M).group(1)) for p in ("50", "99")}  # type: ignore[union-attr]
    return {"rps": rps, "p50": lat["50"], "p99": lat["99"], "requests": total,
            "non2xx": float(errors.group(1)) if errors else 0.0}


def hey(url: str, key: str | None, rate: int, seconds: int, workers: int) -> dict[str, float]:
    cmd = [*taskset("1"), "hey", "-z", f"{seconds}s", "-c", str(workers), "-q", str(rate // workers)]
    if key:
        cmd += ["-H", f"Authorization: Bearer {key}"]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    pct = {p: float(re.search(rf"{p}% in ([\d.]+) secs", out).group(1)) * 1000  # type: ignore[union-attr]
           for p in ("50", "99")}
    codes = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", out))
    bad = sum(int(n) for c, n in codes.items() if not c.startswith("2"))
    return {"rps": rps, "p50": pct["50"], "p99": pct["99"], "non2xx": float(bad)}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    assert m, text
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]


def pin(cpu: str) -> list[str]:
    """taskset to `cpu` and, as root, a higher priority (nice -10) for the servers and wrk alike,
    so other work on a shared machine disturbs the measurement less; the same for both sides."""
    return [*(["nice", "-n", "-10"] if os.geteuid() == 0 and shutil.which("nice") else []), *taskset(cpu)]


def wrk_script(base: str, script: Path, env: dict[str, str], conns: int, seconds: int) -> dict[str, float]:
    """wrk (pinned to CPU 1) with a Lua `script` that counts wrong answers (`bad ... responses: N`)."""
    cmd = [*pin("1"), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), base]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env}, check=True)
    out = run.stdout
    if run.stderr.strip():
        print(run.stderr.strip()[:600], file=sys.stderr)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = re.search(r"^bad \w+ responses: (\d+)", out, re.M)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "p50": _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
            "p99": _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)),  # type: ignore[union-attr]
            "non2xx": float(non2xx.group(1)) if non2xx else 0.0,
            "bad": float(bad.group(1)) if bad else -1.0}


def machine_busy() -> float:
    """CPU-seconds all cores spent busy since boot (/proc/stat: total less idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU-seconds used by this process's finished children (servers we started and stopped)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def measure_server(base: str, script: Path, env: dict[str, str], conns: int, seconds: int,
                   pid: int) -> dict[str, float]:
    """`wrk_script` after a 3 s warm-up, plus the server's CPU per request (`cpu_us`, process
    `pid` and its threads) and `foreign_cpu`: the CPU that neither the server nor wrk used
    (other work on the machine, which lowers requests/s; share of one core, 0 when quiet)."""
    wrk_script(base, script, env, conns, 3)  # warm-up: JIT, caches, pools
    c0, m0, w0, t0 = cpu_seconds(pid), machine_busy(), children_cpu(), time.monotonic()
    r = wrk_script(base, script, env, conns, seconds)
    used = cpu_seconds(pid) - c0
    r["cpu_us"] = used / max(r["requests"], 1) * 1e6
    r["foreign_cpu"] = max(0.0, machine_busy() - m0 - used - (children_cpu() - w0)) / (time.monotonic() - t0)
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=15)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--rate", type=int, default=1000)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-out" / "gateway.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start_nginx(tmp, procs)
        cfg = tmp / "portcullis.yaml"
        cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {PCL}}}, metrics: null, log_level: warning}}
upstreams: {{app: {{url: "http://127.0.0.1:{UP}", pool_size: 64}}}}
routes:
  - name: list-projects
    path: "/v1/tenants/{{tenant}}/projects"
    methods: [GET]
    upstream: app
    auth: [api_key]
    scopes: [projects:read]
    tenant_param: tenant
""")
        pcl = [str(ROOT / ".venv" / "bin" / "portcullis")]
        out = subprocess.run([*pcl, "keys", "create", "--config", str(cfg), "--name", "acme-bench",
                              "--tenant", "acme", "--scope", "projects:read", "--rate-limit",
                              "100000000/1m:100000", "--json"], capture_output=True, text=True, check=True)
        key = json.loads(out.stdout)["key"]
        gateway = subprocess.Popen([*taskset("0"), *pcl, "serve", "--config", str(cfg)])
        procs.append(gateway)
        wait_http(f"http://127.0.0.1:{UP}{PATH}")
        wait_http(f"http://127.0.0.1:{NGX}{PATH}")
        wait_http(f"http://127.0.0.1:{PCL}{PATH}", {"Authorization": f"Bearer {key}"})
        results: dict[str, dict[str, float]] = {}
        for name, port, k in (("nginx", NGX, None), ("portcullis", PCL, key)):
            url = f"http://127.0.0.1:{port}{PATH}"
            wrk(url, k, args.connections, 3)  # warm-up: pools, caches, page cache
            cpu0 = cpu_seconds(gateway.pid)
            results[f"{name}-max"] = wrk(url, k, args.connections, args.seconds)
            if name == "portcullis":
                used = cpu_seconds(gateway.pid) - cpu0
                results[f"{name}-max"]["cpu_us_per_request"] = used / results[f"{name}-max"]["requests"] * 1e6
            # hey paces each worker on its own ticker and all workers start together, so
            # N workers send bursts of N: 2 workers is close to an even arrival rate,
            # 10 workers shows how bursts queue behind the per-request CPU cost.
            results[f"{name}-fixed"] = hey(url, k, args.rate, args.seconds, workers=2)
            results[f"{name}-burst"] = hey(url, k, args.rate, args.seconds, workers=10)
        audit_rows = subprocess.run([*pcl, "audit", "verify", "--config", str(cfg)], capture_output=True,
                                    text=True).stdout.strip()
        report = {"results": results, "audit_verify": audit_rows, "cpu_count": os.cpu_count(),
                  "args": vars(args) | {"out": str(args.out)}}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        n, p = results["nginx-max"], results["portcullis-max"]
        nf, pf = results["nginx-fixed"], results["portcullis-fixed"]
        nb, pb = results["nginx-burst"], results["portcullis-burst"]
        print(f"""
| measure | nginx proxy_pass | Portcullis | ratio / difference |
|---|---|---|---|
| max requests/s (wrk -t1 -c{args.connections}, {args.seconds}s) | {n['rps']:.0f} | {p['rps']:.0f} \
| {p['rps'] / n['rps']:.1%} |
| p50 latency at max load | {n['p50']:.2f} ms | {p['p50']:.2f} ms | +{p['p50'] - n['p50']:.2f} ms |
| p99 latency at max load | {n['p99']:.2f} ms | {p['p99']:.2f} ms | +{p['p99'] - n['p99']:.2f} ms |
| achieved rate (hey -c 2, target {args.rate}/s) | {nf['rps']:.0f}/s | {pf['rps']:.0f}/s | |
| p50 latency at {args.rate}/s, 2 workers | {nf['p50']:.2f} ms | {pf['p50']:.2f} ms | +{pf['p50'] - nf['p50']:.2f} ms |
| p99 latency at {args.rate}/s, 2 workers | {nf['p99']:.2f} ms | {pf['p99']:.2f} ms | +{pf['p99'] - nf['p99']:.2f} ms |
| p50 latency at {args.rate}/s, 10 workers (bursts of 10) | {nb['p50']:.2f} ms | {pb['p50']:.2f} ms \
| +{pb['p50'] - nb['p50']:.2f} ms |
| p99 latency at {args.rate}/s, 10 workers (bursts of 10) | {nb['p99']:.2f} ms | {pb['p99']:.2f} ms \
| +{pb['p99'] - nb['p99']:.2f} ms |
| non-2xx responses | {n['non2xx'] + nf['non2xx'] + nb['non2xx']:.0f} \
| {p['non2xx'] + pf['non2xx'] + pb['non2xx']:.0f} | |
| Portcullis CPU per request at max load (process + threads) | | {p['cpu_us_per_request']:.0f} µs | |

audit: {audit_rows}""")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
