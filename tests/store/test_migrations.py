"""Migrations: from an empty database to head, idempotent, safe to run concurrently; `llm-proxy db upgrade`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from sqlalchemy import text

from llm_proxy.cli import main
from llm_proxy.store.db import create_engine, upgrade, upgrade_url
from llm_proxy.store.ledger_db import HEAD_REVISION as HEAD
from llm_proxy.store.repos import table_names

from .dbutil import create_pg_database, drop_pg_database, pg_available, pg_url


@pytest_asyncio.fixture(scope="module")
async def pg_name() -> AsyncIterator[str]:
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    name = await create_pg_database("mig")
    yield name
    await drop_pg_database(name)


async def _tables(url: str) -> tuple[set[str], str | None]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            names = set(await table_names(conn))
            rev = None
            if "alembic_version" in names:
                rev = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        return names, rev
    finally:
        await engine.dispose()


async def test_postgres_from_empty_idempotent_and_concurrent(pg_name: str) -> None:
    url = pg_url(pg_name)
    assert (await _tables(url))[0] == set()
    # three processes' worth of concurrent upgrades: the advisory lock serialises them
    assert await asyncio.gather(*(upgrade_url(url) for _ in range(3))) == [HEAD] * 3
    names, rev = await _tables(url)
    assert {"usage_events", "stored_completions", "api_keys", "alembic_version"} <= names
    assert rev == HEAD
    assert await upgrade_url(url) == HEAD  # again: nothing to do


async def test_sqlite_from_empty_creates_parent_dirs_and_is_idempotent(tmp_path: Path) -> None:
    db = tmp_path / "deep" / "er" / "ledger.db"
    url = f"sqlite+aiosqlite:///{db}"
    engine = create_engine(url)
    try:
        assert db.parent.is_dir()
        results = await asyncio.gather(upgrade(engine), upgrade(engine))
        assert list(results) == [HEAD, HEAD]
        assert await upgrade(engine) == HEAD
    finally:
        await engine.dispose()
    names, rev = await _tables(url)
    assert {"usage_events", "stored_completions"} <= names and rev == HEAD
    # plain sqlite:/// URLs get the async driver
    assert await upgrade_url(f"sqlite:///{db}") == HEAD


def test_cli_db_upgrade(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cli.db"
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "providers: []\nauth: {mode: none, allow_unauthenticated: true}\n"
        f"database: {{url: 'sqlite+aiosqlite:///{db}'}}\n"
    )
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    assert main(["db", "upgrade", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count(f"at revision {HEAD}") == 2
    assert db.is_file()


def test_cli_db_upgrade_reports_unreachable_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "providers: []\nauth: {mode: none, allow_unauthenticated: true}\n"
        "database: {url: 'postgresql+asyncpg://nobody:secret-pw@127.0.0.1:1/none'}\n"
    )
    assert main(["db", "upgrade", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "127.0.0.1:1" in err and "secret-pw" not in err
