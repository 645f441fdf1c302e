"""Reads of the ledger: usage reports, latency percentiles and stored completions (SQL and LedgerDB's methods)."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson

from .inserts import _SQLITE_TS_FORMAT, Statements

T = TypeVar("T")

# Keys of usage reports (LedgerDB.usage_report). "group" counts a row under each of its caller's groups (and a row
# without groups under null), so per-group sums can exceed the totals.
GROUP_KEYS: tuple[str, ...] = ("user", "model", "day", "provider", "endpoint", "status", "group", "client_api")

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
# Stored Responses (openai.responses, `store: true`) share the table with chat completions: their `response` is a
# Response object. The chat completion routes leave them out, the Responses ones read only them.
_IS_RESPONSE = {
    "postgresql": "(response ->> 'object') = 'response'",
    "sqlite": "json_extract(response, '$.object') = 'response'",
}
_NOT_RESPONSE = {d: f"coalesce({expr}, false) = false" for d, expr in _IS_RESPONSE.items()}
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


class LedgerReads:
    """LedgerDB's reads (GET /v1/usage, /v1/chat/completions, `llm-proxy usage`), on the connection `_run` gives."""

    dialect = ""
    sql: Statements

    async def _run(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        raise NotImplementedError

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
            conds = [_NOT_RESPONSE[self.dialect]]
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
            conds = [f"(completion_id = {q.p(completion_id)} OR request_id = {q.p(completion_id)})",
                     _NOT_RESPONSE[self.dialect]]
            if subject is not None:
                conds.append(f"subject = {q.p(subject)}")
            sql = f"SELECT {_COMPLETION_COLUMNS} FROM {self.sql.stored_completions}{q.where(conds)} LIMIT 1"  # noqa: S608
            rows = await q.fetch(conn, sql)
            return _completion(rows[0]) if rows else None

        return await self._run(run)

    async def get_response(self, response_id: str, *, subject: str) -> dict[str, Any] | None:
        """One stored Response by its id (`resp_...`), only if `subject` made it."""

        async def run(conn: Any) -> dict[str, Any] | None:
            q = _Sql(self.dialect)
            conds = [f"completion_id = {q.p(response_id)}", f"subject = {q.p(subject)}", _IS_RESPONSE[self.dialect]]
            sql = f"SELECT {_COMPLETION_COLUMNS} FROM {self.sql.stored_completions}{q.where(conds)} LIMIT 1"  # noqa: S608
            rows = await q.fetch(conn, sql)
            return _completion(rows[0]) if rows else None

        return await self._run(run)
