"""`serve`'s last start-up hook freezes the start-up heap (docs/benchmarks.md: a full
collection of it paused the event loop 40-70 ms)."""

from __future__ import annotations

import asyncio
import gc

from portcullis.server import freeze_startup_heap


def test_startup_heap_is_frozen_and_later_objects_are_not() -> None:
    built_at_startup: list[list[int]] = [[1]]
    try:
        asyncio.run(freeze_startup_heap())
        assert gc.get_freeze_count() > 0
        tracked = gc.get_objects()
        assert not any(o is built_at_startup for o in tracked)  # never scanned again
        made_later: list[list[int]] = [[2]]
        assert any(o is made_later for o in gc.get_objects())  # collected as usual
        del tracked
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
