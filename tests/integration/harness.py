"""Starts a real gateway (uvicorn, real sockets) in a thread for end-to-end tests."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from portcullis.audit.events import AuditEvent
from portcullis.config import LoadedConfig, parse_config
from portcullis.gateway import Gateway, build_gateway, open_audit_store
from portcullis.server import make_server, start_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GatewayThread:
    """A gateway served by uvicorn in a background thread with its own loop."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.gw: Gateway = build_gateway(loaded)
        self.port = loaded.config.server.listen.port
        self.server = make_server(self.gw, loaded)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> None:
        self._stop_metrics = start_metrics(self.gw, self.loaded)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=15)
        self._stop_metrics()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    header_list: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    port: int
    default_headers: dict[str, str] = field(default_factory=dict)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers={**self.default_headers, **(headers or {})})
            r = conn.getresponse()
            data = r.read()
            hl = [(k.lower(), v) for k, v in r.getheaders()]
            return Response(r.status, dict(hl), hl, data)
        finally:
            conn.close()


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes and read whatever comes back until the peer closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
                if b"\r\n\r\n" in b"".join(chunks):
                    head, _, rest = b"".join(chunks).partition(b"\r\n\r\n")
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:") and len(rest) >= int(line.split(b":")[1]):
                            return b"".join(chunks)
        except TimeoutError:
            pass
        return b"".join(chunks)


def write_config(data_dir: Path, doc: dict[str, Any]) -> LoadedConfig:
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "config.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return parse_config(path.read_text(), path)


def find_audit_event(gateway: GatewayThread, request_id: str) -> AuditEvent:
    """The audit event of `request_id`, after flushing the gateway's writer."""
    assert gateway.gw.writer.flush(10.0)
    store = open_audit_store(gateway.loaded.data_dir, writable=False)
    try:
        for ev in store.iter_events(after_seq=0):
            if ev.request_id == request_id:
                return ev
    finally:
        store.close()
    raise AssertionError(f"no audit event for request {request_id}")
