"""Every SQL statement of the ledger: idempotent batch inserts, usage reports, stored completions."""

from __future__ import annotations

import dataclasses
import re
import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from sqlalchemy import BigInteger, ColumnElement, and_, case, cast, func, or_, select, text, tuple_
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..types import UsageEvent
from .tables import ID_LEN, NAME_LEN, stored_completions, usage_events

# --------------------------------------------------------------------------------------------------
# Event -> row
# --------------------------------------------------------------------------------------------------

USAGE_COLUMNS: tuple[str, ...] = (
    "request_id",
    "started_at",
    "ended_at",
    "subject",
    "username",
    "endpoint",
    "model",
    "provider_id",
    "upstream_model",
    "streamed",
    "status",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "latency_ms",
    "ttft_ms",
    "upstream_latency_ms",
    "attempts",
    "extra",
)
COMPLETION_COLUMNS: tuple[str, ...] = (
    "request_id",
    "completion_id",
    "created_at",
    "subject",
    "username",
    "model",
    "input_messages",
    "response",
)

# A JSON "\u0000" escape not preceded by another backslash (PostgreSQL jsonb rejects NUL characters).
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_JSON_NUL_B = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
_EVENT_FIELDS = frozenset(f.name for f in dataclasses.fields(UsageEvent))


def event_from_line(line: bytes) -> UsageEvent:
    """The UsageEvent of one journal line; raises ValueError or TypeError when it is not one."""
    if b"\x00" in line:
        line = line.replace(b"\x00", b"")
    data = orjson.loads(line)
    if not isinstance(data, dict):
        raise ValueError("journal line is not a JSON object")
    return UsageEvent(**{k: v for k, v in data.items() if k in _EVENT_FIELDS})


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


# Every field a journal line may carry; a line from another version may lack some (they become NULL).
_LINE_DEFAULTS: dict[str, Any] = dict.fromkeys(_EVENT_FIELDS)


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
        d = {**_LINE_DEFAULTS, **orjson.loads(line)}  # TypeError when the line is not an object
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


def is_row_error(exc: BaseException) -> bool:
    """True when a batch failed because of what some row holds: retrying the same rows cannot help.

    Everything else (connection refused or lost, timeouts, missing tables, locks) is transient: the
    ledger keeps the rows and retries.
    """
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return False
        if isinstance(exc, sa_exc.IntegrityError | sa_exc.DataError):
            return True
        inner: BaseException | None = exc.orig
        return inner is not None and inner is not exc and is_row_error(inner)
    if isinstance(exc, sa_exc.StatementError):  # a value the driver could not bind
        cause: BaseException | None = exc.orig
        return cause is None or not isinstance(cause, OSError | TimeoutError | ConnectionError)
    if isinstance(exc, asyncpg.DataError | asyncpg.IntegrityConstraintViolationError):
        return True
    if isinstance(exc, sqlite3.IntegrityError | sqlite3.DataError | sqlite3.InterfaceError):
        return True
    if isinstance(exc, sqlite3.ProgrammingError) and "binding" in str(exc):  # a value of a type it cannot store
        return True
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return False
    return isinstance(exc, TypeError | ValueError | OverflowError)


# --------------------------------------------------------------------------------------------------
# SQL
# --------------------------------------------------------------------------------------------------

