"""UsageLedger: journal + batched writer on real PostgreSQL and SQLite; outages, overflow, replay, rejects."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio
from sqlalchemy import text

from llm_proxy.core import usage as usage_mod
from llm_proxy.core.usage import UsageLedger, _journal_line, iter_journal
from llm_proxy.store.db import create_engine, upgrade
from llm_proxy.store.ledger_db import JOURNAL_FIELDS, event_from_line
from llm_proxy.store.repos import UsageRepo
from llm_proxy.types import UsageEvent

from ..store.dbutil import TcpRelay, create_pg_database, drop_pg_database, eventually, pg_available, pg_url


def ev(rid: str, **kw: Any) -> UsageEvent:
    now = time.time()
    base: dict[str, Any] = {
        "request_id": rid,
        "started_at": now - 0.1,
        "ended_at": now,
        "endpoint": "chat.completions",
        "status": 200,
        "subject": "alice",
        "username": "alice",
        "model": "openai/gpt-4o",
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    base.update(kw)
    return UsageEvent(**base)


@pytest_asyncio.fixture(scope="module")
async def pg_module_db() -> AsyncIterator[str | None]:
    """This module's PostgreSQL database (None when PostgreSQL is not reachable)."""
    if not await pg_available():
        yield None
        return
    name = await create_pg_database("ledger")
    engine = create_engine(pg_url(name))
    await upgrade(engine)
    await engine.dispose()
    yield name
    await drop_pg_database(name)


@pytest.fixture
def pg_name(pg_module_db: str | None) -> str:
    if pg_module_db is None:
        pytest.skip("PostgreSQL is not reachable")
    return pg_module_db


