"""The ledger's database without SQLAlchemy: asyncpg / aiosqlite connections, batch inserts, ping, migration."""

# A serving process talks to its database through asyncpg or aiosqlite directly, with the statements of
# store/inserts.py and store/reads.py; SQLAlchemy (and Alembic: ~20 MB resident per worker together) is loaded
# only when a migration is due (`LedgerDB.migrate`) or for URLs only SQLAlchemy connects to (in-memory SQLite,
# SQLite URI options, multi-host PostgreSQL). `store/repos.py:UsageRepo` runs the same statements on an
# SQLAlchemy engine's driver connections (tests, tools, and that fallback).

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from .db_url import DbUrl
from .inserts import pg_insert_lines, sqlite_insert_lines, statements
from .reads import LedgerReads, _Sql

T = TypeVar("T")

# The newest migration shipped; when the database is already there, neither Alembic nor SQLAlchemy is loaded.
HEAD_REVISION = "0005_groups_client_api"


# --------------------------------------------------------------------------------------------------
# Error classification
# --------------------------------------------------------------------------------------------------


def is_driver_row_error(exc: BaseException) -> bool:
    """True when an asyncpg / sqlite3 batch failed because of what some row holds: retrying cannot help.

    Everything else (connection refused or lost, timeouts, missing tables, locks) is transient: the
    ledger keeps the rows and retries. (store/repos.py:is_row_error also unwraps SQLAlchemy's errors.)
    """
    # An asyncpg or sqlite3 exception exists only once its module is imported: no import needed here.
    apg = sys.modules.get("asyncpg")
    if apg is not None and isinstance(exc, apg.DataError | apg.IntegrityConstraintViolationError):
        return True
    sq = sys.modules.get("sqlite3")
    if sq is not None:
        if isinstance(exc, sq.IntegrityError | sq.DataError | sq.InterfaceError):
            return True
        if isinstance(exc, sq.ProgrammingError) and "binding" in str(exc):  # a value of a type it cannot store
            return True
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return False
    return isinstance(exc, TypeError | ValueError | OverflowError)


# --------------------------------------------------------------------------------------------------
# The ledger's database
# --------------------------------------------------------------------------------------------------


def _undefined_table(exc: BaseException) -> bool:
    apg = sys.modules.get("asyncpg")
    if apg is not None and isinstance(exc, apg.UndefinedTableError):
        return True
    sq = sys.modules.get("sqlite3")
    return sq is not None and isinstance(exc, sq.OperationalError) and "no such table" in str(exc)


async def _revision(conn: Any, dialect: str, version_table: str = "alembic_version") -> str | None:
    try:
        rows = await _Sql(dialect).fetch(conn, f"SELECT version_num FROM {version_table}")  # noqa: S608 (checked)
    except Exception as exc:
        if _undefined_table(exc):
            return None
        raise
    return str(rows[0]["version_num"]) if rows else None


async def _select_1(conn: Any, dialect: str) -> None:
    await _Sql(dialect).fetch(conn, "SELECT 1")


class MigrationFailed(RuntimeError):
    pass


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


