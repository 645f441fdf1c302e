"""The ledger's database through an SQLAlchemy engine (tests, tools, and URLs only SQLAlchemy connects to).

Every statement is in store/inserts.py and store/reads.py and runs on the engine's driver connections (asyncpg,
aiosqlite), so UsageRepo and the serving process's direct connections behave the same. The helpers at the end of
UsageRepo (count_events, event_ids, get_event) are for tests and tools.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import orjson
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..types import UsageEvent
from .db import create_engine, upgrade
from .journal_format import event_from_line
from .ledger_db import LedgerDB, is_driver_row_error
from .reads import GROUP_KEYS
from .tables import ledger_tables

T = TypeVar("T")


def is_row_error(exc: BaseException) -> bool:
    """True when a batch failed because of what some row holds: retrying the same rows cannot help.

    SQLAlchemy's wrappers are unwrapped; the driver's own errors are judged by is_driver_row_error().
    """
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return False
        if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
            return True
        inner: BaseException | None = exc.orig
        return inner is not None and inner is not exc and is_row_error(inner)
    if isinstance(exc, sa_exc.StatementError):  # a value the driver could not bind
        cause: BaseException | None = exc.orig
        return cause is None or not isinstance(cause, OSError | TimeoutError | ConnectionError)
    return is_driver_row_error(exc)


class UsageRepo(LedgerDB):
    """The ledger's database on an AsyncEngine. One instance per engine."""

    def __init__(self, engine: AsyncEngine, table_prefix: str = "") -> None:
        super().__init__(engine.url.render_as_string(hide_password=False), table_prefix)
        self.engine = engine
        self.dialect = engine.dialect.name
        self.usage_events = ledger_tables(table_prefix).usage_events

    @classmethod
    def from_url(cls, raw_url: str, table_prefix: str = "") -> UsageRepo:
        return cls(create_engine(raw_url), table_prefix)

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            try:
                return await fn(raw.driver_connection)
            except BaseException as exc:
                if self.dialect == "postgresql" and not is_row_error(exc):
                    # The connection may be broken; never hand it back to the pool.
                    await conn.invalidate()
                raise

    async def close(self) -> None:
        await self.engine.dispose()

    def is_row_error(self, exc: BaseException) -> bool:
        return is_row_error(exc)

    async def migrate(self) -> None:
        # On this engine: an in-memory SQLite database exists only there.
        await upgrade(self.engine, table_prefix=self.sql.prefix)

    async def insert_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert events (see insert_lines)."""
        return await self.insert_lines([orjson.dumps(e, default=str) for e in events])

    # -- for tests and tools ---------------------------------------------------------------------------

    async def count_events(self) -> int:
        usage_events = self.usage_events
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())

    async def event_ids(self) -> list[str]:
        usage_events = self.usage_events
        async with self.engine.connect() as conn:
            res = await conn.execute(select(usage_events.c.request_id))
            return [str(r) for r in res.scalars()]

    async def get_event(self, request_id: str) -> dict[str, Any] | None:
        usage_events = self.usage_events
        async with self.engine.connect() as conn:
            res = await conn.execute(select(usage_events).where(usage_events.c.request_id == request_id))
            row = res.mappings().first()
            return dict(row) if row is not None else None


async def table_names(conn: AsyncConnection) -> list[str]:
    """Tables present in the database (for checks and tests)."""

    def _names(sync_conn: Any) -> list[str]:
        from sqlalchemy import inspect

        return list(inspect(sync_conn).get_table_names())

    return await conn.run_sync(_names)


__all__ = ["GROUP_KEYS", "UsageRepo", "event_from_line", "is_row_error", "table_names"]
