"""`portcullis serve --workers N`: N gateway processes sharing one listening port.

Each worker is a full gateway (its own event loop and audit writer) bound to the same
address with SO_REUSEPORT, so the kernel spreads connections over them. What must be
shared between workers is shared through the data directory (SQLite in WAL mode: keys,
revocations, the authorization server, the audit chain) or through Redis (rate-limit
counters, replay caches). A config whose state would silently become per-worker —
in-memory counters and replay caches without `redis:` — is refused before anything
starts: N workers would admit N times a rate limit and accept a replayed DPoP proof
or signature nonce in another worker.

The supervisor forwards SIGTERM/SIGINT to the workers and exits 0 once all have shut
down cleanly; a worker that dies on its own is restarted (at most `MAX_RESTARTS` times a
minute, then the supervisor stops them all and exits 1).
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from portcullis.config import GatewayConfig

log = logging.getLogger("portcullis.workers")

MAX_WORKERS = 64
MAX_RESTARTS = 5


def per_worker_state_problems(cfg: GatewayConfig, workers: int) -> list[str]:
    """Why `cfg` cannot run in `workers` processes (empty: it can)."""
    if workers <= 1:
        return []
    problems = []
    if workers > MAX_WORKERS:
        problems.append(f"--workers: at most {MAX_WORKERS}")
    if cfg.redis is None:
        problems.append(
            "--workers > 1 needs `redis:` in the config: rate-limit counters, quotas and replay caches "
            "(DPoP jti, RFC 9421 nonces) are per process otherwise, so N workers would admit N times "
            "each limit and accept a replay in another worker")
    return problems


def serve_workers(config_path: Path, cfg: GatewayConfig, workers: int, host: str | None,
                  port: int | None) -> int:
    """Run `workers` worker processes until SIGTERM/SIGINT; the exit status."""
    problems = per_worker_state_problems(cfg, workers)
    if problems:
        for problem in problems:
            log.error("cannot start: %s", problem)
        return 1
    base = [sys.executable, "-m", "portcullis", "serve", "--config", str(config_path), "--reuse-port"]
    if host is not None:
        base += ["--host", host]
    if port is not None:
        base += ["--port", str(port)]

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen([*base, "--worker-index", str(i)])

    procs = [spawn(i) for i in range(workers)]
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        stopping.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    restarts: deque[float] = deque()
    failed = False
    while True:
        alive = [p for p in procs if p.poll() is None]
        if stopping and not alive:
            break
        if not stopping:
            for i, p in enumerate(procs):
                code = p.poll()
                if code is None:
                    continue
                now = time.monotonic()
                while restarts and now - restarts[0] > 60:
                    restarts.popleft()
                if len(restarts) >= MAX_RESTARTS:
                    log.error("worker %d exited (%s) and workers keep failing: stopping all", i, code)
                    failed = True
                    forward(signal.SIGTERM, None)
                    break
                log.error("worker %d exited unexpectedly (%s): restarting it", i, code)
                restarts.append(now)
                procs[i] = spawn(i)
        time.sleep(0.1)
    codes = [p.wait() for p in procs]
    if failed or any(c != 0 for c in codes):
        log.error("workers exited with %s", codes)
        return 1
    log.info("all %d workers stopped cleanly", workers)
    return 0

