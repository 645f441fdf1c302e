"""UsageRepo on PostgreSQL and SQLite: idempotent batches, identical clean-up, reports, stored completions."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
import pytest_asyncio
from sqlalchemy import text

from llm_proxy.store.db import create_engine
from llm_proxy.store.repos import UsageRepo, is_row_error
from llm_proxy.types import UsageEvent

DAY = 86400.0
T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC).timestamp()


def ev(rid: str, **kw: Any) -> UsageEvent:
    base: dict[str, Any] = {
        "request_id": rid,
        "started_at": T0,
        "ended_at": T0 + 0.25,
        "endpoint": "chat.completions",
        "status": 200,
        "subject": "alice",
        "username": "alice@example.com",
        "model": "openai/gpt-4o",
        "provider_id": "openai",
        "upstream_model": "gpt-4o",
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "latency_ms": 250.0,
        "upstream_latency_ms": 240.0,
    }
    base.update(kw)
    return UsageEvent(**base)


@pytest_asyncio.fixture(scope="module")
async def repo(db_url: str) -> AsyncIterator[UsageRepo]:
    engine = create_engine(db_url)
    yield UsageRepo(engine)
    await engine.dispose()


@pytest_asyncio.fixture(autouse=True)
async def _empty(repo: UsageRepo) -> None:
    async with repo.engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_events"))
        await conn.execute(text("DELETE FROM stored_completions"))


async def test_batch_insert_is_idempotent_on_request_id(repo: UsageRepo) -> None:
    batch = [ev(f"req_{i}") for i in range(50)]
    assert await repo.insert_events(batch) == 50
    assert await repo.insert_events(batch) == 0
    # duplicates inside one batch and overlapping batches
    assert await repo.insert_events([ev("req_x"), ev("req_x"), *batch[:5]]) == 1
    assert await repo.count_events() == 51


async def test_row_round_trip_and_clean_up(repo: UsageRepo) -> None:
    completion = {
        "input_messages": [{"role": "user", "content": "hi\u0000there"}],
        "response": orjson.Fragment(b'{"id":"chatcmpl-abc","object":"chat.completion","choices":[]}'),
    }
    e = ev(
        "req_round",
        subject="bob\x00",
        model="m" * 300,
        streamed=True,
        status=499,
        error_type="client_disconnected",
        cached_tokens=3,
        ttft_ms=12.5,
        attempts=2,
        extra={"draining": True, "completion": completion},
    )
    plain = ev("req_plain", extra={})
    assert await repo.insert_events([e, plain]) == 2
    row = await repo.get_event("req_round")
    assert row is not None
    assert row["started_at"] == datetime.fromtimestamp(T0, UTC)
    assert abs((row["ended_at"] - row["started_at"]).total_seconds() - 0.25) < 1e-6
    assert row["subject"] == "bob\ufffd"
    assert row["model"] == "m" * 255
    assert (row["streamed"], row["status"], row["error_type"]) == (True, 499, "client_disconnected")
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"], row["cached_tokens"]) == (10, 5, 15, 3)
    assert (row["latency_ms"], row["ttft_ms"], row["upstream_latency_ms"], row["attempts"]) == (250.0, 12.5, 240.0, 2)
    assert row["extra"] == {"draining": True}  # the completion goes to its own table
    plain_row = await repo.get_event("req_plain")
    assert plain_row is not None and plain_row["extra"] is None and plain_row["cached_tokens"] is None

    stored = await repo.get_completion("chatcmpl-abc", subject=None)
    assert stored is not None
    assert stored["request_id"] == "req_round" and stored["subject"] == "bob\ufffd"
    assert stored["input_messages"] == [{"role": "user", "content": "hi\ufffdthere"}]
    assert stored["response"] == {"id": "chatcmpl-abc", "object": "chat.completion", "choices": []}
    assert await repo.get_completion("req_round", subject="bob\ufffd") is not None  # by request id too
    assert await repo.get_completion("chatcmpl-abc", subject="alice") is None


async def test_journal_lines_and_bad_lines(repo: UsageRepo) -> None:
    good = orjson.dumps(ev("req_line")) + b"\n"
    assert await repo.insert_lines([good]) == 1
    with pytest.raises(Exception) as ei:
        await repo.insert_lines([good, b'{"request_id": "req_broken", "started'])
    assert is_row_error(ei.value)
    with pytest.raises(Exception) as ei:
        await repo.insert_lines([b"[1, 2]"])
    assert is_row_error(ei.value)
    assert await repo.count_events() == 1


async def test_usage_report_groups_filters_and_totals(repo: UsageRepo) -> None:
    rows = [
        ev("a1", subject="alice", model="m1", prompt_tokens=1, completion_tokens=2, total_tokens=3),
        ev("a2", subject="alice", model="m1", prompt_tokens=10, completion_tokens=20, total_tokens=30, status=500),
        ev("a3", subject="alice", model="m2", started_at=T0 + DAY, ended_at=T0 + DAY + 1, cached_tokens=4),
        ev("b1", subject="bob", username="bob@example.com", model="m1", prompt_tokens=None, completion_tokens=None,
           total_tokens=None, latency_ms=None),
        ev("old", subject="bob", started_at=T0 - 30 * DAY, ended_at=T0 - 30 * DAY),
    ]
    await repo.insert_events(rows)
    since = datetime.fromtimestamp(T0 - DAY, UTC)
    data, totals = await repo.usage_report(since=since, until=None, group_by=["user", "model"])
    assert [(r["user"], r["model"], r["requests"]) for r in data] == [
        ("alice", "m1", 2), ("alice", "m2", 1), ("bob", "m1", 1)
    ]
    a_m1 = data[0]
    assert (a_m1["username"], a_m1["errors"], a_m1["prompt_tokens"], a_m1["total_tokens"]) == (
        "alice@example.com", 1, 11, 33)
    assert data[2]["total_tokens"] == 0 and data[2]["avg_latency_ms"] is None
    assert totals["requests"] == 4 and totals["total_tokens"] == 33 + 15 and totals["cached_tokens"] == 4
    assert all(type(totals[k]) is int for k in ("requests", "errors", "prompt_tokens", "total_tokens"))

    by_day, _ = await repo.usage_report(since=None, until=None, group_by=["day"], subject="alice")
    assert [(r["day"], r["requests"]) for r in by_day] == [("2025-03-10", 2), ("2025-03-11", 1)]
    until = datetime.fromtimestamp(T0 + 1, UTC)
    _, t = await repo.usage_report(since=since, until=until, group_by=[], subject="alice")
    assert t["requests"] == 2
    everything, _ = await repo.usage_report(since=None, until=None, group_by=["provider", "endpoint", "status"])
    assert sum(r["requests"] for r in everything) == 5
    with pytest.raises(ValueError):
        await repo.usage_report(since=None, until=None, group_by=["nope"])


async def test_completions_pages_per_subject(repo: UsageRepo) -> None:
    def comp(i: int, subject: str) -> UsageEvent:
        resp = {"id": f"chatcmpl-{i}", "object": "chat.completion", "model": "m", "choices": []}
        return ev(f"req_c{i}", subject=subject, started_at=T0 + i, ended_at=T0 + i + 1,
                  extra={"completion": {"input_messages": [{"role": "user", "content": str(i)}], "response": resp}})

    await repo.insert_events([comp(i, "alice" if i % 3 else "bob") for i in range(10)])
    page, more = await repo.list_completions(subject="alice", limit=4)
    assert [r["completion_id"] for r in page] == ["chatcmpl-8", "chatcmpl-7", "chatcmpl-5", "chatcmpl-4"] and more
    page2, more2 = await repo.list_completions(subject="alice", limit=4, after="chatcmpl-4")
    assert [r["completion_id"] for r in page2] == ["chatcmpl-2", "chatcmpl-1"] and not more2
    asc, _ = await repo.list_completions(subject=None, limit=3, order="asc")
    assert [r["completion_id"] for r in asc] == ["chatcmpl-0", "chatcmpl-1", "chatcmpl-2"]
    everyone, _ = await repo.list_completions(subject=None, limit=100)
    assert len(everyone) == 10


async def test_timestamps_are_utc_aware(repo: UsageRepo) -> None:
    now = time.time()
    await repo.insert_events([ev("req_now", started_at=now, ended_at=now + 1)])
    row = await repo.get_event("req_now")
    assert row is not None and row["started_at"].tzinfo is not None
    assert abs(row["started_at"].timestamp() - now) < 1e-3
    _, totals = await repo.usage_report(since=datetime.now(UTC) - timedelta(minutes=1), until=None, group_by=[])
    assert totals["requests"] == 1
