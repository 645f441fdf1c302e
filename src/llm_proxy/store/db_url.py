"""Database URLs as the ledger reads them, by SQLAlchemy's grammar without SQLAlchemy: DbUrl, parse_db_url()."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

_BACKENDS = {
    "sqlite": "sqlite",
    "sqlite+pysqlite": "sqlite",
    "sqlite+aiosqlite": "sqlite",
    "postgres": "postgresql",
    "postgresql": "postgresql",
    "postgresql+psycopg2": "postgresql",
    "postgresql+psycopg": "postgresql",
    "postgresql+asyncpg": "postgresql",
}
ASYNC_DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg"}

# SQLAlchemy's URL grammar (sqlalchemy/engine/url.py:_parse_url), so both read a URL the same way.
_URL = re.compile(
    r"""
    (?P<name>[\w+]+)://
    (?:(?P<username>[^:/]*)(?::(?P<password>[^@]*))?@)?
    (?:(?:\[(?P<ipv6host>[^/?]+)\]|(?P<ipv4host>[^/:?]+))?(?::(?P<port>[^/?]*))?)?
    (?:/(?P<database>[^?]*))?
    (?:\?(?P<query>.*))?
    """,
    re.X,
)
# Query keys SQLAlchemy's asyncpg dialect consumes itself instead of passing them to asyncpg.connect().
_SA_ONLY_KEYS = ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback")


@dataclasses.dataclass(frozen=True, slots=True)
class DbUrl:
    backend: str  # "postgresql" | "sqlite"
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: dict[str, str | tuple[str, ...]] = dataclasses.field(default_factory=dict)

    @property
    def sqlite_path(self) -> Path | None:
        """The file of a SQLite URL; None for in-memory and `file:` URI databases."""
        db = self.database
        if self.backend != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
            return None
        return Path(db)

    def asyncpg_kwargs(self) -> dict[str, Any]:
        """asyncpg.connect() keyword arguments, as SQLAlchemy's asyncpg dialect builds them."""
        out: dict[str, Any] = {k: v for k, v in (("user", self.username), ("password", self.password),
                                                 ("host", self.host), ("port", self.port),
                                                 ("database", self.database)) if v}
        out.update((k, v) for k, v in self.query.items() if k not in _SA_ONLY_KEYS)
        if isinstance(out.get("port"), str):
            out["port"] = int(out["port"])
        return out


def backend_of(driver: str) -> str:
    """'postgresql' or 'sqlite' for a URL's driver name; ValueError when the ledger cannot use it."""
    backend = _BACKENDS.get(driver)
    if backend is None:
        raise ValueError(
            f"database.url driver '{driver}' is not supported; use sqlite+aiosqlite or postgresql+asyncpg"
        )
    return backend


def parse_db_url(raw: str) -> DbUrl:
    m = _URL.match(raw)
    if m is None:
        raise ValueError(f"database.url '{raw}' is not a database URL")
    g = m.groupdict()
    query: dict[str, str | tuple[str, ...]] = {}
    for key, value in parse_qsl(g["query"] or ""):
        old = query.get(key)
        query[key] = value if old is None else (*((old,) if isinstance(old, str) else old), value)
    port = g["port"]
    try:
        port_num = int(port) if port else None
    except ValueError:
        raise ValueError(f"database.url '{raw}' is not a database URL") from None
    return DbUrl(
        backend=backend_of(g["name"]),
        username=unquote(g["username"]) if g["username"] is not None else None,
        password=unquote(g["password"]) if g["password"] is not None else None,
        host=g["ipv4host"] or g["ipv6host"],
        port=port_num,
        database=unquote(g["database"]) if g["database"] is not None else None,
        query=query,
    )
