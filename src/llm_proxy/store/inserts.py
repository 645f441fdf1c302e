"""The ledger's write statements per table prefix, and batch inserts of journal lines (asyncpg, aiosqlite)."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson

from .journal_format import _LINE_DEFAULTS, JOURNAL_FIELDS, _as_array_line, line_fields

# Lengths of the text columns (store/tables.py); longer values are cut before insert.
ID_LEN = 128
NAME_LEN = 255
SHORT_LEN = 64

# A JSON "\u0000" escape not preceded by another backslash (PostgreSQL jsonb rejects NUL characters).
_JSON_NUL = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")
_JSON_NUL_B = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


# --------------------------------------------------------------------------------------------------
# Journal line -> row
# --------------------------------------------------------------------------------------------------


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