@pytest_asyncio.fixture(params=["postgresql", "sqlite"])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path, pg_module_db: str | None) -> AsyncIterator[str]:
    """An empty, migrated database: PostgreSQL (module database, emptied) or a fresh SQLite file."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"
        return
    if pg_module_db is None:
        pytest.skip("PostgreSQL is not reachable")
    url = pg_url(pg_module_db)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_events"))
        await conn.execute(text("DELETE FROM stored_completions"))
    await engine.dispose()
    yield url


@pytest_asyncio.fixture
async def relay(pg_name: str) -> AsyncIterator[TcpRelay]:
    r = TcpRelay()
    await r.start()
    engine = create_engine(pg_url(pg_name))
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_events"))
    await engine.dispose()
    yield r
    await r.close()


async def db_ids(url: str) -> list[str]:
    engine = create_engine(url)
    try:
        return await UsageRepo(engine).event_ids()
    finally:
        await engine.dispose()


def spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*") if p.is_file())


async def test_every_event_lands_once_and_the_journal_empties(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ledger = UsageLedger(db_url, spool, batch_size=100, flush_interval=0.05)
    ledger.record(ev("req_early"))  # before start(): kept in memory, written after start
    await ledger.start()
    ids = [f"req_{i}" for i in range(1000)]
    for i, rid in enumerate(ids):
        ledger.record(ev(rid))
        if i % 100 == 0:
            await asyncio.sleep(0)
    ledger.record(ev("req_5"))  # a duplicate request id is stored once
    assert await ledger.flush(20)
    h = ledger.health()
    assert h["ok"] is True and h["database"] is True and h["backlog"] == 0 and h["last_error"] is None
    assert h["written"] == 1001 and h["duplicates"] == 1
    assert h["spool_bytes"] == 0  # committed rows are cut from the journal
    await ledger.close()
    assert sorted(await db_ids(db_url)) == sorted([*ids, "req_early"])
    assert spool_files(spool) == []


async def test_queue_overflow_reads_back_from_rotating_journal(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    ledger = UsageLedger(db_url, spool, batch_size=50, queue_size=20, segment_bytes=4096, flush_interval=0.01)
    await ledger.start()
    ids = [f"req_ovf_{i}" for i in range(2000)]
    for rid in ids:  # no yield: the writer cannot keep up, the queue overflows
        ledger.record(ev(rid))
    segments = [p for p in spool_files(spool) if p.name.startswith("seg-")]
    assert len(segments) > 10  # rotated by size
    assert ledger.health()["backlog"] == 2000
    assert await ledger.flush(30)
    assert ledger.health()["spool_bytes"] == 0
    assert [p for p in spool_files(spool) if p.name.startswith("seg-")] == [segments[-1]]  # only the active one
    # after catching up the in-memory queue is used again
    ledger.record(ev("req_after"))
    assert await ledger.flush(10)
    await ledger.close()
    assert sorted(await db_ids(db_url)) == sorted([*ids, "req_after"])


async def test_repeated_overflow_with_batches_in_flight(db_url: str, tmp_path: Path) -> None:
    """Bursts overflow the queue again and again while up to two batches are being written."""
    spool = tmp_path / "spool"
    ledger = UsageLedger(db_url, spool, batch_size=16, queue_size=24, segment_bytes=2048, flush_interval=0.005,
                         concurrency=2)
    await ledger.start()
    ids: list[str] = []
    for burst in range(40):
        for i in range(burst % 7 * 13 + 1):
            rid = f"req_b{burst}_{i}"
            ids.append(rid)
            ledger.record(ev(rid))
        for _ in range(burst % 3):
            await asyncio.sleep(0)  # let the writer take, finish or not finish batches in between
    assert await ledger.flush(30)
    h = ledger.health()
    assert h["backlog"] == 0 and h["spool_bytes"] == 0 and h["duplicates"] == 0
    await ledger.close()
    got = await db_ids(db_url)
    assert len(got) == len(ids) and set(got) == set(ids)
    assert spool_files(spool) == []


async def test_database_outage_keeps_rows_and_replays_them(pg_name: str, relay: TcpRelay, tmp_path: Path) -> None:
    url = pg_url(pg_name, relay.port)
    ledger = UsageLedger(url, tmp_path / "spool", batch_size=100, queue_size=50, flush_interval=0.02)
    await ledger.start()
    ledger.record(ev("req_before"))
    assert await ledger.flush(10)
    relay.cut()
    ids = [f"req_out_{i}" for i in range(300)]
    t0 = time.perf_counter()
    for rid in ids:
        ledger.record(ev(rid))
    assert time.perf_counter() - t0 < 1.0  # record() never waits for the database
    assert not await ledger.flush(0.5)
    h = ledger.health()
    assert h["ok"] is True and h["database"] is False and h["backlog"] == 300
    assert h["spool_bytes"] > 0 and h["last_error"]
    relay.restore()
    assert await ledger.flush(20)
    h = ledger.health()
    assert h["database"] is True and h["backlog"] == 0 and h["spool_bytes"] == 0
    await ledger.close()
    assert sorted(await db_ids(pg_url(pg_name))) == sorted(["req_before", *ids])


async def test_close_while_database_is_down_leaves_journal_for_next_start(
    pg_name: str, relay: TcpRelay, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    first = UsageLedger(pg_url(pg_name, relay.port), spool, close_timeout=0.5, flush_interval=0.01)
    await first.start()
    relay.cut()
    ids = [f"req_left_{i}" for i in range(120)]
    for rid in ids:
        first.record(ev(rid))
    await first.close()  # gives up after close_timeout: rows stay in the journal
    assert [p for p in spool_files(spool) if p.name.startswith("seg-")]
    relay.restore()
    second = UsageLedger(pg_url(pg_name, relay.port), spool)
    await second.start()
    second.record(ev("req_second"))
    assert await second.flush(20)
    await second.close()
    assert sorted(await db_ids(pg_url(pg_name))) == sorted([*ids, "req_second"])
    assert spool_files(spool) == []


async def test_live_journals_are_not_adopted_dead_ones_are(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    a = UsageLedger(db_url, spool)
    b = UsageLedger(db_url, spool, orphan_scan_interval=0.05)
    await a.start()
    await b.start()
    a.record(ev("req_a"))
    b.record(ev("req_b"))
    assert await a.flush(10) and await b.flush(10)
    dirs = sorted(p.name for p in spool.iterdir() if p.is_dir())
    assert len(dirs) == 2  # each process journals into its own locked directory
    # a journal left by a dead process (here: written by hand, unlocked) is picked up by a periodic scan
    dead = spool / "ledger-99999-dead"
    dead.mkdir()
    # lines of an older version (JSON objects), of this one (arrays), garbage, then a line cut off by the kill and
    # the NUL bytes of the segment's reserved (mapped) space behind it
    lines = [orjson.dumps(ev(f"req_dead_{i}")) + b"\n" for i in range(3)]
    lines += [_journal_line(ev(f"req_dead_{i}")) for i in range(3, 5)]
    cut = _journal_line(ev("req_cut"))[:40]
    (dead / "seg-000000000000.jsonl").write_bytes(b"".join(lines) + b"not json\n" + cut + bytes(64 << 10))
    async def adopted() -> bool:
        return not dead.exists()

    await eventually(adopted, 10)
    await a.close()
    await b.close()
    ids = await db_ids(db_url)
    assert sorted(ids) == sorted(["req_a", "req_b", *(f"req_dead_{i}" for i in range(5))])
    rejected = (spool / "rejected.jsonl").read_bytes().splitlines()
    assert len(rejected) == 2  # the garbage line and the incomplete last line are kept, not dropped
    assert [p.name for p in spool.iterdir()] == ["rejected.jsonl"]


async def test_events_after_close_are_journaled_for_the_next_start(db_url: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    first = UsageLedger(db_url, spool)
    await first.start()
    await first.close()
    first.record(ev("req_late_1"))  # e.g. a request that outlived the shutdown grace period
    first.record(ev("req_late_2"))
    (late,) = [p for p in spool.iterdir() if p.name.startswith("ledger-late-")]
    # the process "exits": its lock on the late journal goes away
    os.close(first._late_fd)
    os.close(first._late_lock_fd)
    second = UsageLedger(db_url, spool)
    await second.start()
    assert await second.flush(10)

    async def adopted() -> bool:
        return not late.exists()

    await eventually(adopted, 10)
    await second.close()
    assert sorted(await db_ids(db_url)) == ["req_late_1", "req_late_2"]
    assert spool_files(spool) == []


async def test_rows_the_database_rejects_go_to_rejected_file(pg_name: str, tmp_path: Path) -> None:
    url = pg_url(pg_name)
    engine = create_engine(url)
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM usage_events"))
    await engine.dispose()
    spool = tmp_path / "spool"
    ledger = UsageLedger(url, spool, batch_size=64, flush_interval=0.01)
    await ledger.start()
    ids = [f"req_ok_{i}" for i in range(100)]
    for i, rid in enumerate(ids):
        ledger.record(ev(rid))
        if i == 40:
            ledger.record(ev("req_bad", status=2**40))  # does not fit the int4 status column
    assert await ledger.flush(20)
    h = ledger.health()
    assert h["rejected"] == 1 and h["backlog"] == 0
    await ledger.close()
    assert sorted(await db_ids(url)) == sorted(ids)
    (bad,) = [orjson.loads(x) for x in (spool / "rejected.jsonl").read_bytes().splitlines()]
    assert bad["event"]["request_id"] == "req_bad" and "error" in bad


async def test_schema_missing_until_migrated(tmp_path: Path) -> None:
    """auto_migrate off and no tables yet: rows wait (last_error says why) and land after `db upgrade`."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'later.db'}"
    ledger = UsageLedger(url, tmp_path / "spool", auto_migrate=False, flush_interval=0.01)
    await ledger.start()
    for i in range(10):
        ledger.record(ev(f"req_m{i}"))
    assert not await ledger.flush(0.5)
    h = ledger.health()
    assert h["database"] is False and "usage_events" in (h["last_error"] or "") and h["backlog"] == 10
    engine = create_engine(url)
    await upgrade(engine)
    await engine.dispose()
    assert await ledger.flush(20)
    await ledger.close()
    assert len(await db_ids(url)) == 10


