"""Opens the ledger's database by URL: the asyncpg / aiosqlite paths of ledger_db.py, else SQLAlchemy (repos.py).

Apart from ledger_db.py so that the serving path's module never imports the SQLAlchemy one (import-linter holds
the store's layers: repos above db above tables above ledger_db and the modules it builds on).
"""

from __future__ import annotations

from .db_url import parse_db_url
from .ledger_db import LedgerDB, PgLedgerDB, SqliteLedgerDB


def open_ledger_db(raw_url: str, *, connections: int = 2, table_prefix: str = "") -> LedgerDB:
    """The ledger's database at `raw_url` (nothing connects before the first use). `connections`: batches
    the writer keeps in flight; `table_prefix`: database.table_prefix."""
    url = parse_db_url(raw_url)
    path = url.sqlite_path
    if url.backend == "postgresql" and "host" not in url.query:
        return PgLedgerDB(raw_url, url, connections, table_prefix)
    if path is not None and not url.query:
        return SqliteLedgerDB(raw_url, path, table_prefix)
    # In-memory SQLite (one connection shared by migrations, writes and reads), SQLite URI options,
    # multi-host PostgreSQL: SQLAlchemy connects, as it always did.
    from .repos import UsageRepo

    return UsageRepo.from_url(raw_url, table_prefix)
