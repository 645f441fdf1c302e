"""Usage rows carry the caller's groups and the client API (migration 0005): the migration on PostgreSQL and SQLite
with a table prefix, journal lines of earlier versions, and reports by group / client API on the direct drivers
(asyncpg, aiosqlite) and on the SQLAlchemy engine's (UsageRepo)."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
import pytest_asyncio
from sqlalchemy import text

from llm_proxy.core.usage import UsageLedger, _journal_line
from llm_proxy.store.connect import open_ledger_db
from llm_proxy.store.db import create_engine, upgrade_url
from llm_proxy.store.ledger_db import HEAD_REVISION, JOURNAL_FIELDS, LedgerDB, event_from_line
from llm_proxy.store.repos import UsageRepo
from llm_proxy.types import UsageEvent

from .dbutil import create_pg_database, drop_pg_database, eventually, pg_available, pg_url

T0 = 1_764_000_000.0  # 2025-11-24
PREFIX = "grp_"


def ev(rid: str, **kw: Any) -> UsageEvent:
    base: dict[str, Any] = {"request_id": rid, "started_at": T0, "ended_at": T0 + 1, "endpoint": "chat.completions",
                            "status": 200, "subject": "alice", "username": "alice", "model": "m",
                            "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    base.update(kw)
    return UsageEvent(**base)


# A journal line of the version before 0005 (23 positional fields: up to cost_usd), one of the version before
# usage_estimated (21), and one of the object form older still.
LINE_0004 = orjson.dumps(["old-23", T0, T0 + 1, "chat.completions", 200, "bob", "bob", "m", None, None, False,
                          None, 4, 5, 9, None, 1.0, None, None, 1, {}, False, 0.5])
LINE_0001 = orjson.dumps(["old-21", T0, T0 + 1, "chat.completions", 200, "bob", "bob", "m", None, None, False,
                          None, 4, 5, 9, None, 1.0, None, None, 1, {}])
LINE_OBJECT = orjson.dumps({f: getattr(ev("old-obj", subject="bob"), f) for f in JOURNAL_FIELDS[:21]})


@pytest_asyncio.fixture(params=["postgresql", "sqlite"])
async def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """An empty database (nothing migrated)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
        return
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    name = await create_pg_database("groups")
    yield pg_url(name)
    await drop_pg_database(name)


async def _columns(url: str, table: str) -> dict[str, str]:
    """Column name -> type as the database itself reports it."""
    if url.startswith("postgresql"):
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            rows = await conn.fetch("SELECT column_name, data_type FROM information_schema.columns "
                                    "WHERE table_name = $1", table)
        finally:
            await conn.close()
        return {r["column_name"]: r["data_type"] for r in rows}
    with sqlite3.connect(url.split(":///", 1)[1]) as conn:
        return {r[1]: r[2] for r in conn.execute(f"PRAGMA table_info({table})")}


async def _run_sql(db: LedgerDB, sql: str) -> None:
    async def run(conn: Any) -> None:
        await conn.execute(sql)
        if db.dialect == "sqlite":
            await conn.commit()

    await db._run(run)


async def test_migration_0005_with_a_prefix_keeps_old_rows_and_takes_old_lines(empty_url: str) -> None:
    url = empty_url
    pg = url.startswith("postgresql")
    assert await upgrade_url(url, "0004_cost", table_prefix=PREFIX) == "0004_cost"
    before = await _columns(url, PREFIX + "usage_events")
    assert "cost_usd" in before and "groups" not in before and "client_api" not in before
    db = open_ledger_db(url, table_prefix=PREFIX)
    try:
        # A row as 0004 stored it, and journal lines of earlier versions written while the database was at 0004
        # (replayed after the upgrade).
        ts = "now()" if pg else "'2025-11-24 00:00:00.000000'"
        await _run_sql(db, f"INSERT INTO {PREFIX}usage_events (request_id, started_at, ended_at, endpoint, status, "
                           f"subject, total_tokens) VALUES ('row-0004', {ts}, {ts}, 'chat.completions', 200, 'bob', 7)")
    finally:
        await db.close()
    assert await upgrade_url(url, table_prefix=PREFIX) == HEAD_REVISION == "0005_groups_client_api"
    after = await _columns(url, PREFIX + "usage_events")
    if pg:
        assert after["groups"] == "jsonb" and after["client_api"] == "character varying"
    else:
        assert after["groups"] == "JSON" and after["client_api"].startswith("VARCHAR")
    assert await _columns(url, "usage_events") == {}  # nothing unprefixed

    db = open_ledger_db(url, table_prefix=PREFIX)
    try:
        assert await db.revision() == HEAD_REVISION
        new = _journal_line(ev("new", groups=("team-a",), client_api="openai.chat"))
        assert await db.insert_lines([LINE_0004, LINE_0001, LINE_OBJECT, new]) == 4
        rows, totals = await db.usage_report(since=None, until=None, group_by=["group", "client_api"])
        assert totals["requests"] == 5
        got = {(r["group"], r["client_api"]): r["requests"] for r in rows}
        assert got == {(None, None): 4, ("team-a", "openai.chat"): 1}
    finally:
        await db.close()
    repo = UsageRepo(create_engine(url), table_prefix=PREFIX)
    try:
        for rid in ("row-0004", "old-23", "old-21", "old-obj"):
            row = await repo.get_event(rid)
            assert row is not None and row["groups"] is None and row["client_api"] is None, rid
        row = await repo.get_event("new")
        assert row is not None and row["groups"] == ["team-a"] and row["client_api"] == "openai.chat"
        assert (await repo.get_event("old-23") or {})["cost_usd"] == 0.5  # the fields before still land
    finally:
        await repo.close()


