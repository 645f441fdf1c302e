"""Service API keys in the ledger database, with plain SQL on asyncpg / aiosqlite (no SQLAlchemy).

A key is `llmp_<id>_<secret>`: the id is public (listing, revoking, usage rows as `apikey:<id>`), the secret is
32 random bytes. Only the key's sha256 is stored. The serving process loads every key into memory and reloads
them every `auth.api_keys.refresh_seconds` and, on PostgreSQL, at once on NOTIFY (`keys create` / `keys
revoke` send it), so no request reads the database.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from ..types import API_KEY_PREFIX as KEY_PREFIX
from ..types import ApiKeyRecord
from .connect import open_ledger_db
from .db_url import parse_db_url
from .inserts import check_table_prefix
from .ledger_db import LedgerDB

# aiosqlite logs every statement with its bound parameters at DEBUG: the key hashes must not go there.
logging.getLogger("aiosqlite").setLevel(logging.INFO)

NOTIFY_CHANNEL = "llm_proxy_api_keys"
_API_KEYS_TABLE = "api_keys"


def api_keys_table(prefix: str = "") -> str:
    """The table's name after database.table_prefix (checked as every ledger table's prefix is)."""
    return check_table_prefix(prefix) + _API_KEYS_TABLE


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def new_key() -> tuple[str, str]:
    """(key id, key): the key is shown once and never stored."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


_COLUMNS = "id, name, key_hash, models, created_at, expires_at, revoked_at"


def _pg(sql: str) -> str:
    """`?` placeholders as asyncpg's `$n`."""
    parts = sql.split("?")
    return "".join(p + (f"${i + 1}" if i < len(parts) - 1 else "") for i, p in enumerate(parts))


async def _fetch(conn: Any, pg: bool, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    if pg:
        return [tuple(r) for r in await conn.fetch(_pg(sql), *args)]
    async with conn.execute(sql, tuple(args)) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def _write(conn: Any, pg: bool, sql: str, args: Sequence[Any]) -> int:
    """Run one write and tell every replica (PostgreSQL NOTIFY); rows changed."""
    if pg:
        async with conn.transaction():
            status = str(await conn.execute(_pg(sql), *args))
            await conn.execute("SELECT pg_notify($1, '')", NOTIFY_CHANNEL)
        try:
            return int(status.rsplit(" ", 1)[-1])
        except ValueError:
            return 0
    cur = await conn.execute(sql, tuple(args))
    changed = int(cur.rowcount)
    await cur.close()
    await conn.commit()
    return changed


def _record(row: tuple[Any, ...]) -> ApiKeyRecord:
    key_id, name, key_hash, models, created, expires, revoked = row
    parsed = orjson.loads(models) if models else []
    return ApiKeyRecord(
        str(key_id), str(name), str(key_hash), tuple(str(m) for m in parsed if isinstance(m, str)),
        float(created), float(expires) if expires is not None else None,
        float(revoked) if revoked is not None else None,
    )


class ApiKeyStore:
    """The api_keys table of the ledger database at `raw_url`."""

    def __init__(self, raw_url: str, *, table_prefix: str = "", clock: Callable[[], float] = time.time) -> None:
        self.raw_url = raw_url
        self._db: LedgerDB = open_ledger_db(raw_url, connections=0, table_prefix=table_prefix)
        self._table = api_keys_table(table_prefix)
        self._clock = clock
        self._listener: Any = None

    @property
    def pg(self) -> bool:
        return self._db.dialect == "postgresql"

    async def migrate(self) -> None:
        await self._db.migrate()

    async def load(self) -> list[ApiKeyRecord]:
        """Every key that is neither revoked nor expired."""
        now = self._clock()
        sql = (f"SELECT {_COLUMNS} FROM {self._table} "  # noqa: S608 - constants
               "WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > ?)")
        rows = await self._db._run(lambda conn: _fetch(conn, self.pg, sql, (now,)))
        return [_record(r) for r in rows]

    async def list(self) -> list[ApiKeyRecord]:
        sql = f"SELECT {_COLUMNS} FROM {self._table} ORDER BY created_at, id"  # noqa: S608 - constants
        return [_record(r) for r in await self._db._run(lambda conn: _fetch(conn, self.pg, sql))]

    async def create(self, name: str, models: Sequence[str], expires_at: float | None) -> tuple[str, ApiKeyRecord]:
        key_id, key = new_key()
        record = ApiKeyRecord(key_id, name, hash_key(key), tuple(models), self._clock(), expires_at)
        sql = f"INSERT INTO {self._table} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, NULL)"  # noqa: S608
        args = (record.id, record.name, record.key_hash, orjson.dumps(list(record.models)).decode(),
                record.created_at, record.expires_at)
        await self._db._run(lambda conn: _write(conn, self.pg, sql, args))
        return key, record

    async def revoke(self, key_id: str) -> int:
        """Revoke the key with this id; the number of keys revoked (0: unknown or already revoked)."""
        sql = f"UPDATE {self._table} SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL"  # noqa: S608
        args = (self._clock(), key_id)
        return await self._db._run(lambda conn: _write(conn, self.pg, sql, args))

    async def listen(self, on_change: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """PostgreSQL: call `on_change` on every NOTIFY from `keys create` / `keys revoke` (one dedicated
        connection; `on_lost` when it goes)."""
        if not self.pg or self._listener is not None:
            return
        import asyncpg

        url = parse_db_url(self.raw_url)
        conn = await asyncpg.connect(**url.asyncpg_kwargs(), timeout=5,
                                     server_settings={"application_name": "llm-proxy-keys"})
        await conn.add_listener(NOTIFY_CHANNEL, lambda *_a: on_change())

        def lost(_conn: Any) -> None:
            self._listener = None
            on_lost()

        conn.add_termination_listener(lost)
        self._listener = conn

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                await listener.close(timeout=2)
            except Exception:
                listener.terminate()
        await self._db.close()
