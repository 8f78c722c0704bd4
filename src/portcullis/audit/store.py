"""What an audit log backend must do (`AuditStore`), and the records it hands back."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from portcullis.audit.events import AuditEvent


class AuditStoreError(Exception):
    """The store cannot do what was asked (e.g. append on a read-only store)."""


class CorruptEventError(AuditStoreError):
    """A stored row cannot be decoded into an `AuditEvent` (a column has the wrong type).

    Raised by `AuditStore.iter_events`/`tail`; iteration can be resumed past the bad
    row with ``iter_events(after_seq=err.seq)``.
    """

    def __init__(self, seq: int, detail: str) -> None:
        super().__init__(f"seq {seq}: {detail}")
        self.seq = seq
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that the chain's hash at `seq` was `hash` at time `ts`.

    `signature` is the hex Ed25519 signature over
    `portcullis.audit.chain.checkpoint_message(seq, hash, ts)` by the key `key_id`.
    """

    seq: int
    hash: str
    ts: float
    signature: str
    key_id: str


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The last event (`seq`, `hash`; 0 and the genesis hash when empty) and the highest
    seq any checkpoint refers to (`checkpoint_seq`, 0 if none), read in one snapshot."""

    seq: int
    hash: str
    checkpoint_seq: int


class AuditStore(Protocol):
    """An append-only, hash-chained, checkpointed audit log.

    Several processes (the gateway, the CLI writing an admin event) may append to the
    same log; the backend must keep one linear chain across all of them.
    """

    def append_batch(self, events: list[AuditEvent], *, assume_normalized: bool = False) -> list[AuditEvent]:
        """Chain and durably store `events`, in order; returns the same objects.

        `assume_normalized` lets a caller that has already normalized every event
        (the `AuditWriter` does so in `submit`) skip the repeat.

        In ONE write transaction: normalize the events
        (`portcullis.audit.chain.normalize_event`), read the current head (last seq and
        hash) from the database itself (never a cache, since other processes append
        too), assign ``seq``/``prev_hash``/``hash``, insert, write one signed
        `Checkpoint` for the batch's last event, and commit durably. When this returns,
        the events survive a crash. On error nothing is stored and the events'
        chain fields are meaningless; calling again with the same list is safe. An
        empty list is a no-op.
        """
        ...

    def iter_events(self, after_seq: int = 0, limit: int | None = None) -> Iterator[AuditEvent]:
        """Events with ``seq > after_seq`` in seq order, at most `limit`, streamed.

        Raises `CorruptEventError` at a row that cannot be decoded.
        """
        ...

    def tail(self, n: int) -> list[AuditEvent]:
        """The last `n` events, oldest first."""
        ...

    def head(self) -> ChainHead:
        """The current head of the chain and the highest checkpointed seq (one snapshot)."""
        ...

    def checkpoints(self, after_seq: int = 0, limit: int | None = None) -> Iterator[Checkpoint]:
        """Checkpoints with ``seq > after_seq``, ordered by seq then insertion, streamed."""
        ...

    def close(self) -> None:
        """Release connections; the store must not be used afterwards."""
        ...
