"""Child process for test_audit_crash: audit as fast as possible until killed.

Usage: python audit_crash_harness.py DB_PATH KEY_PATH ID_PREFIX [MAX_SECONDS]

Submits events with request ids ``{ID_PREFIX}-{n:08d}`` (n = 0, 1, ...) from an asyncio
loop and prints ``ack <request_id>`` on stdout, flushed, for every event once the
writer reports it durable. Meant to be SIGKILLed; stops by itself after MAX_SECONDS
(default 120) so a lost parent cannot leave it running forever.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from portcullis.audit.events import AuditEvent
from portcullis.audit.keys import load_or_create_audit_key
from portcullis.audit.sqlite import SqliteAuditStore
from portcullis.audit.writer import AuditWriter


def acknowledge(batch: list[AuditEvent]) -> None:
    sys.stdout.write("".join(f"ack {e.request_id}\n" for e in batch))
    sys.stdout.flush()


async def produce(writer: AuditWriter, prefix: str, deadline: float) -> None:
    n = 0
    while time.monotonic() < deadline:
        for _ in range(200):
            event = AuditEvent(
                ts=time.time(), kind="request", request_id=f"{prefix}-{n:08d}", decision="allow",
                reason="ok", method="POST", host="api.example.com", path=f"/orders/{n}", status=201,
                bytes_in=128, bytes_out=64, latency_ms=0.5, client_ip="203.0.113.9",
                subject="crash-test", extra={"n": n},
            )
            if not writer.submit(event):
                await asyncio.sleep(0.001)  # backlog full: back off like the gateway's 503s
                break
            n += 1
        await asyncio.sleep(0)


def main(argv: list[str]) -> int:
    db, key_path, prefix = Path(argv[1]), Path(argv[2]), argv[3]
    max_seconds = float(argv[4]) if len(argv) > 4 else 120.0
    store = SqliteAuditStore(db, signing_key=load_or_create_audit_key(key_path))
    writer = AuditWriter(store, max_batch=256, max_backlog=20_000, on_durable=acknowledge)
    writer.start()
    try:
        asyncio.run(produce(writer, prefix, time.monotonic() + max_seconds))
    finally:
        writer.close()
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
