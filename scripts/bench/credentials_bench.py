"""Gateway requests/s with JWT and with DPoP, as ratios to nginx, in one run.

Same layout as bench.py: nginx upstream and the load generator on CPU 1, the proxy
under test on CPU 0, one worker. Portcullis serves the same route with an API key,
a JWT (one ES256 token repeated, as a real client reuses its token until it expires:
the verified-token cache is in play), and a DPoP-bound JWT with a fresh Ed25519 proof
per request (proofs are single-use, so they are made in advance and a wrk Lua script
sends them in turn; each proof is checked in full, including the replay cache).

    .venv/bin/python scripts/bench/credentials_bench.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from joserfc import jwt as jose_jwt
from joserfc.jwk import ECKey, OKPKey

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench import NGX, PATH, PCL, UP, cpu_seconds, start_nginx, stop_all, taskset, wait_http  # noqa: E402
from portcullis.credentials.rfc9449 import jwk_thumbprint  # noqa: E402

ROOT = HERE.parents[1]
ISS, AUD = "https://issuer.bench", "https://api.bench"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def proofs(key: Ed25519PrivateKey, jwk: dict[str, str], url: str, token: str, n: int) -> list[str]:
    """`n` DPoP proofs (RFC 9449 §4.2), each with its own jti, signed with Ed25519."""
    header = b64(json.dumps({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk}, separators=(",", ":")).encode())
    ath = b64(hashlib.sha256(token.encode()).digest())
    now = int(time.time())
    out = []
    for _ in range(n):
        body = b64(json.dumps({"jti": uuid.uuid4().hex, "htm": "GET", "htu": url, "iat": now, "ath": ath},
                              separators=(",", ":")).encode())
        signing_input = f"{header}.{body}".encode()
        out.append(f"{header}.{body}.{b64(key.sign(signing_input))}")
    return out


def wrk(url: str, seconds: int, conns: int, header: str | None = None, script: Path | None = None) -> dict[str, float]:
    cmd = [*taskset("1"), "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if header:
        cmd += ["-H", header]
    if script:
        cmd += ["-s", str(script)]
    out = subprocess.run([*cmd, url], capture_output=True, text=True, check=True).stdout
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            "requests": float(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            "non2xx": float(m.group(1)) if m else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=50)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="portcullis-credbench-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        start_nginx(tmp, procs, forward_for=False)
        issuer_key = ECKey.generate_key("P-256", parameters={"kid": "bench"})
        (tmp / "jwks.json").write_text(json.dumps({"keys": [issuer_key.as_dict(private=False)]}))
        cfg = tmp / "portcullis.yaml"
        cfg.write_text(f"""
data_dir: ./data
server: {{listen: {{port: {PCL}}}, metrics: null, log_level: warning}}
jwt: {{issuers: [{{issuer: "{ISS}", jwks_file: jwks.json, audience: "{AUD}", algorithms: [ES256]}}]}}
dpop: {{jti_cache_size: 1000000}}
upstreams: {{app: {{url: "http://127.0.0.1:{UP}", pool_size: 64}}}}
routes:
  - {{name: list-projects, path: "/v1/tenants/{{tenant}}/projects", methods: [GET], upstream: app,
      auth: [api_key, jwt], scopes: [projects:read], tenant_param: tenant}}
""")
        pcl = str(ROOT / ".venv" / "bin" / "portcullis")
        out = subprocess.run([pcl, "keys", "create", "--config", str(cfg), "--name", "bench", "--tenant", "acme",
                              "--scope", "projects:read", "--rate-limit", "100000000/1m:100000", "--json"],
                             capture_output=True, text=True, check=True)
        api_key = json.loads(out.stdout)["key"]
        now = int(time.time())
        claims = {"iss": ISS, "aud": AUD, "sub": "bench", "tenant": "acme", "scope": "projects:read",
                  "iat": now, "exp": now + 3600, "client_id": "bench-client"}
        token = jose_jwt.encode({"alg": "ES256", "kid": "bench", "typ": "at+jwt"}, claims, issuer_key,
                                algorithms=["ES256"])
        dpop_key = Ed25519PrivateKey.generate()
        dpop_jwk = OKPKey.import_key(dpop_key).as_dict(private=False)
        dpop_jwk = {k: dpop_jwk[k] for k in ("crv", "kty", "x")}
        bound = jose_jwt.encode({"alg": "ES256", "kid": "bench", "typ": "at+jwt"},
                                {**claims, "cnf": {"jkt": jwk_thumbprint(dpop_jwk)}}, issuer_key, algorithms=["ES256"])
        gateway = subprocess.Popen([*taskset("0"), pcl, "serve", "--config", str(cfg)])
        procs.append(gateway)
        url = f"http://127.0.0.1:{PCL}{PATH}"
        wait_http(f"http://127.0.0.1:{NGX}{PATH}")
        wait_http(url, {"Authorization": f"Bearer {api_key}"})
        results: dict[str, dict[str, float]] = {}
        wrk(f"http://127.0.0.1:{NGX}{PATH}", 3, args.connections)
        results["nginx"] = wrk(f"http://127.0.0.1:{NGX}{PATH}", args.seconds, args.connections)
        bearer = (("api-key", f"Authorization: Bearer {api_key}"), ("jwt", f"Authorization: Bearer {token}"))
        for name, header in bearer:
            wrk(url, 3, args.connections, header)
            c0 = cpu_seconds(gateway.pid)
            results[name] = wrk(url, args.seconds, args.connections, header)
            results[name]["cpu_us"] = (cpu_seconds(gateway.pid) - c0) / results[name]["requests"] * 1e6
        # DPoP: one fresh proof per request, made just before the run (iat window 60 s).
        n = int(results["jwt"]["rps"] * args.seconds * 1.5) + 1000
        proof_file = tmp / "proofs.txt"
        proof_file.write_text("\n".join(proofs(dpop_key, dpop_jwk, url, bound, n)) + "\n")
        script = tmp / "dpop.lua"
        script.write_text(f"""
local proofs = {{}}
for line in io.lines("{proof_file}") do proofs[#proofs + 1] = line end
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", "{PATH}", {{["Authorization"] = "DPoP {bound}", ["DPoP"] = proofs[i]}})
end
""")
        c0 = cpu_seconds(gateway.pid)
        results["dpop"] = wrk(url, args.seconds, args.connections, script=script)
        results["dpop"]["cpu_us"] = (cpu_seconds(gateway.pid) - c0) / results["dpop"]["requests"] * 1e6
        results["dpop"]["proofs_made"] = float(n)
        (ROOT / "bench-out").mkdir(exist_ok=True)
        (ROOT / "bench-out" / "credentials.json").write_text(json.dumps(results, indent=2))
        base = results["nginx"]["rps"]
        print(f"\n| credential | requests/s | ratio to nginx ({base:.0f}/s) | CPU µs/request | non-2xx |")
        print("|---|---|---|---|---|")
        for name in ("api-key", "jwt", "dpop"):
            r = results[name]
            print(f"| {name} | {r['rps']:.0f} | {r['rps'] / base:.1%} | {r['cpu_us']:.0f} | {r['non2xx']:.0f} |")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