def test_journal_line_round_trips_every_field() -> None:
    e = UsageEvent(
        request_id="req_rt", started_at=1.5, ended_at=2.5, endpoint="embeddings", status=429, subject="s",
        username="u", model="m", provider_id="p", upstream_model="um", streamed=True, error_type="rate_limit",
        prompt_tokens=11, completion_tokens=12, total_tokens=23, cached_tokens=5, latency_ms=3.25, ttft_ms=1.75,
        upstream_latency_ms=2.125, attempts=3, extra={"k": [1, "v"]}, groups=("team-a", "team-b"),
        client_api="openai.embeddings",
    )  # fmt: skip
    assert len({repr(getattr(e, f)) for f in JOURNAL_FIELDS}) == len(JOURNAL_FIELDS)  # all distinct: order shows
    line = _journal_line(e)
    values = [getattr(e, f) for f in JOURNAL_FIELDS]
    assert orjson.loads(line) == [list(v) if isinstance(v, tuple) else v for v in values]  # groups: an array
    assert event_from_line(line) == e
    assert event_from_line(orjson.dumps(e)) == e  # the object form of earlier versions
    # a newer version's longer line, an older version's shorter one
    assert event_from_line(line[:-2] + b',"new"]') == e
    short = orjson.dumps([getattr(e, f) for f in JOURNAL_FIELDS[:5]])
    assert event_from_line(short) == UsageEvent("req_rt", 1.5, 2.5, "embeddings", 429)


