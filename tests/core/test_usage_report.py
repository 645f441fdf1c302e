"""Usage report helpers: time and group_by parsing, table / CSV rendering."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from llm_proxy.core.usage_report import format_csv, format_table, parse_group_by, parse_time, report_document

NOW = datetime(2025, 5, 10, 12, 0, tzinfo=UTC)


def test_parse_time_forms() -> None:
    assert parse_time("7d", now=NOW) == NOW - timedelta(days=7)
    assert parse_time("12h", now=NOW) == NOW - timedelta(hours=12)
    assert parse_time("2w", now=NOW) == NOW - timedelta(weeks=2)
    assert parse_time("90s", now=NOW) == NOW - timedelta(seconds=90)
    assert parse_time("2025-05-01") == datetime(2025, 5, 1, tzinfo=UTC)
    assert parse_time("2025-05-01T10:00:00Z") == datetime(2025, 5, 1, 10, tzinfo=UTC)
    assert parse_time("2025-05-01T12:00:00+02:00") == datetime(2025, 5, 1, 10, tzinfo=UTC)
    assert parse_time("1746000000") == datetime.fromtimestamp(1746000000, UTC)
    with pytest.raises(ValueError, match="not a time"):
        parse_time("last tuesday")


def test_parse_group_by() -> None:
    assert parse_group_by("User, model,day,model") == ["user", "model", "day"]
    assert parse_group_by("") == [] and parse_group_by(None) == []
    with pytest.raises(ValueError, match="valid keys"):
        parse_group_by("user,tenant")


def test_table_and_csv() -> None:
    rows = [
        {"user": "alice", "username": "Alice", "model": "m1", "requests": 3, "errors": 1, "prompt_tokens": 10,
         "completion_tokens": 5, "total_tokens": 15, "cached_tokens": 0, "estimated_requests": 1,
         "requests_without_tokens": 2, "cost_usd": 0.00012345678, "requests_without_cost": 1,
         "avg_latency_ms": 12.345, "avg_ttft_ms": None},
    ]
    totals = {k: v for k, v in rows[0].items() if k not in ("user", "username", "model")}
    doc = report_document(rows, totals, group_by=["user", "model"], since=NOW, until=None, scope="all")
    assert list(doc["data"][0])[:3] == ["user", "username", "model"]
    table = format_table(doc).splitlines()
    assert table[0].split()[:4] == ["USER", "USERNAME", "MODEL", "REQUESTS"]
    assert table[2].split() == ["alice", "Alice", "m1", "3", "1", "10", "5", "15", "0", "1", "2", "0.000123", "1",
                                "12.3", "-"]
    assert table[4].split()[:2] == ["TOTAL", "3"]
    # Estimated and missing counts are said in words too, not left as silent zeros.
    assert "1 request(s) have estimated token counts: the upstream reported none" in table
    assert "2 successful request(s) have no token counts: their tokens are not in the sums" in table
    # Cost to the micro-dollar (not rounded to 0.0), and rows without a price said in words.
    assert doc["data"][0]["cost_usd"] == 0.000123
    assert "1 request(s) used tokens of a model with no price: their cost is not in the sums" in table
    csv_lines = format_csv(doc).splitlines()
    assert csv_lines[0].startswith("user,username,model,requests")
    assert csv_lines[1] == "alice,Alice,m1,3,1,10,5,15,0,1,2,0.000123,1,12.345,"
