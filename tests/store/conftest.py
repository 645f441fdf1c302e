"""Fixtures for the ledger tests: one fresh database per module and dialect (PostgreSQL and SQLite)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from llm_proxy.store.db import create_engine, upgrade

from .dbutil import create_pg_database, drop_pg_database, pg_available, pg_url


@pytest_asyncio.fixture(scope="module", params=["postgresql", "sqlite"])
async def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A migrated, empty database for the whole module."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "ledger.db"
        url = f"sqlite+aiosqlite:///{path}"
        name = None
    else:
        if not await pg_available():
            pytest.skip("PostgreSQL is not reachable")
        name = await create_pg_database(request.module.__name__.rsplit(".", 1)[-1][:20])
        url = pg_url(name)
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()
    yield url
    if name is not None:
        await drop_pg_database(name)