# PostgreSQL: the whole batch travels as one JSON array of journal lines (no per-value encoding in the
# client); the server unpacks it, cleans it up (NUL, lengths) and splits off stored completions.
_PG_INSERT = """
WITH src AS (
  SELECT * FROM json_to_recordset($1::json) AS t(
    request_id text, started_at float8, ended_at float8, subject text, username text, endpoint text, model text,
    provider_id text, upstream_model text, streamed bool, status int4, error_type text, prompt_tokens int8,
    completion_tokens int8, total_tokens int8, cached_tokens int8, latency_ms float8, ttft_ms float8,
    upstream_latency_ms float8, attempts int4, extra jsonb)
), ins AS (
  INSERT INTO usage_events (request_id, started_at, ended_at, subject, username, endpoint, model, provider_id,
                            upstream_model, streamed, status, error_type, prompt_tokens, completion_tokens,
                            total_tokens, cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, attempts, extra)
  SELECT request_id, to_timestamp(started_at), to_timestamp(ended_at), left(subject, 255), left(username, 255),
         coalesce(left(endpoint, 64), ''), left(model, 255), left(provider_id, 255), left(upstream_model, 255),
         coalesce(streamed, false), status, left(error_type, 64), prompt_tokens, completion_tokens, total_tokens,
         cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, coalesce(attempts, 1),
         nullif(extra - 'completion', '{}'::jsonb)
  FROM src
  ON CONFLICT (request_id) DO NOTHING
  RETURNING 1
), completions AS (
  INSERT INTO stored_completions (request_id, completion_id, created_at, subject, username, model, input_messages,
                                  response)
  SELECT request_id, left(coalesce(nullif(extra #>> '{completion,response,id}', ''), request_id), 255),
         to_timestamp(started_at), left(subject, 255), left(username, 255), left(model, 255),
         CASE WHEN jsonb_typeof(extra #> '{completion,input_messages}') = 'array'
              THEN extra #> '{completion,input_messages}' ELSE '[]'::jsonb END,
         extra #> '{completion,response}'
  FROM src
  WHERE jsonb_typeof(extra #> '{completion,response}') = 'object'
  ON CONFLICT (request_id) DO NOTHING
)
SELECT count(*) FROM ins
"""

# The same without stored completions (the usual batch): no CTE, so nothing is materialised.
_PG_INSERT_USAGE = """
INSERT INTO usage_events (request_id, started_at, ended_at, subject, username, endpoint, model, provider_id,
                          upstream_model, streamed, status, error_type, prompt_tokens, completion_tokens,
                          total_tokens, cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, attempts, extra)
SELECT request_id, to_timestamp(started_at), to_timestamp(ended_at), left(subject, 255), left(username, 255),
       coalesce(left(endpoint, 64), ''), left(model, 255), left(provider_id, 255), left(upstream_model, 255),
       coalesce(streamed, false), status, left(error_type, 64), prompt_tokens, completion_tokens, total_tokens,
       cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, coalesce(attempts, 1),
       nullif(extra - 'completion', '{}'::jsonb)
FROM json_to_recordset($1::json) AS t(
    request_id text, started_at float8, ended_at float8, subject text, username text, endpoint text, model text,
    provider_id text, upstream_model text, streamed bool, status int4, error_type text, prompt_tokens int8,
    completion_tokens int8, total_tokens int8, cached_tokens int8, latency_ms float8, ttft_ms float8,
    upstream_latency_ms float8, attempts int4, extra jsonb)
ON CONFLICT (request_id) DO NOTHING
"""

# SQLite: named parameters straight from the parsed journal line (NUL characters already replaced), cut
# to the column lengths as on PostgreSQL. Timestamps become the text SQLAlchemy's SQLite DATETIME uses
# ("YYYY-MM-DD HH:MM:SS.ffffff", UTC), so that typed queries compare correctly.
_SQLITE_USAGE_INSERT = """
INSERT INTO usage_events (request_id, started_at, ended_at, subject, username, endpoint, model, provider_id,
                          upstream_model, streamed, status, error_type, prompt_tokens, completion_tokens,
                          total_tokens, cached_tokens, latency_ms, ttft_ms, upstream_latency_ms, attempts, extra)
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
        :latency_ms, :ttft_ms, :upstream_latency_ms, coalesce(:attempts, 1), :extra)
ON CONFLICT (request_id) DO NOTHING
"""

_SQLITE_COMPLETION_INSERT = """
INSERT INTO stored_completions (request_id, completion_id, created_at, subject, username, model, input_messages,
                                response)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (request_id) DO NOTHING
"""


