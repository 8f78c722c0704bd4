"""Redis servers for tests: the shared one (skip when absent) and throwaway ones.

Fault tests never touch the shared server: `ThrowawayRedis` runs its own
``redis-server`` on a free loopback port in a temp dir, without persistence, and can be
killed, restarted on the same port, frozen (SIGSTOP) and thawed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.harness import free_port

SHARED_URL = os.environ.get("PORTCULLIS_TEST_REDIS", "redis://127.0.0.1:6379/15")


def _ping(host: str, port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def shared_redis_url() -> str:
    """The shared server's URL (database 15), or skip the test saying why."""
    from urllib.parse import urlsplit

    parts = urlsplit(SHARED_URL)
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    if not _ping(host, port):
        pytest.skip(f"shared Redis at {host}:{port} is not reachable (set PORTCULLIS_TEST_REDIS to point elsewhere)")
    return SHARED_URL


def unique_prefix() -> str:
    return f"test:{uuid.uuid4().hex[:12]}:"


class ThrowawayRedis:
    """A private redis-server on 127.0.0.1:<free port>; `stop()` kills it, `start()` again
    reuses the port (so clients configured with the URL reconnect by themselves)."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed: fault tests need their own throwaway server")
        self._binary = binary
        self.dir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> None:
        assert self.proc is None, "already running"
        self.proc = subprocess.Popen(
            [self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"), "--protected-mode", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping("127.0.0.1", self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"throwaway redis-server did not start:\n{log}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill it (SIGKILL: no goodbye to clients, as in a crash)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a frozen process must die too
                self.proc.kill()
            self.proc.wait(timeout=5)
            self.proc = None

    def freeze(self) -> None:
        """SIGSTOP: connections stay open but nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
