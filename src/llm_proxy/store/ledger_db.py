"""The ledger's database without SQLAlchemy: URL parsing, batch inserts, reports, stored completions.

A serving process talks to its database through asyncpg or aiosqlite directly, with the statements below;
SQLAlchemy (and Alembic: ~20 MB resident per worker together) is loaded only when a migration is due
(`LedgerDB.migrate`) or for URLs only SQLAlchemy connects to (in-memory SQLite, SQLite URI options,
multi-host PostgreSQL). `store/repos.py:UsageRepo` runs the same statements on an SQLAlchemy engine's
driver connections (tests, tools, and that fallback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote

import orjson

from ..types import UsageEvent

T = TypeVar("T")

# The newest migration shipped; when the database is already there, neither Alembic nor SQLAlchemy is loaded.
HEAD_REVISION = "0005_groups_client_api"

# Lengths of the text columns (store/tables.py); longer values are cut before insert.
ID_LEN = 128
NAME_LEN = 255
SHORT_LEN = 64

# Keys of usage reports (LedgerDB.usage_report). "group" counts a row under each of its caller's groups (and a row
# without groups under null), so per-group sums can exceed the totals.
GROUP_KEYS: tuple[str, ...] = ("user", "model", "day", "provider", "endpoint", "status", "group", "client_api")

# --------------------------------------------------------------------------------------------------
# URLs
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Journal line -> row
# --------------------------------------------------------------------------------------------------

# A JSON "\u0000" escape not preceded by another backslash (PostgreSQL jsonb rejects NUL characters).
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_JSON_NUL_B = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
# A journal line is a JSON array of a UsageEvent's fields in this order: positional, so no key names to
# write, store and send (177 instead of 449 bytes for a typical row, and orjson writes a tuple ~2 us faster
# than an object of 21 keys). New fields go at the end only: a shorter line (an older version's) leaves the
# missing ones NULL, a longer one (a newer version's) has its extra elements ignored. Lines written before
# this format are JSON objects keyed by field name; every reader takes both.
JOURNAL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageEvent))
_EVENT_FIELDS = frozenset(JOURNAL_FIELDS)
# Every field a journal line may carry; a line from another version may lack some (they become NULL).
_LINE_DEFAULTS: dict[str, Any] = dict.fromkeys(_EVENT_FIELDS)


def line_fields(data: Any) -> dict[str, Any]:
    """The fields of a parsed journal line (an array, or an object from an older version) by name."""
    if isinstance(data, list):
        return dict(zip(JOURNAL_FIELDS, data, strict=False))
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k in _EVENT_FIELDS}
    raise ValueError("journal line is not a JSON array or object")


def event_from_line(line: bytes) -> UsageEvent:
    """The UsageEvent of one journal line; raises ValueError or TypeError when it is not one."""
    if b"\x00" in line:
        line = line.replace(b"\x00", b"")
    fields = line_fields(orjson.loads(line))
    if isinstance(fields.get("groups"), list):  # as the event had them (a tuple, from Principal.groups)
        fields["groups"] = tuple(fields["groups"])
    return UsageEvent(**fields)


def _as_array_line(line: bytes) -> bytes:
    """A journal line in the array form (a line of the older object form converted; anything else unchanged,
    for the database to reject)."""
    if line[:1] == b"[":
        return line
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if not isinstance(data, dict):
        return line
    return orjson.dumps([data.get(f) for f in JOURNAL_FIELDS], default=str)


def _s(value: Any, limit: int) -> str | None:
    """Text for a bounded column: NUL characters replaced (PostgreSQL rejects them), cut to the column length."""
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text[:limit] if len(text) > limit else text


def _json_text(value: Any) -> str:
    out = orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    if "\\u0000" in out:
        out = _JSON_NUL.sub(r"\1\\ufffd", out)
    return out


# SQLAlchemy's SQLite DATETIME storage format (UTC, as text), so that typed queries compare correctly.
_SQLITE_TS_FORMAT = "%Y-%m-%d %H:%M:%S.%f"


def _sqlite_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(_SQLITE_TS_FORMAT)


def _sqlite_rows(lines: Sequence[bytes]) -> tuple[list[dict[str, Any]], list[tuple[Any, ...]]]:
    """Parameters for the SQLite statements: the parsed line itself, with `extra` as JSON text minus the
    stored completion, which is split off here."""
    usage: list[dict[str, Any]] = []
    completions: list[tuple[Any, ...]] = []
    for line in lines:
        if b"\x00" in line:  # raw NUL bytes are never part of a journal line (a damaged file): skip them
            line = line.replace(b"\x00", b"")
        if b"\\u0000" in line:  # NUL characters become U+FFFD, as on PostgreSQL
            line = _JSON_NUL_B.sub(rb"\1\\ufffd", line)
        d = {**_LINE_DEFAULTS, **line_fields(orjson.loads(line))}  # ValueError when not an array or object
        extra = d["extra"]
        if extra:
            if isinstance(extra, dict) and "completion" in extra:
                row = _completion_row(d, extra["completion"])
                if row is not None:
                    completions.append(row)
                extra = {k: v for k, v in extra.items() if k != "completion"}
            d["extra"] = _json_text(extra) if extra else None
        else:
            d["extra"] = None
        groups = d["groups"]
        d["groups"] = _json_text(groups) if isinstance(groups, list) and groups else None  # as on PostgreSQL
        usage.append(d)
    return usage, completions


def _completion_row(d: dict[str, Any], completion: Any) -> tuple[Any, ...] | None:
    if not isinstance(completion, dict):
        return None
    response = completion.get("response")
    if isinstance(response, orjson.Fragment):
        response = orjson.loads(orjson.dumps(response))
    if not isinstance(response, dict):
        return None
    rid = d["request_id"]
    cid = response.get("id")
    messages = completion.get("input_messages")
    return (
        rid,
        _s(str(cid) if cid is not None and cid != "" else rid, NAME_LEN),
        _sqlite_ts(float(d["started_at"])),
        _s(d["subject"], NAME_LEN),
        _s(d["username"], NAME_LEN),
        _s(d["model"], NAME_LEN),
        _json_text(messages if isinstance(messages, list) else []),
        _json_text(response),
    )


# --------------------------------------------------------------------------------------------------
# Error classification
# --------------------------------------------------------------------------------------------------


def is_driver_row_error(exc: BaseException) -> bool:
    """True when an asyncpg / sqlite3 batch failed because of what some row holds: retrying cannot help.

    Everything else (connection refused or lost, timeouts, missing tables, locks) is transient: the
    ledger keeps the rows and retries. (store/repos.py:is_row_error also unwraps SQLAlchemy's errors.)
    """
    # An asyncpg or sqlite3 exception exists only once its module is imported: no import needed here.
    apg = sys.modules.get("asyncpg")
    if apg is not None and isinstance(exc, apg.DataError | apg.IntegrityConstraintViolationError):
        return True
    sq = sys.modules.get("sqlite3")
    if sq is not None:
        if isinstance(exc, sq.IntegrityError | sq.DataError | sq.InterfaceError):
            return True
        if isinstance(exc, sq.ProgrammingError) and "binding" in str(exc):  # a value of a type it cannot store
            return True
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return False
    return isinstance(exc, TypeError | ValueError | OverflowError)


# --------------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------------

# PostgreSQL: the whole batch travels as one JSON array of journal lines (no per-value encoding in the
# client); the server unpacks it (jsonb: parsed once, then each element by position), cleans it up (NUL,
# lengths) and splits off stored completions.
_PG_TYPES = {
    "started_at": "float8", "ended_at": "float8", "latency_ms": "float8", "ttft_ms": "float8",
    "upstream_latency_ms": "float8", "status": "int4", "attempts": "int4", "streamed": "bool",
    "prompt_tokens": "int8", "completion_tokens": "int8", "total_tokens": "int8", "cached_tokens": "int8",
    "usage_estimated": "bool", "cost_usd": "float8",
}  # fmt: skip
_PG_BATCH = "(SELECT {} FROM jsonb_array_elements($1::jsonb) AS e) AS t".format(  # noqa: S608 (constants)
    ", ".join(
        f"e->{i} AS {name}" if name in ("extra", "groups") else f"(e->>{i})::{_PG_TYPES.get(name, 'text')} AS {name}"
        for i, name in enumerate(JOURNAL_FIELDS)
    )
)
_PG_USAGE_ROWS = """
INSERT INTO usage_events (request_id, started_at, ended_at, subject, username, endpoint, model, provider_id,
                          upstream_model, streamed, status, error_type, prompt_tokens, completion_tokens,
                          total_tokens, cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, attempts, extra,
                          usage_estimated, cost_usd, groups, client_api)
SELECT request_id, to_timestamp(started_at), to_timestamp(ended_at), left(subject, 255), left(username, 255),
       coalesce(left(endpoint, 64), ''), left(model, 255), left(provider_id, 255), left(upstream_model, 255),
       coalesce(streamed, false), status, left(error_type, 64), prompt_tokens, completion_tokens, total_tokens,
       cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, coalesce(attempts, 1),
       nullif(extra - 'completion', '{}'::jsonb), coalesce(usage_estimated, false), cost_usd,
       CASE WHEN jsonb_typeof(groups) = 'array' AND groups <> '[]'::jsonb THEN groups END, left(client_api, 64)"""

# The usual batch (no stored completions): no CTE, so nothing is materialised.
_PG_INSERT_USAGE = f"{_PG_USAGE_ROWS}\nFROM {_PG_BATCH}\nON CONFLICT (request_id) DO NOTHING\n"

# A batch with stored completions: usage rows and completions from one unpacked batch.
_PG_INSERT = f"""
WITH src AS (SELECT * FROM {_PG_BATCH}),
ins AS ({_PG_USAGE_ROWS}
  FROM src
  ON CONFLICT (request_id) DO NOTHING
  RETURNING 1
), completions AS (
  INSERT INTO stored_completions (request_id, completion_id, created_at, subject, username, model, input_messages,
                                  response)
  SELECT request_id, left(coalesce(nullif(extra #>> '{{completion,response,id}}', ''), request_id), 255),
         to_timestamp(started_at), left(subject, 255), left(username, 255), left(model, 255),
         CASE WHEN jsonb_typeof(extra #> '{{completion,input_messages}}') = 'array'
              THEN extra #> '{{completion,input_messages}}' ELSE '[]'::jsonb END,
         extra #> '{{completion,response}}'
  FROM src
  WHERE jsonb_typeof(extra #> '{{completion,response}}') = 'object'
  ON CONFLICT (request_id) DO NOTHING
)
SELECT count(*) FROM ins
"""  # noqa: S608 (constant fragments)

# SQLite: named parameters straight from the parsed journal line (NUL characters already replaced), cut
# to the column lengths as on PostgreSQL. Timestamps become the text SQLAlchemy's SQLite DATETIME uses
# ("YYYY-MM-DD HH:MM:SS.ffffff", UTC), so that typed queries compare correctly.
_SQLITE_USAGE_INSERT = """
INSERT INTO usage_events (request_id, started_at, ended_at, subject, username, endpoint, model, provider_id,
                          upstream_model, streamed, status, error_type, prompt_tokens, completion_tokens,
                          total_tokens, cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, attempts, extra,
                          usage_estimated, cost_usd, groups, client_api)
VALUES (:request_id,
        strftime('%Y-%m-%d %H:%M:%S', CAST(round(:started_at * 1000000) AS INTEGER) / 1000000, 'unixepoch')
           || printf('.%06d', CAST(round(:started_at * 1000000) AS INTEGER) % 1000000),
        strftime('%Y-%m-%d %H:%M:%S', CAST(round(:ended_at * 1000000) AS INTEGER) / 1000000, 'unixepoch')
           || printf('.%06d', CAST(round(:ended_at * 1000000) AS INTEGER) % 1000000),
        substr(:subject, 1, 255),
        substr(:username, 1, 255),
        coalesce(substr(:endpoint, 1, 64), ''),
        substr(:model, 1, 255),
        substr(:provider_id, 1, 255),
        substr(:upstream_model, 1, 255),
        coalesce(:streamed, 0), :status, substr(:error_type, 1, 64),
        :prompt_tokens, :completion_tokens, :total_tokens, :cached_tokens,
        :latency_ms, :ttft_ms, :upstream_latency_ms, coalesce(:attempts, 1), :extra, coalesce(:usage_estimated, 0),
        :cost_usd, :groups, substr(:client_api, 1, 64))
ON CONFLICT (request_id) DO NOTHING
"""

_SQLITE_COMPLETION_INSERT = """
INSERT INTO stored_completions (request_id, completion_id, created_at, subject, username, model, input_messages,
                                response)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO NOTHING
"""

# --------------------------------------------------------------------------------------------------
# Table names: database.table_prefix goes before every table the proxy creates (and Alembic's version table)
# --------------------------------------------------------------------------------------------------

# What database.table_prefix may be: lower case (PostgreSQL folds unquoted names), short enough that the longest
# index name (ix_<prefix>stored_completions_subject_created_at) stays within PostgreSQL's 63 characters.
TABLE_PREFIX = re.compile(r"([a-z_][a-z0-9_]{0,23})?")
_TABLE_NAMES = re.compile(r"\b(usage_events|stored_completions|alembic_version)\b")


def check_table_prefix(prefix: str) -> str:
    if TABLE_PREFIX.fullmatch(prefix) is None:
        raise ValueError(
            f"database.table_prefix '{prefix}' must be at most 24 lower-case letters, digits and '_', "
            "not starting with a digit"
        )
    return prefix


@dataclasses.dataclass(frozen=True, slots=True)
class Statements:
    """The ledger's statements for one table prefix (built once per prefix, at start)."""

    prefix: str
    usage_events: str
    stored_completions: str
    version_table: str
    pg_insert_usage: str
    pg_insert: str
    sqlite_usage_insert: str
    sqlite_completion_insert: str


@functools.lru_cache(maxsize=8)
def statements(prefix: str = "") -> Statements:
    check_table_prefix(prefix)

    def named(sql: str) -> str:
        return _TABLE_NAMES.sub(lambda m: prefix + m[1], sql) if prefix else sql

    return Statements(
        prefix, prefix + "usage_events", prefix + "stored_completions", prefix + "alembic_version",
        named(_PG_INSERT_USAGE), named(_PG_INSERT), named(_SQLITE_USAGE_INSERT), named(_SQLITE_COMPLETION_INSERT),
    )


def _inserted(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


async def pg_insert_lines(conn: Any, lines: Sequence[bytes], sql: Statements | None = None) -> int:
    """Insert journal lines on an asyncpg connection (one statement, its own transaction); rows added."""
    sql = sql or statements()
    if any(line[:1] != b"[" for line in lines):  # from a journal of an older version
        lines = [_as_array_line(line) for line in lines]
    payload = b"[" + b",".join(lines) + b"]"
    if b"\\u0000" in payload:
        payload = _JSON_NUL_B.sub(rb"\1\\ufffd", payload)
    if b"\x00" in payload:  # raw NUL bytes are never part of a journal line (a damaged file): skip them
        payload = payload.replace(b"\x00", b"")
    text_payload = payload.decode("utf-8", "replace")
    if b'"completion":' in payload:  # a key only stored completions have
        return int(await conn.fetchval(sql.pg_insert, text_payload) or 0)
    return _inserted(str(await conn.execute(sql.pg_insert_usage, text_payload)))


async def sqlite_insert_lines(db: Any, lines: Sequence[bytes], sql: Statements | None = None) -> int:
    """Insert journal lines on an aiosqlite connection in one transaction; rows added."""
    sql = sql or statements()
    usage, completions = _sqlite_rows(lines)
    before = db.total_changes
    try:
        await db.executemany(sql.sqlite_usage_insert, usage)
        added = db.total_changes - before
        if completions:
            await db.executemany(sql.sqlite_completion_insert, completions)
        await db.commit()
    except BaseException:
        await db.rollback()
        raise
    return int(added)


# --------------------------------------------------------------------------------------------------
# Reads: usage reports and stored completions (GET /v1/usage, /v1/chat/completions, `llm-proxy usage`)
# --------------------------------------------------------------------------------------------------

# Report keys -> the column they group by ("day": _DAY_SQL, per dialect).
_GROUP_SQL = {
    "user": "subject",
    "model": "model",
    "provider": "provider_id",
    "endpoint": "endpoint",
    "status": "status",
    "client_api": "client_api",
}
# "group": one output row per element of a row's groups, and one (NULL) for a row without any (LEFT JOIN). The
# CASE guards the set-returning functions against anything but an array (inserts store an array or NULL).
_GROUP_JOIN = {
    "postgresql": " LEFT JOIN LATERAL jsonb_array_elements_text(CASE WHEN jsonb_typeof(groups) = 'array' "
                  "THEN groups END) AS g(name) ON true",
    "sqlite": " LEFT JOIN json_each(CASE WHEN json_valid(groups) THEN CASE json_type(groups) WHEN 'array' "
              "THEN groups END END) AS g",
}
_GROUP_NAME = {"postgresql": "g.name", "sqlite": "g.value"}
_DAY_SQL = {"postgresql": "to_char(timezone('UTC', started_at), 'YYYY-MM-DD')", "sqlite": "substr(started_at, 1, 10)"}
_AGGREGATES = """count(*) AS requests,
  CAST(coalesce(sum(CASE WHEN status >= 400 THEN 1 ELSE 0 END), 0) AS BIGINT) AS errors,
  CAST(coalesce(sum(prompt_tokens), 0) AS BIGINT) AS prompt_tokens,
  CAST(coalesce(sum(completion_tokens), 0) AS BIGINT) AS completion_tokens,
  CAST(coalesce(sum(total_tokens), 0) AS BIGINT) AS total_tokens,
  CAST(coalesce(sum(cached_tokens), 0) AS BIGINT) AS cached_tokens,
  CAST(coalesce(sum(CASE WHEN usage_estimated THEN 1 ELSE 0 END), 0) AS BIGINT) AS estimated_requests,
  CAST(coalesce(sum(CASE WHEN total_tokens IS NULL AND status < 400 THEN 1 ELSE 0 END), 0) AS BIGINT)
    AS requests_without_tokens,
  sum(cost_usd) AS cost_usd,
  CAST(coalesce(sum(CASE WHEN cost_usd IS NULL AND total_tokens IS NOT NULL THEN 1 ELSE 0 END), 0) AS BIGINT)
    AS requests_without_cost,
  avg(latency_ms) AS avg_latency_ms,
  avg(ttft_ms) AS avg_ttft_ms"""
_COMPLETION_COLUMNS = "request_id, completion_id, created_at, subject, username, model, input_messages, response"


class _Sql:
    """Parameters for one statement: `?` on SQLite, `$n` on PostgreSQL; timestamps bound as each stores them.

    Statements are assembled from the constant fragments of this module; every value is a bind parameter
    (hence the `noqa: S608` on the f-strings below)."""

    def __init__(self, dialect: str) -> None:
        self.pg = dialect == "postgresql"
        self.args: list[Any] = []

    def p(self, value: Any) -> str:
        if isinstance(value, datetime):
            value = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
            if not self.pg:
                value = value.astimezone(UTC).strftime(_SQLITE_TS_FORMAT)
        self.args.append(value)
        return f"${len(self.args)}" if self.pg else "?"

    @staticmethod
    def where(conds: Sequence[str]) -> str:
        return " WHERE " + " AND ".join(conds) if conds else ""

    async def fetch(self, conn: Any, sql: str) -> list[dict[str, Any]]:
        if self.pg:
            return [dict(r) for r in await conn.fetch(sql, *self.args)]
        async with conn.execute(sql, self.args) as cur:
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in await cur.fetchall()]


def _utc(value: Any) -> datetime | None:
    """A timestamp column as an aware UTC datetime (SQLite keeps naive UTC text)."""
    if value is None:
        return None
    out: datetime = datetime.fromisoformat(value) if isinstance(value, str) else value
    return out.replace(tzinfo=UTC) if out.tzinfo is None else out.astimezone(UTC)


def _completion(row: dict[str, Any]) -> dict[str, Any]:
    row["created_at"] = _utc(row["created_at"])
    for key in ("input_messages", "response"):
        if isinstance(row[key], str | bytes):
            row[key] = orjson.loads(row[key])
    return row


# --------------------------------------------------------------------------------------------------
# The ledger's database
# --------------------------------------------------------------------------------------------------


def _undefined_table(exc: BaseException) -> bool:
    apg = sys.modules.get("asyncpg")
    if apg is not None and isinstance(exc, apg.UndefinedTableError):
        return True
    sq = sys.modules.get("sqlite3")
    return sq is not None and isinstance(exc, sq.OperationalError) and "no such table" in str(exc)


async def _revision(conn: Any, dialect: str, version_table: str = "alembic_version") -> str | None:
    try:
        rows = await _Sql(dialect).fetch(conn, f"SELECT version_num FROM {version_table}")  # noqa: S608 (checked)
    except Exception as exc:
        if _undefined_table(exc):
            return None
        raise
    return str(rows[0]["version_num"]) if rows else None


async def _select_1(conn: Any, dialect: str) -> None:
    await _Sql(dialect).fetch(conn, "SELECT 1")


class MigrationFailed(RuntimeError):
    pass


_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


async def migrate_in_child(raw_url: str, table_prefix: str = "") -> None:
    """`python -m llm_proxy.store.db` with the URL (and the table prefix) on stdin (never on a command line `ps`
    shows)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy.store.db",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await proc.communicate(f"{raw_url}\n{table_prefix}\n".encode())
    except BaseException:  # cancelled (start-up timeout, shutdown): the child goes too
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise MigrationFailed(_URL_PASSWORD.sub(r"\1***@", why)[:500])


class LedgerDB:
    """The ledger's database: batch inserts, ping, schema revision, reports and stored completions.

    Subclasses provide a driver connection (asyncpg or aiosqlite) to run one operation on (`_run`).
    """

    dialect = ""

    def __init__(self, raw_url: str, table_prefix: str = "") -> None:
        self.raw_url = raw_url
        self.sql = statements(table_prefix)

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def is_row_error(self, exc: BaseException) -> bool:
        """True when `exc` from insert_lines() is about what some row holds: retrying the rows cannot help."""
        return is_driver_row_error(exc)

    async def insert_lines(self, lines: Sequence[bytes]) -> int:
        """Insert a batch of journal lines (one JSON UsageEvent each) in one transaction, skipping request ids
        already stored. Returns the number of rows added. A line that is not a valid event raises an error
        for which is_row_error() is true."""
        if not lines:
            return 0
        insert = pg_insert_lines if self.dialect == "postgresql" else sqlite_insert_lines
        return await self._run(lambda conn: insert(conn, lines, self.sql))

    async def ping(self) -> None:
        await self._run(lambda conn: _select_1(conn, self.dialect))

    async def revision(self) -> str | None:
        """The database's Alembic revision (None when unmigrated); raises when the database is unreachable."""
        return await self._run(lambda conn: _revision(conn, self.dialect, self.sql.version_table))

    async def migrate(self) -> None:
        """Bring the schema to HEAD_REVISION. The work (SQLAlchemy + Alembic, ~27 MB that a process never gives
        back) runs in a short-lived child process, so a worker that migrates stays as small as one that did not."""
        if await self.revision() == HEAD_REVISION:
            return
        await migrate_in_child(self.raw_url, self.sql.prefix)

    async def usage_report(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        group_by: Sequence[str],
        subject: str | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Aggregate usage_events by the keys of GROUP_KEYS; returns (rows, totals). By "group" a row counts once
        under each of its groups and a row without groups under None; the totals count every row once."""
        keys: list[tuple[str, str]] = []  # (expression, output column)
        join = ""
        for key in group_by:
            if key == "day":
                keys.append((_DAY_SQL[self.dialect], key))
            elif key == "group":
                keys.append((_GROUP_NAME[self.dialect], key))
                join = _GROUP_JOIN[self.dialect]
            elif key in _GROUP_SQL:
                keys.append((_GROUP_SQL[key], key))
            else:
                raise ValueError(f"unknown group key '{key}'")

        def select(q: _Sql, columns: str, join: str = "") -> str:
            return self._select(q, columns, since, until, subject, join=join)

        async def run(conn: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            if keys:
                q = _Sql(self.dialect)
                cols = [f'{expr} AS "{name}"' for expr, name in keys]
                if "user" in group_by:
                    cols.append("max(username) AS username")
                exprs = ", ".join(expr for expr, _ in keys)
                sql = select(q, ", ".join([*cols, _AGGREGATES]), join)
                rows = await q.fetch(conn, f"{sql} GROUP BY {exprs} ORDER BY {exprs}")
            q = _Sql(self.dialect)
            (totals,) = await q.fetch(conn, select(q, _AGGREGATES))  # each row once, whatever its groups
            return rows, totals

        return await self._run(run)

    def _select(self, q: _Sql, columns: str, since: datetime | None, until: datetime | None, subject: str | None,
                extra: Sequence[str] = (), join: str = "") -> str:
        """SELECT `columns` FROM usage_events (`join`ed to a constant fragment) for a time range and (optionally)
        one subject."""
        conds = []
        if since is not None:
            conds.append(f"started_at >= {q.p(since)}")
        if until is not None:
            conds.append(f"started_at < {q.p(until)}")
        if subject is not None:
            conds.append(f"subject = {q.p(subject)}")
        conds.extend(extra)
        return f"SELECT {columns} FROM {self.sql.usage_events}{join}{q.where(conds)}"  # noqa: S608

    async def latency_percentiles(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        subject: str | None = None,
        quantiles: Sequence[float] = (0.5, 0.95, 0.99),
    ) -> dict[str, float | None]:
        """Request latency (ms) at each quantile, nearest rank, over the rows that have one: {"p50": ..., ...}."""

        async def run(conn: Any) -> dict[str, float | None]:
            q = _Sql(self.dialect)
            (row,) = await q.fetch(conn, self._select(q, "count(latency_ms) AS n", since, until, subject))
            n = int(row["n"] or 0)
            out: dict[str, float | None] = {}
            for quantile in quantiles:
                key = f"p{round(quantile * 100):d}"
                if n == 0:
                    out[key] = None
                    continue
                rank = max(1, min(n, math.ceil(quantile * n)))
                q = _Sql(self.dialect)
                sql = self._select(q, "latency_ms", since, until, subject, ["latency_ms IS NOT NULL"])
                sql += f" ORDER BY latency_ms LIMIT 1 OFFSET {q.p(rank - 1)}"
                (hit,) = await q.fetch(conn, sql)
                out[key] = float(hit["latency_ms"])
            return out

        return await self._run(run)

    async def list_completions(
        self,
        *,
        subject: str | None,
        limit: int,
        after: str | None = None,
        order: str = "desc",
        model: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of stored completions visible to `subject` (None: all), newest first unless order is "asc";
        `after` is the completion id (or request id) the previous page ended with. Returns (rows, has_more)."""
        direction = "DESC" if order == "desc" else "ASC"
        table = self.sql.stored_completions

        def filters(q: _Sql) -> list[str]:
            conds = []
            if subject is not None:
                conds.append(f"subject = {q.p(subject)}")
            if model is not None:
                conds.append(f"model = {q.p(model)}")
            return conds

        async def run(conn: Any) -> tuple[list[dict[str, Any]], bool]:
            anchor: list[dict[str, Any]] = []
            if after is not None:
                q = _Sql(self.dialect)
                conds = [f"(completion_id = {q.p(after)} OR request_id = {q.p(after)})", *filters(q)]
                sql = f"SELECT created_at, request_id FROM {table}{q.where(conds)} LIMIT 1"  # noqa: S608
                anchor = await q.fetch(conn, sql)
            q = _Sql(self.dialect)
            conds = filters(q)
            if anchor:  # the row the previous page ended with, compared as stored (no conversion)
                at, rid = q.p(anchor[0]["created_at"]), q.p(anchor[0]["request_id"])
                conds.append(f"(created_at, request_id) {'<' if order == 'desc' else '>'} ({at}, {rid})")
            sql = (f"SELECT {_COMPLETION_COLUMNS} FROM {table}{q.where(conds)} "  # noqa: S608
                   f"ORDER BY created_at {direction}, request_id {direction} LIMIT {q.p(limit + 1)}")
            rows = [_completion(r) for r in await q.fetch(conn, sql)]
            return rows[:limit], len(rows) > limit

        return await self._run(run)

    async def get_completion(self, completion_id: str, *, subject: str | None) -> dict[str, Any] | None:
        """One stored completion by completion id or request id, if `subject` (None: anyone) may see it."""

        async def run(conn: Any) -> dict[str, Any] | None:
            q = _Sql(self.dialect)
            conds = [f"(completion_id = {q.p(completion_id)} OR request_id = {q.p(completion_id)})"]
            if subject is not None:
                conds.append(f"subject = {q.p(subject)}")
            sql = f"SELECT {_COMPLETION_COLUMNS} FROM {self.sql.stored_completions}{q.where(conds)} LIMIT 1"  # noqa: S608
            rows = await q.fetch(conn, sql)
            return _completion(rows[0]) if rows else None

        return await self._run(run)


class PgLedgerDB(LedgerDB):
    """PostgreSQL through asyncpg; keeps up to `connections` + 1 idle connections (batches in flight, a read)."""

    dialect = "postgresql"

    def __init__(self, raw_url: str, url: DbUrl, connections: int, table_prefix: str = "") -> None:
        super().__init__(raw_url, table_prefix)
        # URL query parameters first: the fixed arguments win, as SQLAlchemy's connect_args did.
        self._connect_kwargs = {
            **url.asyncpg_kwargs(),
            "timeout": 5,  # connect
            "command_timeout": 60,
            "server_settings": {"application_name": "llm-proxy"},
        }
        self._keep = connections + 1
        self._idle: list[Any] = []

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        while self._idle:
            conn = self._idle.pop()
            if conn.is_closed():
                continue
            try:
                return await self._use(conn, fn)
            except Exception as exc:
                if not _connection_lost(exc):
                    raise
                # An idle connection the server (or something in between) closed: on to a new one, as
                # SQLAlchemy's pre-ping did, without its round trip per checkout.
        import asyncpg

        return await self._use(await asyncpg.connect(**self._connect_kwargs), fn)

    async def _use(self, conn: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
        try:
            result = await fn(conn)
        except BaseException as exc:
            if self.is_row_error(exc) and not conn.is_closed():
                self._idle.append(conn)  # the statement failed, the connection is fine
            else:
                conn.terminate()  # it may be broken: never reuse it
            raise
        if not conn.is_closed():
            if len(self._idle) < self._keep:
                self._idle.append(conn)
            else:
                await _close_pg(conn)
        return result

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await _close_pg(conn)


def _connection_lost(exc: BaseException) -> bool:
    """An error of a connection that was closed while idle (InternalClientError: asyncpg read the server's
    FATAL message before the next query and its protocol state no longer allows one)."""
    apg = sys.modules["asyncpg"]
    return isinstance(exc, ConnectionError | apg.InterfaceError | apg.InternalClientError
                      | apg.PostgresConnectionError | apg.AdminShutdownError)


async def _close_pg(conn: Any) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2.0)
    except Exception:
        conn.terminate()


class SqliteLedgerDB(LedgerDB):
    """A SQLite file through one aiosqlite connection (SQLite serialises writers anyway)."""

    dialect = "sqlite"

    def __init__(self, raw_url: str, path: Path, table_prefix: str = "") -> None:
        super().__init__(raw_url, table_prefix)
        self.path = path
        self._db: Any = None
        self._lock = asyncio.Lock()

    async def _connection(self) -> Any:
        if self._db is None:
            import aiosqlite

            self.path.parent.mkdir(parents=True, exist_ok=True)
            pending = aiosqlite.connect(self.path)
            # aiosqlite runs the connection in a non-daemon thread: a process that ends without closing the
            # ledger (a crash, a test failing before close) would hang at exit. The journal keeps every row until
            # it is committed, so nothing depends on that thread finishing.
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                thread.daemon = True
            db = await pending
            try:
                # As store/db.py:create_engine sets them on SQLAlchemy's connections.
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=NORMAL")
                await db.execute("PRAGMA busy_timeout=10000")
            except BaseException:
                await db.close()
                raise
            self._db = db
        return self._db

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        async with self._lock:
            return await fn(await self._connection())

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await db.close()
