"""Secret files in a data directory: created once, atomically, mode 0600."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def create_once(path: Path, data: bytes) -> None:
    """Write `data` to `path` unless it exists, atomically and race-safe.

    The bytes go to a private temporary file (0600, fsynced) that is hard-linked into
    place: link() fails if `path` exists, unlike rename(), so concurrent creators all end
    up with the one file that won, and no reader ever sees a partly written one. The
    directory (created 0700 if needed) is fsynced so the new entry itself is durable.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