@pytest.mark.parametrize("mapped", [True, False], ids=["mapped", "pwrite"])
async def test_journal_with_and_without_a_mapping(
    mapped: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where space cannot be reserved (no posix_fallocate, a file system without it, a full disk) the journal is
    written with pwrite: same file contents, same rotation."""
    if not mapped:
        monkeypatch.setattr(usage_mod, "_CAN_MAP", False)
    url = f"sqlite+aiosqlite:///{tmp_path / 'm.db'}"
    spool = tmp_path / "spool"
    ledger = UsageLedger(url, spool, flush_interval=60, batch_size=10**6, segment_bytes=8192)
    await ledger.start()
    try:
        assert (ledger._mm is not None) is mapped
        events = [ev(f"req_m_{i}", extra={"pad": "x" * (i % 300)}) for i in range(200)]
        events.append(ev("req_big", extra={"pad": "y" * 20000}))  # larger than a segment
        events.append(ev("req_after_big"))
        for e in events:
            ledger.record(e)
        segs = sorted(p for p in spool_files(spool) if p.name.startswith("seg-"))
        assert len(segs) > 5
        closed = segs[:-1]
        assert all(p.stat().st_size <= 8192 or b"req_big" in p.read_bytes() for p in closed)
        assert all(b"\0" not in p.read_bytes() for p in closed)  # closed segments are cut to their lines
        assert [x for p in segs for x in iter_journal(p)] == events
        assert await ledger.flush(20)
        # caught up: the active segment is emptied in place; what is journaled next is all a replay would see
        (active,) = [p for p in spool_files(spool) if p.name.startswith("seg-")]
        assert list(iter_journal(active)) == [] and ledger.spool_bytes == 0
        more = [ev(f"req_more_{i}") for i in range(3)]
        for e in more:
            ledger.record(e)
        assert list(iter_journal(active)) == more
    finally:
        assert await ledger.flush(20)
        await ledger.close()
    assert len(await db_ids(url)) == len(events) + 3


async def test_large_caught_up_segment_is_kept_not_zeroed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Emptying a caught-up mapped segment in place is bounded (zeroing holds the event loop): above that the
    segment keeps its committed lines until it is full, and they no longer count as spooled."""
    monkeypatch.setattr(usage_mod, "_TRIM_BYTES", 4096)
    url = f"sqlite+aiosqlite:///{tmp_path / 'k.db'}"
    spool = tmp_path / "spool"
    ledger = UsageLedger(url, spool, flush_interval=60, segment_bytes=1 << 20)
    await ledger.start()
    try:
        events = [ev(f"req_k_{i}") for i in range(100)]
        for e in events:
            ledger.record(e)
        assert ledger.spool_bytes > 4096
        assert await ledger.flush(20)
        (active,) = [p for p in spool_files(spool) if p.name.startswith("seg-")]
        assert list(iter_journal(active)) == events  # kept
        assert ledger.spool_bytes == 0 and ledger.health()["backlog"] == 0
        more = ev("req_k_more")
        ledger.record(more)
        assert ledger.spool_bytes == len(_journal_line(more))
    finally:
        assert await ledger.flush(20)
        await ledger.close()
    assert len(await db_ids(url)) == 101


async def test_record_cost_and_journal_format(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cost.db'}"
    spool = tmp_path / "spool"
    ledger = UsageLedger(url, spool, queue_size=100_000, flush_interval=60, segment_bytes=64 << 20)
    await ledger.start()
    events = [ev(f"req_cost_{i}") for i in range(10_000)]
    t0 = time.perf_counter()
    for e in events:
        ledger.record(e)
    per_call_us = (time.perf_counter() - t0) / len(events) * 1e6
    print(f"\nrecord(): {per_call_us:.2f} us per call")
    assert per_call_us < 200  # generous: CI machines are shared; bench/RESULTS.md has the real figure
    (seg,) = [p for p in spool_files(spool) if p.name.startswith("seg-")]
    journaled = list(iter_journal(seg))
    assert journaled[0] == events[0] and len(journaled) == len(events)
    assert ledger.spool_bytes == sum(len(_journal_line(e)) for e in events)
    assert seg.read_bytes()[:1] == b"["  # positional: a JSON array per line
    await ledger.close()
    assert spool_files(spool) == []


async def test_unserialisable_values_are_sanitised_not_lost(db_url: str, tmp_path: Path) -> None:
    ledger = UsageLedger(db_url, tmp_path / "spool", flush_interval=0.01)
    await ledger.start()
    ledger.record(ev("req_big", prompt_tokens=2**70, extra={"obj": object(), 1: "non-str key"}))
    assert await ledger.flush(10)
    await ledger.close()
    engine = create_engine(db_url)
    row = await UsageRepo(engine).get_event("req_big")
    await engine.dispose()
    assert row is not None and row["prompt_tokens"] == 2**63 - 1
    assert set(row["extra"]) == {"obj", "1"}