def _sqlite_ts(ts: float) -> str:
    # The storage format SQLAlchemy's SQLite DATETIME uses, so typed queries compare correctly.
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _inserted(status: str) -> int:
    try:
        return int(status.rsplit(" ", 1)[-1])
    except ValueError:
        return 0


GROUP_KEYS: tuple[str, ...] = ("user", "model", "day", "provider", "endpoint", "status")


class UsageRepo:
    """The ledger's database access. One instance per engine."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    # -- writes ------------------------------------------------------------------------------------

    async def insert_events(self, events: Sequence[UsageEvent]) -> int:
        """Insert events (see insert_lines)."""
        return await self.insert_lines([orjson.dumps(e, default=str) for e in events])

    async def insert_lines(self, lines: Sequence[bytes]) -> int:
        """Insert a batch of journal lines (one JSON UsageEvent each) in one transaction, skipping request ids
        already stored. Returns the number of rows added. A line that is not a valid event raises an error
        for which is_row_error() is true."""
        if not lines:
            return 0
        if self.dialect == "postgresql":
            return await self._insert_pg(lines)
        return await self._insert_sqlite(lines)

    async def _insert_pg(self, lines: Sequence[bytes]) -> int:
        payload = b"[" + b",".join(lines) + b"]"
        if b"\\u0000" in payload:
            payload = _JSON_NUL_B.sub(rb"\1\\ufffd", payload)
        if b"\x00" in payload:  # raw NUL bytes are never part of a journal line (a damaged file): skip them
            payload = payload.replace(b"\x00", b"")
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            apg: Any = raw.driver_connection
            text_payload = payload.decode("utf-8", "replace")
            try:
                if b'"completion":' in payload:  # a key only stored completions have
                    return int(await apg.fetchval(_PG_INSERT, text_payload) or 0)
                return _inserted(str(await apg.execute(_PG_INSERT_USAGE, text_payload)))
            except BaseException as exc:
                if not is_row_error(exc):
                    # The connection may be broken; never hand it back to the pool.
                    await conn.invalidate()
                raise

    async def _insert_sqlite(self, lines: Sequence[bytes]) -> int:
        usage, completions = _sqlite_rows(lines)
        async with self.engine.connect() as conn:
            raw = await conn.get_raw_connection()
            db: Any = raw.driver_connection  # aiosqlite: executemany without per-row SQLAlchemy processing
            before = db.total_changes
            try:
                await db.executemany(_SQLITE_USAGE_INSERT, usage)
                added = db.total_changes - before
                if completions:
                    await db.executemany(_SQLITE_COMPLETION_INSERT, completions)
                await db.commit()
            except BaseException:
                await db.rollback()
                raise
            return int(added)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- reads -------------------------------------------------------------------------------------

    async def count_events(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(usage_events))).scalar_one())

    async def event_ids(self) -> list[str]:
        async with self.engine.connect() as conn:
            res = await conn.execute(select(usage_events.c.request_id))
            return [str(r) for r in res.scalars()]

    async def get_event(self, request_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            res = await conn.execute(select(usage_events).where(usage_events.c.request_id == request_id))
            row = res.mappings().first()
            return dict(row) if row is not None else None

    def _day(self) -> ColumnElement[str]:
        col = usage_events.c.started_at
        if self.dialect == "postgresql":
            return func.to_char(func.timezone("UTC", col), "YYYY-MM-DD")
        return func.substr(col, 1, 10)

    async def usage_report(
        self,
        *,
        since: datetime | None,
        until: datetime | None,
        group_by: Sequence[str],
        subject: str | None = None,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Aggregate usage_events by the keys of GROUP_KEYS; returns (rows, totals)."""
        t = usage_events.c
        keys: list[ColumnElement[Any]] = []
        extra: list[ColumnElement[Any]] = []
        for key in group_by:
            if key == "user":
                keys.append(t.subject.label("user"))
                extra.append(func.max(t.username).label("username"))
            elif key == "model":
                keys.append(t.model.label("model"))
            elif key == "day":
                keys.append(self._day().label("day"))
            elif key == "provider":
                keys.append(t.provider_id.label("provider"))
            elif key == "endpoint":
                keys.append(t.endpoint.label("endpoint"))
            elif key == "status":
                keys.append(t.status.label("status"))
            else:
                raise ValueError(f"unknown group key '{key}'")
        aggregates: list[ColumnElement[Any]] = [
            func.count().label("requests"),
            cast(func.coalesce(func.sum(case((t.status >= 400, 1), else_=0)), 0), BigInteger).label("errors"),
            cast(func.coalesce(func.sum(t.prompt_tokens), 0), BigInteger).label("prompt_tokens"),
            cast(func.coalesce(func.sum(t.completion_tokens), 0), BigInteger).label("completion_tokens"),
            cast(func.coalesce(func.sum(t.total_tokens), 0), BigInteger).label("total_tokens"),
            cast(func.coalesce(func.sum(t.cached_tokens), 0), BigInteger).label("cached_tokens"),
            func.avg(t.latency_ms).label("avg_latency_ms"),
            func.avg(t.ttft_ms).label("avg_ttft_ms"),
        ]
        where: list[ColumnElement[bool]] = []
        if since is not None:
            where.append(t.started_at >= since)
        if until is not None:
            where.append(t.started_at < until)
        if subject is not None:
            where.append(t.subject == subject)
        cond = and_(*where) if where else None

        grouped = select(*keys, *extra, *aggregates)
        total = select(*aggregates)
        if cond is not None:
            grouped = grouped.where(cond)
            total = total.where(cond)
        if keys:
            grouped = grouped.group_by(*keys).order_by(*keys)
        async with self.engine.connect() as conn:
            rows = [dict(r) for r in (await conn.execute(grouped)).mappings()] if keys else []
            totals = dict((await conn.execute(total)).mappings().one())
        return rows, totals

    async def list_completions(
        self,
        *,
        subject: str | None,
        limit: int,
        after: str | None = None,
        order: str = "desc",
        model: str | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """A page of stored completions visible to `subject` (None: all). Returns (rows, has_more)."""
        t = stored_completions.c
        where: list[ColumnElement[bool]] = []
        if subject is not None:
            where.append(t.subject == subject)
        if model is not None:
            where.append(t.model == model)
        async with self.engine.connect() as conn:
            if after is not None:
                anchor = (
                    await conn.execute(
                        select(t.created_at, t.request_id)
                        .where(or_(t.completion_id == after, t.request_id == after), *where)
                        .limit(1)
                    )
                ).first()
                if anchor is not None:
                    pos = tuple_(t.created_at, t.request_id)
                    where.append(pos < tuple_(anchor[0], anchor[1]) if order == "desc" else pos > tuple_(*anchor))
            q = select(stored_completions).where(*where)
            if order == "desc":
                q = q.order_by(t.created_at.desc(), t.request_id.desc())
            else:
                q = q.order_by(t.created_at.asc(), t.request_id.asc())
            rows = [dict(r) for r in (await conn.execute(q.limit(limit + 1))).mappings()]
        return rows[:limit], len(rows) > limit

    async def get_completion(self, completion_id: str, *, subject: str | None) -> dict[str, Any] | None:
        t = stored_completions.c
        q = select(stored_completions).where(or_(t.completion_id == completion_id, t.request_id == completion_id))
        if subject is not None:
            q = q.where(t.subject == subject)
        async with self.engine.connect() as conn:
            row = (await conn.execute(q.limit(1))).mappings().first()
        return dict(row) if row is not None else None


async def table_names(conn: AsyncConnection) -> list[str]:
    """Tables present in the database (for checks and tests)."""

    def _names(sync_conn: Any) -> list[str]:
        from sqlalchemy import inspect

        return list(inspect(sync_conn).get_table_names())

    return await conn.run_sync(_names)


__all__ = ["COMPLETION_COLUMNS", "GROUP_KEYS", "ID_LEN", "USAGE_COLUMNS", "UsageRepo", "event_from_line",
           "is_row_error", "table_names"]
