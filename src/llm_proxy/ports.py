"""Protocols for the pluggable services the gateway talks to (auth, usage ledger, metrics)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

from .types import ApiKeyRecord, Principal, UsageEvent


class Authenticator(Protocol):
    """Turns request headers into a Principal, or raises Unauthorized / AuthUnavailable."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal: ...

    def health(self) -> dict[str, Any]:
        """{"ok": bool, ...details}; used by readiness."""
        ...


class Policy(Protocol):
    def may_use(self, principal: Principal, model_id: str) -> bool: ...

    def is_admin(self, principal: Principal) -> bool: ...


class UsageSink(Protocol):
    """Receives one UsageEvent per finished request. record() never blocks and never drops."""

    def record(self, event: UsageEvent) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def health(self) -> dict[str, Any]: ...


class ApiKeySource(Protocol):
    """Where service API keys are kept (store/api_keys.py): auth/ loads them all and is told of changes."""

    @property
    def pg(self) -> bool:
        """True when `listen` can deliver changes at once (PostgreSQL NOTIFY)."""
        ...

    @property
    def listening(self) -> bool: ...

    async def migrate(self) -> None: ...

    async def load(self) -> list[ApiKeyRecord]:
        """Every key that is neither revoked nor expired."""
        ...

    async def listen(self, on_change: Callable[[], None], on_lost: Callable[[], None]) -> None: ...

    async def close(self) -> None: ...


class MetricsSink(Protocol):
    """Counts finished requests for /metrics. observe() is on the hot path: plain arithmetic, no I/O, no locks.

    Values that are not per request (ledger backlog, auth refresh failures) are read when render() runs."""

    def observe(self, event: UsageEvent) -> None: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def render(self) -> bytes:
        """The Prometheus text exposition of every worker's totals."""
        ...