async def migrate_in_child(raw_url: str, table_prefix: str = "") -> None:
    """`python -m llm_proxy.store.db` with the URL (and the table prefix) on stdin (never on a command line `ps`
    shows)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy.store.db",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await proc.communicate(f"{raw_url}\n{table_prefix}\n".encode())
    except BaseException:  # cancelled (start-up timeout, shutdown): the child goes too
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MigrationFailed(_URL_PASSWORD.sub(r"\1***@", why)[:500])


class LedgerDB(LedgerReads):
    """The ledger's database: batch inserts, ping, schema revision, and the reads of LedgerReads.

    Subclasses provide a driver connection (asyncpg or aiosqlite) to run one operation on (`_run`).
    """

    dialect = ""

    def __init__(self, raw_url: str, table_prefix: str = "") -> None:
        self.raw_url = raw_url
        self.sql = statements(table_prefix)

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def is_row_error(self, exc: BaseException) -> bool:
        """True when `exc` from insert_lines() is about what some row holds: retrying the rows cannot help."""
        return is_driver_row_error(exc)

    async def insert_lines(self, lines: Sequence[bytes]) -> int:
        """Insert a batch of journal lines (one JSON UsageEvent each) in one transaction, skipping request ids
        already stored. Returns the number of rows added. A line that is not a valid event raises an error
        for which is_row_error() is true."""
        if not lines:
            return 0
        insert = pg_insert_lines if self.dialect == "postgresql" else sqlite_insert_lines
        return await self._run(lambda conn: insert(conn, lines, self.sql))

    async def ping(self) -> None:
        await self._run(lambda conn: _select_1(conn, self.dialect))

    async def revision(self) -> str | None:
        """The database's Alembic revision (None when unmigrated); raises when the database is unreachable."""
        return await self._run(lambda conn: _revision(conn, self.dialect, self.sql.version_table))

    async def migrate(self) -> None:
        """Bring the schema to HEAD_REVISION. The work (SQLAlchemy + Alembic, ~27 MB that a process never gives
        back) runs in a short-lived child process, so a worker that migrates stays as small as one that did not."""
        if await self.revision() == HEAD_REVISION:
            return
        await migrate_in_child(self.raw_url, self.sql.prefix)


class PgLedgerDB(LedgerDB):
    """PostgreSQL through asyncpg; keeps up to `connections` + 1 idle connections (batches in flight, a read)."""

    dialect = "postgresql"

    def __init__(self, raw_url: str, url: DbUrl, connections: int, table_prefix: str = "") -> None:
        super().__init__(raw_url, table_prefix)
        # URL query parameters first: the fixed arguments win, as SQLAlchemy's connect_args did.
        self._connect_kwargs = {
            **url.asyncpg_kwargs(),
            "timeout": 5,  # connect
            "command_timeout": 60,
            "server_settings": {"application_name": "llm-proxy"},
        }
        self._keep = connections + 1
        self._idle: list[Any] = []

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        while self._idle:
            conn = self._idle.pop()
            if conn.is_closed():
                continue
            try:
                return await self._use(conn, fn)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                # An idle connection the server (or something in between) closed: on to a new one, as
                # SQLAlchemy's pre-ping did, without its round trip per checkout.
        import asyncpg

        return await self._use(await asyncpg.connect(**self._connect_kwargs), fn)

    async def _use(self, conn: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
        try:
            result = await fn(conn)
        except BaseException as exc:
            if self.is_row_error(exc) and not conn.is_closed():
                self._idle.append(conn)  # the statement failed, the connection is fine
            else:
                conn.terminate()  # it may be broken: never reuse it
            raise
        if not conn.is_closed():
            if len(self._idle) < self._keep:
                self._idle.append(conn)
            else:
                await _close_pg(conn)
        return result

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_pg(conn)


def _connection_lost(exc: BaseException) -> bool:
    """An error of a connection that was closed while idle (InternalClientError: asyncpg read the server's
    FATAL message before the next query and its protocol state no longer allows one)."""
    apg = sys.modules["asyncpg"]
    return isinstance(exc, ConnectionError | apg.InterfaceError | apg.InternalClientError
                      | apg.PostgresConnectionError | apg.AdminShutdownError)


async def _close_pg(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except Exception:
        conn.terminate()


class SqliteLedgerDB(LedgerDB):
    """A SQLite file through one aiosqlite connection (SQLite serialises writers anyway)."""

    dialect = "sqlite"

    def __init__(self, raw_url: str, path: Path, table_prefix: str = "") -> None:
        super().__init__(raw_url, table_prefix)
        self.path = path
        self._db: Any = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> Any:
        if self._db is None:
            import aiosqlite

            self.path.parent.mkdir(parents=True, exist_ok=True)
            pending = aiosqlite.connect(self.path)
            # aiosqlite runs the connection in a non-daemon thread: a process that ends without closing the
            # ledger (a crash, a test failing before close) would hang at exit. The journal keeps every row until
            # it is committed, so nothing depends on that thread finishing.
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                thread.daemon = True
            db = await pending
            try:
                # As store/db.py:create_engine sets them on SQLAlchemy's connections.
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA busy_timeout=10000")
            except BaseException:
                await db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._lock:
            return await fn(await self._connection())

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
