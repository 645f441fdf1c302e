"""Issue 12: database.table_prefix (llama-stack's storage.backends.*.table_prefix) names every table the proxy
creates, Alembic's version table included, so that proxies share one database (Konveyor's `kai` database with
`llm_proxy_`) without clashing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import openai
import orjson
import pytest
import pytest_asyncio

from llm_proxy.cli import main
from llm_proxy.config import load_config_text
from llm_proxy.core.usage import UsageLedger
from llm_proxy.errors import ConfigError
from llm_proxy.store.connect import open_ledger_db
from llm_proxy.store.db import upgrade_url
from llm_proxy.store.ledger_db import HEAD_REVISION

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .dbutil import HeaderAuth, config_text, create_pg_database, drop_pg_database, pg_available, pg_url

MSG: list[Any] = [{"role": "user", "content": "count my tokens please"}]
SEED = Path(__file__).resolve().parents[1] / "fixtures" / "seed" / "run.yaml"


@pytest_asyncio.fixture
async def shared_db() -> AsyncIterator[str]:
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    name = await create_pg_database("prefix")
    yield name
    await drop_pg_database(name)


async def _tables(name: str) -> set[str]:
    conn = await asyncpg.connect(pg_url(name).replace("postgresql+asyncpg", "postgresql"))
    try:
        rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return {r["tablename"] for r in rows}
    finally:
        await conn.close()


def _prefixed_config(base_url: str, db_url: str, spool: Path, prefix: str) -> str:
    text = config_text(base_url, db_url, spool)
    return text.replace(f'database: {{url: "{db_url}"}}',
                        f'database: {{url: "{db_url}", table_prefix: "{prefix}"}}')


async def test_two_prefixed_proxies_share_one_postgres_database(shared_db: str, emulator: Emulator,
                                                                tmp_path: Path) -> None:
    db_url = pg_url(shared_db)
    docs: dict[str, Any] = {}
    for prefix, n in (("llm_proxy_", 2), ("team_b_", 1)):
        loaded = native_config(_prefixed_config(emulator.base_url, db_url, tmp_path / prefix, prefix))
        assert loaded.settings.database.table_prefix == prefix
        # The proxy migrates at start (in its child process), writes rows, and reads them back on /v1/usage.
        px = ProxyServer(loaded, authenticator=HeaderAuth(), usage=UsageLedger.from_config(loaded))
        with px:
            c = openai.AsyncOpenAI(base_url=px.base_url, api_key="k", max_retries=0, timeout=20,
                                   default_headers={"x-test-user": "dave"})
            for _ in range(n):
                await c.chat.completions.create(model="openai/gpt-4o", messages=MSG)
            emulator.script({"responses": [{"content": "no usage from me", "no_usage": True}]})
            await c.chat.completions.create(model="openai/gpt-4o", messages=MSG)  # estimated
            await c.close()
            async with aiohttp.ClientSession(px.url) as http, http.get(
                    "/v1/usage?group_by=user", headers={"x-test-user": "dave"}) as r:
                assert r.status == 200
                docs[prefix] = orjson.loads(await r.read())

    tables = await _tables(shared_db)
    for prefix in ("llm_proxy_", "team_b_"):
        assert {f"{prefix}usage_events", f"{prefix}stored_completions", f"{prefix}alembic_version",
                f"{prefix}api_keys"} <= tables
    # nothing unprefixed
    assert not {"usage_events", "stored_completions", "alembic_version", "api_keys"} & tables
    # Each proxy sees only its own rows, and says which counts are estimates.
    assert docs["llm_proxy_"]["totals"]["requests"] == 3 and docs["team_b_"]["totals"]["requests"] == 2
    assert docs["llm_proxy_"]["totals"]["estimated_requests"] == 1
    assert docs["team_b_"]["totals"]["estimated_requests"] == 1
    assert docs["team_b_"]["totals"]["requests_without_tokens"] == 0

    for prefix in ("llm_proxy_", "team_b_"):
        db = open_ledger_db(db_url, table_prefix=prefix)
        try:
            assert await db.revision() == HEAD_REVISION
        finally:
            await db.close()
    assert await upgrade_url(db_url, table_prefix="llm_proxy_") == HEAD_REVISION  # again: nothing to do


async def test_cli_upgrade_and_usage_use_the_prefix(shared_db: str, emulator: Emulator, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    db_url = pg_url(shared_db)
    cfg = tmp_path / "ops.yaml"
    cfg.write_text(_prefixed_config(emulator.base_url, db_url, tmp_path / "spool", "ops_"))
    assert await asyncio.to_thread(main, ["db", "upgrade", "--config", str(cfg)]) == 0
    assert {"ops_usage_events", "ops_alembic_version"} <= await _tables(shared_db)
    assert "usage_events" not in await _tables(shared_db)
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--json"]) == 0
    assert orjson.loads(capsys.readouterr().out)["totals"]["requests"] == 0


async def test_sqlite_prefix(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
    db = open_ledger_db(url, table_prefix="p_")
    try:
        await db.migrate()
        assert await db.revision() == HEAD_REVISION
        line = orjson.dumps(["r1", 1.7e9, 1.7e9 + 1, "chat.completions", 200, "u", None, "m", None, None, False,
                             None, 1, 2, 3, None, 1.0, None, None, 1, {}, True])
        assert await db.insert_lines([line]) == 1
        _, totals = await db.usage_report(since=None, until=None, group_by=[])
        assert totals["requests"] == 1 and totals["estimated_requests"] == 1
    finally:
        await db.close()
    import sqlite3

    with sqlite3.connect(tmp_path / "ledger.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"p_usage_events", "p_stored_completions", "p_alembic_version"} <= names
    assert "usage_events" not in names and "alembic_version" not in names


def test_llama_stack_table_prefix_is_honoured() -> None:
    loaded = load_config_text(SEED.read_text(), env={"OPENAI_API_KEY": "sk-x", "POSTGRESQL_PASSWORD": "pw"})
    assert loaded.settings.database.url.startswith("postgresql+asyncpg://kai:pw@kai-db.konveyor-tackle.svc")
    assert loaded.settings.database.table_prefix == "llm_proxy_"


@pytest.mark.parametrize("bad", ["Bad-Prefix", "1x_", "x" * 30, "a;drop table"])
def test_unsafe_prefix_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError, match="table_prefix"):
        native_config(f"""
auth: {{mode: none, allow_unauthenticated: true}}
database: {{url: "sqlite+aiosqlite:///x.db", table_prefix: "{bad}"}}
""")
