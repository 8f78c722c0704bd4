"""The ordered chain of stages (DESIGN.md, "The request path").

A stage returns a decision — ``None`` to continue, or a `Problem` to respond — rather
than raising for control flow (Envoy's filter status). The chain is assembled once at
start-up from the config; stage order is data.
"""

from __future__ import annotations

from typing import ClassVar, Protocol, runtime_checkable

from portcullis.exchange import Exchange
from portcullis.problems import Problem


class Stage(Protocol):
    """One step of the request path. Built once from its config; must not block the loop."""

    name: ClassVar[str]

    async def on_request(self, exchange: Exchange) -> Problem | None:
        """Inspect or enrich the exchange; return a Problem to refuse."""
        ...


@runtime_checkable
class ResponseStage(Protocol):
    """A stage that also sees the response headers before they are sent."""

    name: ClassVar[str]

    async def on_request(self, exchange: Exchange) -> Problem | None: ...

    async def on_response(self, exchange: Exchange) -> None:
        """May add or rewrite `exchange.response_headers`."""
        ...


@runtime_checkable
class CompletionStage(Protocol):
    """A stage told once the exchange is over (response sent, refused or failed)."""

    name: ClassVar[str]

    def on_complete(self, exchange: Exchange) -> None:
        """Must not block and must not raise."""
        ...


class Pipeline:
    """Stages in order, split once by capability so the hot path does no type checks."""

    def __init__(self, stages: list[Stage], completions: list[CompletionStage]) -> None:
        self.stages = stages
        self.request_stages = [s.on_request for s in stages]
        self.response_stages = [s.on_response for s in reversed(stages) if isinstance(s, ResponseStage)]
        self.completions = [c.on_complete for c in completions]

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]
