"""Async SQLAlchemy engine from a URL (sqlite+aiosqlite, postgresql+asyncpg) and programmatic migrations.

Not imported by a serving process whose database is at HEAD_REVISION (see store/ledger_db.py)."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.engine.url import URL
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from .db_url import ASYNC_DRIVERS, backend_of
from .inserts import statements
from .ledger_db import HEAD_REVISION

log = logging.getLogger("llm_proxy.store")
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)  # one INFO line per plugin per run

STORE_DIR = Path(__file__).resolve().parent
MIGRATIONS_DIR = STORE_DIR / "migrations"
ALEMBIC_INI = STORE_DIR / "alembic.ini"
# Any constant works; it only has to be the same for every process migrating one PostgreSQL database.
_PG_MIGRATION_LOCK = 0x6C6C6D70  # "llmp"


def normalize_url(raw: str) -> URL:
    """Pick the async driver for plain `sqlite://` / `postgres://` / `postgresql://` URLs."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ValueError(f"database.url '{raw}' is not a database URL") from None
    return url.set(drivername=ASYNC_DRIVERS[backend_of(url.drivername)])


def is_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite"


def _sqlite_path(url: URL) -> Path | None:
    db = url.database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def create_engine(raw_url: str, *, pool_size: int = 5) -> AsyncEngine:
    """An AsyncEngine for the ledger; creates the parent directory of a SQLite file."""
    url = normalize_url(raw_url)
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if is_sqlite(url):
        path = _sqlite_path(url)
        if path is None:
            kwargs["poolclass"] = StaticPool
            kwargs["connect_args"] = {"check_same_thread": False}
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, **kwargs)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            if path is not None:
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.close()

        return engine
    kwargs["connect_args"] = {
        "timeout": 5,  # connect
        "command_timeout": 60,
        "server_settings": {"application_name": "llm-proxy"},
    }
    return create_async_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **kwargs)


def alembic_config(connection: Connection | None = None, table_prefix: str = "") -> Any:
    """An Alembic Config pointing at the packaged migrations (optionally bound to a connection), for the tables
    named with `table_prefix` (migrations/env.py reads it)."""
    from alembic.config import Config

    cfg = Config(str(ALEMBIC_INI)) if ALEMBIC_INI.is_file() else Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    cfg.attributes["table_prefix"] = statements(table_prefix).prefix
    return cfg


def migration_table(name: str) -> str:
    """`name` after the table prefix of the migration being run (alembic_config puts it in the attributes)."""
    from alembic import context

    return str(context.config.attributes.get("table_prefix") or "") + name


def _upgrade_sync(connection: Connection, revision: str, table_prefix: str = "") -> str | None:
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    if connection.dialect.name == "postgresql":
        # Serialises concurrent upgrades (several workers starting at once); released at commit.
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
    command.upgrade(alembic_config(connection, table_prefix), revision)
    version_table = statements(table_prefix).version_table
    return MigrationContext.configure(connection, opts={"version_table": version_table}).get_current_revision()


async def current_revision(engine: AsyncEngine, table_prefix: str = "") -> str | None:
    """The database's Alembic revision, read with plain SQL (None when unmigrated)."""
    version_table = statements(table_prefix).version_table  # a checked name
    try:
        async with engine.connect() as conn:
            row = (await conn.execute(text(f"SELECT version_num FROM {version_table}"))).first()  # noqa: S608
    except Exception:  # no table yet, or no database: the full Alembic path decides (and reports)
        return None
    return str(row[0]) if row is not None else None


async def upgrade(engine: AsyncEngine, revision: str = "head", *, table_prefix: str = "") -> str | None:
    """Run Alembic migrations up to `revision` (idempotent) for the tables named with `table_prefix`; returns the
    revision now current."""
    if revision == "head" and await current_revision(engine, table_prefix) == HEAD_REVISION:
        return HEAD_REVISION
    url = engine.url
    path = _sqlite_path(url) if is_sqlite(url) else None
    fd = -1
    if path is not None:
        # SQLite has no advisory locks: serialise processes with a lock file next to the database.
        fd = os.open(path.with_name(path.name + ".migrate.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fd >= 0:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        async with engine.begin() as conn:
            return await conn.run_sync(_upgrade_sync, revision, table_prefix)
    finally:
        if fd >= 0:
            os.close(fd)


async def upgrade_url(raw_url: str, revision: str = "head", *, table_prefix: str = "") -> str | None:
    """`llm-proxy db upgrade`: migrate the database at `raw_url`."""
    engine = create_engine(raw_url)
    try:
        return await upgrade(engine, revision, table_prefix=table_prefix)
    finally:
        await engine.dispose()


def _main() -> int:
    """Child-process entry of LedgerDB.migrate(): the database URL and the table prefix on stdin (one line each);
    exit 1 with one line on failure."""
    raw_url, _, rest = sys.stdin.read().strip().partition("\n")
    try:
        asyncio.run(upgrade_url(raw_url.strip(), table_prefix=rest.strip()))
    except Exception as exc:  # one line for the parent's log; never a traceback
        print(f"{type(exc).__name__}: {exc}".replace("\n", " "), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
