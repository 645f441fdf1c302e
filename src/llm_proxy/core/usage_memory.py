"""An in-memory usage sink (for tests and for running with the ledger disabled)."""

from __future__ import annotations

from collections import deque
from typing import Any

from ..types import UsageEvent


class MemoryUsageSink:
    def __init__(self, maxlen: int = 100_000) -> None:
        self.events: deque[UsageEvent] = deque(maxlen=maxlen)

    def record(self, event: UsageEvent) -> None:
        self.events.append(event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {"ok": True, "backend": "memory", "recorded": len(self.events)}


class NullUsageSink:
    """usage.enabled: false — records nothing and holds nothing."""

    def record(self, event: UsageEvent) -> None:
        return None

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {"ok": True, "backend": "disabled"}