def test_old_journal_lines_read_as_events_without_groups() -> None:
    for line in (LINE_0004, LINE_0001, LINE_OBJECT):
        e = event_from_line(line)
        assert e.groups is None and e.client_api is None
    assert event_from_line(LINE_0004).cost_usd == 0.5
    e = ev("rt", groups=("a", "b"), client_api="openai.chat")
    assert event_from_line(_journal_line(e)) == e  # the groups come back as the tuple they were


async def test_a_dead_process_journal_of_old_lines_is_replayed(empty_url: str, tmp_path: Path) -> None:
    """A journal left behind by a process of the version before 0005 (its lines lack the new fields), replayed by
    a ledger of this version at start, into a database it migrates itself."""
    spool = tmp_path / "spool"
    dead = spool / "ledger-4242-dead"
    dead.mkdir(parents=True)
    new = _journal_line(ev("new-line", subject="carol", groups=("ops", "dev")))
    (dead / "seg-000000000000.jsonl").write_bytes(
        LINE_0004 + b"\n" + LINE_0001 + b"\n" + LINE_OBJECT + b"\n" + new + bytes(4096))
    ledger = UsageLedger(empty_url, spool, flush_interval=0.01)
    await ledger.start()
    try:
        async def adopted() -> bool:
            return not dead.exists()

        await eventually(adopted, 20)
        rows, totals = await ledger.db.usage_report(since=None, until=None, group_by=["group"])
        assert totals["requests"] == 4
        assert {r["group"]: r["requests"] for r in rows} == {None: 3, "dev": 1, "ops": 1}
        assert ledger.health()["rejected"] == 0
    finally:
        await ledger.close()


@pytest_asyncio.fixture(params=["direct", "sqlalchemy"])
async def reader(request: pytest.FixtureRequest, db_url: str) -> AsyncIterator[LedgerDB]:
    """The report's reader on each dialect: the serving path's direct driver, or UsageRepo on an engine."""
    db: LedgerDB = open_ledger_db(db_url) if request.param == "direct" else UsageRepo(create_engine(db_url))
    engine = create_engine(db_url)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_events"))
    await engine.dispose()
    await db.insert_lines([_journal_line(e) for e in ROWS] + [orjson.dumps(e, default=str) for e in OBJECT_ROWS])
    yield db
    await db.close()


ROWS = [
    ev("g1", groups=("team-a", "team-b"), total_tokens=10, client_api="openai.chat"),
    ev("g2", groups=("team-a",), total_tokens=20, status=500, client_api="openai.chat"),
    ev("g3", groups=None, total_tokens=40),
    ev("g4", subject="bob", username="bob", groups=("team-b",), total_tokens=80, started_at=T0 + 86400,
       ended_at=T0 + 86401, client_api="anthropic.messages"),
    ev("g5", subject="bob", username="bob", groups=(), total_tokens=160),  # empty: stored as none
]
# The object form (UsageRepo.insert_events, journals of earlier versions), and groups that are not a list: none.
OBJECT_ROWS = [ev("g6", subject="bob", username="bob", groups=("team-c",), total_tokens=320)]


async def test_report_by_group_counts_a_row_in_each_of_its_groups(reader: LedgerDB) -> None:
    rows, totals = await reader.usage_report(since=None, until=None, group_by=["group"])
    by_group = {r["group"]: (r["requests"], r["errors"], r["total_tokens"]) for r in rows}
    assert by_group == {"team-a": (2, 1, 30), "team-b": (2, 0, 90), "team-c": (1, 0, 320), None: (2, 0, 200)}
    # The totals count every row once: the per-group sums exceed them by the rows in several groups.
    assert totals["requests"] == 6 and totals["total_tokens"] == 630
    assert sum(r["total_tokens"] for r in rows) == 630 + 10


async def test_report_by_group_with_other_keys_and_one_subject(reader: LedgerDB) -> None:
    rows, totals = await reader.usage_report(since=None, until=None, group_by=["user", "group"], subject="bob")
    assert [(r["user"], r["username"], r["group"], r["requests"]) for r in rows if r["group"]] == [
        ("bob", "bob", "team-b", 1), ("bob", "bob", "team-c", 1)]
    assert [r["total_tokens"] for r in rows if r["group"] is None] == [160]
    assert totals["requests"] == 3  # bob's rows only: visibility is by subject, as before
    rows, _ = await reader.usage_report(since=None, until=None, group_by=["day", "group"], subject="alice")
    assert {(r["day"], r["group"]): r["requests"] for r in rows} == {
        ("2025-11-24", "team-a"): 2, ("2025-11-24", "team-b"): 1, ("2025-11-24", None): 1}


async def test_report_by_client_api(reader: LedgerDB) -> None:
    rows, _ = await reader.usage_report(since=None, until=None, group_by=["client_api"])
    assert {r["client_api"]: r["requests"] for r in rows} == {"openai.chat": 2, "anthropic.messages": 1, None: 3}


async def test_groups_that_are_not_a_list_are_stored_as_none(db_url: str) -> None:
    db = open_ledger_db(db_url)
    try:
        fields = [getattr(ev("odd"), f) for f in JOURNAL_FIELDS]
        odd = orjson.dumps([*fields[:23], "team-a", "x" * 100])  # a string for groups; an over-long client API
        assert await db.insert_lines([odd]) == 1
    finally:
        await db.close()
    repo = UsageRepo(create_engine(db_url))
    try:
        row = await repo.get_event("odd")
        assert row is not None and row["groups"] is None and row["client_api"] == "x" * 64
        rows, _ = await repo.usage_report(since=None, until=None, group_by=["group"], subject="alice")
        assert None in {r["group"] for r in rows}
    finally:
        await repo.close()
