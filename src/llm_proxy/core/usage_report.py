"""Usage report parameters and output: time ranges, group keys, and table / CSV / JSON rendering."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from ..store.reads import GROUP_KEYS

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

METRICS: tuple[str, ...] = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    # Rows whose counts are estimates (the upstream reported none), and successful rows with no counts at
    # all (their tokens are missing from the sums, not zero).
    "estimated_requests",
    "requests_without_tokens",
    # USD (core/pricing.py): the sum over the rows that have a cost; rows with tokens but no price (a model
    # missing from the catalogue and the config) are counted beside it, their cost unknown, not zero.
    "cost_usd",
    "requests_without_cost",
    "avg_latency_ms",
    "avg_ttft_ms",
)


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """A point in time: `7d`/`12h`/`30m`/`2w`/`90s` ago, an ISO 8601 date or datetime, or unix seconds."""
    now = now or datetime.now(UTC)
    raw = value.strip()
    m = _DURATION.match(raw)
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNITS[m.group(2).lower()])
    try:
        return datetime.fromtimestamp(float(raw), UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        raise ValueError(
            f"'{value}' is not a time: use e.g. 7d, 12h, 2024-05-01, 2024-05-01T12:00:00Z or unix seconds"
        ) from None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def parse_group_by(value: str | None) -> list[str]:
    """`user,model,day` -> ['user', 'model', 'day']; raises ValueError naming the valid keys."""
    keys: list[str] = []
    for part in (value or "").split(","):
        key = part.strip().lower()
        if not key:
            continue
        if key not in GROUP_KEYS:
            raise ValueError(f"unknown group_by key '{key}'; valid keys: {', '.join(GROUP_KEYS)}")
        if key not in keys:
            keys.append(key)
    return keys


def columns(group_by: Sequence[str]) -> list[str]:
    out: list[str] = []
    for key in group_by:
        out.append(key)
        if key == "user":
            out.append("username")
    return out + list(METRICS)


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "cost_usd":
            v = None if v is None else round(float(v), 6)
        elif isinstance(v, float):
            v = round(v, 3)
        elif v is not None and not isinstance(v, str | int | bool):
            v = float(v) if k.startswith("avg_") else int(v)  # Decimal from some drivers
        out[k] = v
    return out


def report_document(
    rows: Sequence[Mapping[str, Any]],
    totals: Mapping[str, Any],
    *,
    group_by: Sequence[str],
    since: datetime | None,
    until: datetime | None,
    scope: str,
) -> dict[str, Any]:
    """The JSON shape shared by GET /v1/usage and `llm-proxy usage --json`."""
    cols = columns(group_by)
    return {
        "object": "usage.report",
        "from": since.isoformat() if since else None,
        "to": until.isoformat() if until else None,
        "group_by": list(group_by),
        "scope": scope,
        "data": [_ordered(_clean(r), cols) for r in rows],
        "totals": _clean(totals),
    }


def _ordered(row: dict[str, Any], cols: Sequence[str]) -> dict[str, Any]:
    out = {c: row[c] for c in cols if c in row}
    out.update((k, v) for k, v in row.items() if k not in out)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _cells(row: Mapping[str, Any], cols: Sequence[str]) -> list[str]:
    return [f"{row[c]:.6f}" if c == "cost_usd" and row.get(c) is not None else _cell(row.get(c)) for c in cols]


def format_table(doc: Mapping[str, Any]) -> str:
    """A fixed-width text table with a TOTAL line, for operators."""
    group_by = list(doc["group_by"])
    cols = columns(group_by)
    body = [_cells(r, cols) for r in doc["data"]]
    totals = doc["totals"]
    total_line = ["TOTAL" if i == 0 else "" for i in range(len(cols) - len(METRICS))]
    total_line += _cells(totals, METRICS)
    header = [c.upper() for c in cols]
    widths = [max(len(x[i]) for x in [header, total_line, *body]) for i in range(len(cols))]
    numeric = set(METRICS)

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if cols[i] in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                                  strict=True))]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in body]
    out.append("  ".join("-" * w for w in widths))
    out.append(line(total_line))
    since, until = doc.get("from"), doc.get("to")
    out.append(f"(from {since or 'the beginning'} to {until or 'now'})")
    estimated, missing = totals.get("estimated_requests") or 0, totals.get("requests_without_tokens") or 0
    if estimated:
        out.append(f"{estimated} request(s) have estimated token counts: the upstream reported none")
    if missing:
        out.append(f"{missing} successful request(s) have no token counts: their tokens are not in the sums")
    unpriced = totals.get("requests_without_cost") or 0
    if unpriced:
        out.append(f"{unpriced} request(s) used tokens of a model with no price: their cost is not in the sums")
    return "\n".join(out) + "\n"


def format_csv(doc: Mapping[str, Any]) -> str:
    cols = columns(doc["group_by"])
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in doc["data"]:
        w.writerow(["" if r.get(c) is None else r.get(c) for c in cols])
    return buf.getvalue()


async def fetch_report(
    database_url: str,
    *,
    since: datetime | None,
    until: datetime | None,
    group_by: Sequence[str],
    subject: str | None = None,
    table_prefix: str = "",
) -> dict[str, Any]:
    """Run one report against the database at `database_url` (for the CLI; the server uses its ledger)."""
    from ..store.connect import open_ledger_db

    db = open_ledger_db(database_url, connections=1, table_prefix=table_prefix)
    try:
        rows, totals = await db.usage_report(since=since, until=until, group_by=group_by, subject=subject)
    finally:
        await db.close()
    doc = report_document(
        rows, totals, group_by=group_by, since=since, until=until, scope="all" if subject is None else "user"
    )
    if subject is not None:
        doc["user"] = subject
    return doc
