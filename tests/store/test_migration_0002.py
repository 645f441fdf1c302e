"""0002_usage_estimated on a database that has rows from 0001, and journal lines written before the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from llm_proxy.store.connect import open_ledger_db
from llm_proxy.store.db import upgrade_url
from llm_proxy.store.journal_format import JOURNAL_FIELDS
from llm_proxy.store.ledger_db import HEAD_REVISION

from .dbutil import create_pg_database, drop_pg_database, pg_available, pg_url

# A journal line of the version before usage_estimated: 21 positional fields.
OLD_LINE = orjson.dumps(["old-2", 1.7e9, 1.7e9 + 1, "chat.completions", 200, "u", None, "m", None, None, True,
                         None, 4, 5, 9, None, 1.0, None, None, 1, {}])


async def _check(url: str) -> None:
    assert await upgrade_url(url, "0001_usage_ledger") == "0001_usage_ledger"
    db = open_ledger_db(url)
    try:
        # A row as 0001 stores it (no usage_estimated column yet).
        cols = ", ".join(JOURNAL_FIELDS[:20])
        pg = url.startswith("postgresql")
        sql = (f"INSERT INTO usage_events ({cols}) VALUES ('old-1', now(), now(), 'chat.completions', 200, 'u', "
               "NULL, 'm', NULL, NULL, false, NULL, 1, 2, 3, NULL, 1.0, NULL, NULL, 1)") if pg else (
               f"INSERT INTO usage_events ({cols}) VALUES ('old-1', '2026-01-01 00:00:00.000000', "
               "'2026-01-01 00:00:00.000000', 'chat.completions', 200, 'u', NULL, 'm', NULL, NULL, 0, NULL, 1, 2, 3, "
               "NULL, 1.0, NULL, NULL, 1)")

        async def insert(conn: Any) -> None:
            await conn.execute(sql)
            if not pg:
                await conn.commit()  # aiosqlite: no autocommit

        await db._run(insert)
    finally:
        await db.close()
    assert await upgrade_url(url) == HEAD_REVISION
    db = open_ledger_db(url)
    try:
        assert await db.insert_lines([OLD_LINE]) == 1
        _, totals = await db.usage_report(since=None, until=None, group_by=[])
        assert totals["requests"] == 2 and totals["estimated_requests"] == 0 and totals["total_tokens"] == 12
        # 0004_cost: rows and lines from before it have no cost (NULL, unknown), never $0.
        assert totals["cost_usd"] is None and totals["requests_without_cost"] == 2
    finally:
        await db.close()


async def test_postgres_0001_rows_and_old_lines_are_not_estimated() -> None:
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    name = await create_pg_database("m0002")
    try:
        await _check(pg_url(name))
    finally:
        await drop_pg_database(name)


async def test_sqlite_0001_rows_and_old_lines_are_not_estimated(tmp_path: Path) -> None:
    await _check(f"sqlite+aiosqlite:///{tmp_path / 'l.db'}")
