"""Fixtures for governance tests: a settable clock, an in-memory audit sink, and a
`Governance` over a real SQLite store in a temp directory."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from portcullis.audit.events import AuditEvent
from portcullis.governance import Governance, GovernanceConfig, GovernanceStore

T0 = 1_800_000_000.0


class Clock:
    """Wall-clock stand-in; `advance` moves it forward."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MemoryAudit:
    """Collects events; `fail` makes the next appends raise (an unusable audit log)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    def append_batch(self, events: list[AuditEvent]) -> list[AuditEvent]:
        if self.fail:
            raise OSError("disk full")
        self.events.extend(events)
        return events

    def reasons(self) -> list[str]:
        return [e.reason for e in self.events]

    def of(self, reason: str) -> list[AuditEvent]:
        return [e for e in self.events if e.reason == reason]


GovFactory = Callable[..., Governance]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def audit() -> MemoryAudit:
    return MemoryAudit()


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    d = tmp_path / "policies"
    d.mkdir()
    return d


@pytest.fixture
def make_gov(tmp_path: Path, clock: Clock, audit: MemoryAudit, policy_dir: Path) -> Iterator[GovFactory]:
    """Governance instances over ONE store file, each with its own engine (like separate
    processes). Keyword arguments override config fields."""
    made: list[Governance] = []

    def make(*, audit_sink: Any = None, alerts: Any = (), monotonic: Any = None, **cfg: Any) -> Governance:
        settings: dict[str, Any] = {"approvers": ("alice", "bob", "carol"), "policy_dir": str(policy_dir),
                                    "break_glass_actors": ("oncall",), **cfg}
        gov = Governance(GovernanceStore(tmp_path / "governance.db"), GovernanceConfig(**settings),
                         audit if audit_sink is None else audit_sink, clock=clock, alerts=alerts,
                         **({} if monotonic is None else {"monotonic": monotonic}))
        made.append(gov)
        return gov

    yield make
    for g in made:
        g.close()


@pytest.fixture
def gov(make_gov: GovFactory) -> Governance:
    return make_gov()
