"""Alembic environment for the ledger tables; normally runs on a connection handed over by llm_proxy.store.db."""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy.engine import Connection

from llm_proxy.store.db import create_engine
from llm_proxy.store.inserts import statements
from llm_proxy.store.tables import ledger_tables

config = context.config
# database.table_prefix: set by llm_proxy.store.db.alembic_config; for the alembic command line, from the
# LLM_PROXY_TABLE_PREFIX environment variable. Migrations read it back from config.attributes.
_prefix = config.attributes.get("table_prefix")
if _prefix is None:
    _prefix = config.attributes["table_prefix"] = os.environ.get("LLM_PROXY_TABLE_PREFIX", "")
_names = statements(_prefix)  # checks the prefix
target_metadata = ledger_tables(_prefix).metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("DATABASE_URL")
    if not url:
        raise RuntimeError("set sqlalchemy.url in alembic.ini or the DATABASE_URL environment variable")
    return url


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        version_table=_names.version_table,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = create_engine(_url())
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_run)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True,
                      version_table=_names.version_table)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # llm_proxy.store.db.upgrade()
        _run(connection)
    else:  # the alembic command line
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
