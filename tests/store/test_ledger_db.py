"""The ledger's direct database access (asyncpg / aiosqlite, no SQLAlchemy): URL parity with SQLAlchemy,
inserts, reads, revision, broken connections, the SQLAlchemy fallback, and the serving path staying lean."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect

from llm_proxy.core.usage import UsageLedger
from llm_proxy.store.connect import open_ledger_db
from llm_proxy.store.db import _sqlite_path, create_engine, normalize_url
from llm_proxy.store.db_url import parse_db_url
from llm_proxy.store.ledger_db import HEAD_REVISION, MigrationFailed, PgLedgerDB, SqliteLedgerDB, migrate_in_child
from llm_proxy.store.repos import UsageRepo
from llm_proxy.types import UsageEvent

from .dbutil import PG_ADMIN_DSN, pg_available

URLS = [
    "postgresql+asyncpg://postgres@127.0.0.1:5432/llm_proxy_bench",
    "postgresql://u%40corp:p%3Aw%2Fd@db.example.com:6543/ledger?ssl=require",
    "postgres://ledger@[::1]/usage",
    "postgresql+psycopg2://u:pw@h/db?prepared_statement_cache_size=0&command_timeout=30",
    "postgresql://u@h:5432/db?server_settings_x=a&server_settings_x=b",
    "sqlite+aiosqlite:///./var/llm-proxy.db",
    "sqlite:////abs/path/ledger.db",
    "sqlite+aiosqlite://",
    "sqlite:///:memory:",
]


@pytest.mark.parametrize("raw", URLS)
def test_urls_read_as_sqlalchemy_reads_them(raw: str) -> None:
    url = parse_db_url(raw)
    sa = normalize_url(raw)
    assert url.backend == sa.get_backend_name()
    if url.backend == "sqlite":
        assert url.sqlite_path == _sqlite_path(sa)
        return
    _, want = asyncpg_dialect().create_connect_args(sa)
    for key in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback"):
        want.pop(key, None)  # consumed by SQLAlchemy's adapter, never passed to asyncpg.connect()
    assert url.asyncpg_kwargs() == want


@pytest.mark.parametrize("raw", ["mysql://u@h/db", "not a url", ""])
def test_bad_urls_fail_alike(raw: str) -> None:
    with pytest.raises(ValueError) as ours:
        parse_db_url(raw)
    with pytest.raises(ValueError) as theirs:
        normalize_url(raw)
    assert str(ours.value) == str(theirs.value)


def test_a_port_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(ValueError, match="is not a database URL"):
        parse_db_url("postgresql://h:notaport/db")


def test_direct_connections_unless_only_sqlalchemy_can_connect(tmp_path: Path) -> None:
    assert isinstance(open_ledger_db("postgresql://u@h/db"), PgLedgerDB)
    assert isinstance(open_ledger_db(f"sqlite:///{tmp_path / 'x.db'}"), SqliteLedgerDB)
    only_sqlalchemy = ("sqlite+aiosqlite://", f"sqlite:///{tmp_path / 'x.db'}?timeout=3",
                       "postgresql://u@/db?host=a:5432&host=b:5432")
    for raw in only_sqlalchemy:
        assert isinstance(open_ledger_db(raw), UsageRepo), raw


def ev(rid: str, **kw: Any) -> UsageEvent:
    now = time.time()
    base: dict[str, Any] = {"request_id": rid, "started_at": now - 1, "ended_at": now, "endpoint": "chat.completions",
                               "status": 200, "subject": "alice", "model": "m", "total_tokens": 3}
    base.update(kw)
    return UsageEvent(**base)


def line(e: UsageEvent) -> bytes:
    return orjson.dumps(e, default=str)


async def test_direct_writes_and_reads_match_the_engine(db_url: str) -> None:
    db = open_ledger_db(db_url)
    repo = UsageRepo(create_engine(db_url))
    try:
        assert not isinstance(db, UsageRepo)
        assert await db.revision() == HEAD_REVISION
        await db.migrate()  # at head: a no-op without SQLAlchemy
        await db.ping()
        resp = {"id": "chatcmpl-direct", "object": "chat.completion", "choices": []}
        comp = ev("req_direct_c", extra={"completion": {"input_messages": [{"role": "user"}], "response": resp}})
        lines = [line(ev("req_direct_1")), line(ev("req_direct_2", status=500)), line(comp)]
        assert await db.insert_lines(lines) == 3
        assert await db.insert_lines(lines) == 0  # idempotent on request_id
        with pytest.raises(Exception) as ei:
            await db.insert_lines([b'{"request_id": "req_cut'])
        assert db.is_row_error(ei.value)
        await db.ping()  # the connection survived the rejected batch
        row = await repo.get_event("req_direct_2")
        assert row is not None and row["status"] == 500 and row["subject"] == "alice"
        for reader in (db, repo):
            rows, totals = await reader.usage_report(since=None, until=None, group_by=["user", "status"])
            assert [(r["user"], r["status"], r["requests"]) for r in rows if r["user"] == "alice"] == [
                ("alice", 200, 2), ("alice", 500, 1)]
            assert totals["requests"] >= 3 and totals["errors"] >= 1
            got = await reader.get_completion("chatcmpl-direct", subject="alice")
            assert got is not None and got["response"] == resp and got["input_messages"] == [{"role": "user"}]
            assert got["created_at"].tzinfo is not None
            page, _ = await reader.list_completions(subject="alice", limit=10)
            assert "chatcmpl-direct" in [r["completion_id"] for r in page]
    finally:
        await db.close()
        await repo.close()


async def test_revision_of_an_empty_database_then_migrate(tmp_path: Path) -> None:
    db = open_ledger_db(f"sqlite+aiosqlite:///{tmp_path / 'sub' / 'new.db'}")
    try:
        assert await db.revision() is None
        await db.migrate()
        assert await db.revision() == HEAD_REVISION
        assert await db.insert_lines([line(ev("req_new"))]) == 1
    finally:
        await db.close()


async def test_a_connection_killed_by_the_server_is_replaced(tmp_path: Path) -> None:
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    from .dbutil import create_pg_database, drop_pg_database, pg_url

    name = await create_pg_database("killed")
    db = open_ledger_db(pg_url(name))
    try:
        await db.migrate()  # a fresh database: Alembic runs (in this test process)
        assert await db.insert_lines([line(ev("req_k1"))]) == 1
        admin = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            killed = await admin.fetchval("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                          "WHERE datname = $1 AND application_name = 'llm-proxy'", name)
        finally:
            await admin.close()
        assert killed >= 1
        # The idle connection is dead: the batch goes out on a new one without an error.
        assert await db.insert_lines([line(ev("req_k2")), line(ev("req_k3"))]) == 2
        _, totals = await db.usage_report(since=None, until=None, group_by=[])
        assert totals["requests"] == 3
    finally:
        await db.close()
        await drop_pg_database(name)


async def test_latency_percentiles_nearest_rank(db_url: str) -> None:
    """p50 / p95 / p99 of latency_ms over a subject's rows in a time range (the dashboard's), both drivers."""
    db = open_ledger_db(db_url)
    repo = UsageRepo(create_engine(db_url))
    try:
        lat = [float(x) for x in range(101, 121)]  # 20 rows: 101..120 ms, and one without a latency
        lines = [line(ev(f"req_pct_{i}", subject="percentile-user", latency_ms=v)) for i, v in enumerate(lat)]
        lines.append(line(ev("req_pct_none", subject="percentile-user", latency_ms=None)))
        assert await db.insert_lines(lines) == 21
        for reader in (db, repo):
            got = await reader.latency_percentiles(since=None, until=None, subject="percentile-user")
            assert got == {"p50": 110.0, "p95": 119.0, "p99": 120.0}  # ranks ceil(q * 20): 10, 19, 20
            none = await reader.latency_percentiles(since=None, until=None, subject="nobody")
            assert none == {"p50": None, "p95": None, "p99": None}
    finally:
        await db.close()
        await repo.close()


async def test_in_memory_sqlite_ledger_goes_through_sqlalchemy(tmp_path: Path) -> None:
    """One StaticPool connection shared by the migration, the writer and reads (the database lives in it)."""
    ledger = UsageLedger("sqlite+aiosqlite://", tmp_path / "spool", flush_interval=0.01)
    await ledger.start()
    try:
        assert isinstance(ledger.db, UsageRepo)
        ledger.record(ev("req_mem"))
        assert await ledger.flush(10)
        _, totals = await ledger.db.usage_report(since=None, until=None, group_by=[])
        assert totals["requests"] == 1 and ledger.health()["written"] == 1
    finally:
        await ledger.close()


# A serving worker: build the app for a config with the ledger on, start the ledger, record and read rows.
_SERVING = textwrap.dedent(
    """
    import asyncio, json, os, sys, time

    from llm_proxy import cli  # noqa: F401  (what `llm-proxy serve` imports)
    from llm_proxy.app import create_app
    from llm_proxy.config import load_config_text
    from llm_proxy.types import UsageEvent
    from llm_proxy.web import server  # noqa: F401
    from llm_proxy.web.state import SERVICES

    CONFIG = '''
    providers: [{id: up, type: openai_compat, base_url: "http://127.0.0.1:9/v1"}]
    models: [{id: up/m, provider: up, upstream_model: m}]
    auth: {mode: none, allow_unauthenticated: true}
    database: {url: "%s"}
    usage: {spool_dir: "%s", flush_interval_seconds: 0.01, store_completions: true}
    ''' % (os.environ["LEDGER_URL"], os.environ["LEDGER_SPOOL"])

    async def main() -> None:
        app = create_app(load_config_text(CONFIG, env={}, path="<test>"))
        ledger = app[SERVICES].usage
        await ledger.start()
        now = time.time()
        ledger.record(UsageEvent(request_id="req_lean_%d" % os.getpid(), started_at=now, ended_at=now,
                                 endpoint="chat.completions", status=200, subject="lean"))
        assert await ledger.flush(10), ledger.health()
        _, totals = await ledger.db.usage_report(since=None, until=None, group_by=["user"], subject="lean")
        assert totals["requests"] == 1, totals
        await ledger.db.list_completions(subject="lean", limit=5)
        await ledger.db.get_completion("nope", subject="lean")
        assert ledger.health()["database"] is True
        await ledger.close()

    asyncio.run(main())
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic"))))
    """
)


def test_serving_path_never_imports_sqlalchemy(db_url: str, tmp_path: Path) -> None:
    """The guard for the per-worker memory budget (bench/RESULTS.md "Memory per worker"): SQLAlchemy and
    Alembic cost ~20 MB resident; a worker whose database is at head must not load them, not even to serve
    /v1/usage or stored completions."""
    env = {**os.environ, "LEDGER_URL": db_url, "LEDGER_SPOOL": str(tmp_path / "spool")}
    out = subprocess.run([sys.executable, "-c", _SERVING], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_worker_that_migrates_does_so_in_a_child_process(tmp_path: Path) -> None:
    """A fresh database: the worker's own migration must not leave SQLAlchemy/Alembic in the worker either."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    env = {**os.environ, "LEDGER_URL": url, "LEDGER_SPOOL": str(tmp_path / "spool")}
    out = subprocess.run([sys.executable, "-c", _SERVING], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
    assert asyncio.run(open_ledger_db(url).revision()) == HEAD_REVISION


async def test_a_failed_child_migration_is_one_line_without_the_password() -> None:
    with pytest.raises(MigrationFailed) as info:
        await migrate_in_child("postgresql+asyncpg://bob:s3cret@127.0.0.1:1/nowhere")
    msg = str(info.value)
    assert "s3cret" not in msg and "Traceback" not in msg and "\n" not in msg and msg


_NEVER_CLOSED = """
import asyncio, os, sys
from llm_proxy.core.usage import UsageLedger
from llm_proxy.types import UsageEvent

async def main():
    ledger = UsageLedger(os.environ["LEDGER_URL"], os.environ["LEDGER_SPOOL"])
    await ledger.start()
    ledger.record(UsageEvent("req_unclosed", 1.0, 2.0, "chat.completions", 200))
    assert await ledger.flush(20)
    print("recorded", flush=True)  # and the process ends without closing the ledger

asyncio.run(main())
"""


def test_a_process_that_never_closes_its_sqlite_ledger_still_exits(tmp_path: Path) -> None:
    """aiosqlite's connection thread would keep the interpreter alive (a crashed worker, a test failing before
    close() hung until killed); the ledger's is a daemon thread, and the journal keeps what is not committed."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'unclosed.db'}"
    env = {**os.environ, "LEDGER_URL": url, "LEDGER_SPOOL": str(tmp_path / "spool")}
    out = subprocess.run([sys.executable, "-c", _NEVER_CLOSED], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "recorded", out.stderr
