"""Usage ledger throughput: record() cost per call and sustained rows/s into a fresh PostgreSQL database.

    .venv/bin/python bench/ledger_bench.py [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
                                           [--rows 200000] [--batch-size 1000] [--queue-size 20000]

Creates a scratch database (dropped at the end), runs the migrations, then:
  1. record():   50,000 calls on a started, warmed-up ledger (journal write + queue): mean / p50 / p99;
  2. repo:       batches of journal lines straight into insert_lines() (the database side alone), also
                 into a SQLite file for comparison;
  3. ledger:     a producer records as fast as it can in the same event loop while the background writer
                 batches into PostgreSQL (two batches in flight): rows / (time until every row is committed);
  4. spill:      the same with a small in-memory queue, so the writer reads the overflow back from the journal.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from llm_proxy.core.usage import UsageLedger
from llm_proxy.store.db import create_engine, upgrade
from llm_proxy.store.journal_format import _journal_line
from llm_proxy.store.repos import UsageRepo
from llm_proxy.types import UsageEvent

logging.getLogger("llm_proxy").setLevel(logging.ERROR)  # backlog warnings are expected here
logging.getLogger("alembic").setLevel(logging.ERROR)

MODELS = ["openai/gpt-4o", "openai/gpt-4o-mini", "vllm/llama-3.1-8b", "anthropic/claude-sonnet", "groq/llama-70b"]


def make_event(i: int, rng: random.Random) -> UsageEvent:
    now = time.time()
    p, c = rng.randint(10, 4000), rng.randint(1, 1000)
    streamed = i % 2 == 0
    return UsageEvent(
        request_id="req_" + os.urandom(12).hex(),
        started_at=now - 0.5,
        ended_at=now,
        endpoint="chat.completions",
        status=200 if i % 50 else 429,
        subject=f"user-{i % 100}",
        username=f"user{i % 100}@example.com",
        model=MODELS[i % len(MODELS)],
        provider_id=MODELS[i % len(MODELS)].split("/")[0],
        upstream_model=MODELS[i % len(MODELS)].split("/")[1],
        streamed=streamed,
        error_type=None if i % 50 else "rate_limit_error",
        prompt_tokens=p,
        completion_tokens=c,
        total_tokens=p + c,
        cached_tokens=0,
        latency_ms=rng.uniform(100, 3000),
        ttft_ms=rng.uniform(20, 300) if streamed else None,
        upstream_latency_ms=rng.uniform(90, 2900),
        attempts=1,
    )


async def bench_record(url: str, spool: Path, events: list[UsageEvent]) -> dict[str, float]:
    """Steady state: rounds of 1000 calls, the writer drains between rounds (not timed), so the process
    reuses warm memory as a long-running server does (first-touch page faults would dominate otherwise)."""
    ledger = UsageLedger(url, spool / "record", batch_size=1000)
    await ledger.start()
    for e in events[:10_000]:  # warm-up
        ledger.record(e)
    await ledger.flush(120)
    samples: list[int] = []
    pc = time.perf_counter_ns
    total = 0.0
    timed = events[10_000:]
    for i in range(0, len(timed), 1000):
        chunk = timed[i : i + 1000]
        if i % 2000 == 0:  # whole chunk timed: the mean
            t0 = time.perf_counter()
            for e in chunk:
                ledger.record(e)
            total += time.perf_counter() - t0
        else:  # each call timed: the distribution (the timer adds ~0.1 us)
            for e in chunk:
                s = pc()
                ledger.record(e)
                samples.append(pc() - s)
        await ledger.flush(120)
    await ledger.close()
    samples.sort()
    return {
        "mean_us": total / (len(timed) - len(samples)) * 1e6,
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
    }


async def bench_repo(url: str, events: list[UsageEvent], batch: int) -> float:
    engine = create_engine(url)
    repo = UsageRepo(engine)
    lines = [_journal_line(e)[:-1] for e in events]  # as the ledger queues them
    t0 = time.perf_counter()
    for i in range(0, len(lines), batch):
        await repo.insert_lines(lines[i : i + batch])
    rate = len(lines) / (time.perf_counter() - t0)
    await engine.dispose()
    return rate


def _cpu_seconds(pids: list[int]) -> float:
    """utime + stime of local processes (the PostgreSQL backends serving the bench database)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            pass
    return total / os.sysconf("SC_CLK_TCK")


async def _backend_pids(admin: asyncpg.Connection, name: str) -> list[int]:
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
    return [int(r["pid"]) for r in rows]


async def bench_ledger(
    url: str, spool: Path, events: list[UsageEvent], batch: int, queue: int, admin: asyncpg.Connection, name: str
) -> dict[str, float]:
    ledger = UsageLedger(url, spool, batch_size=batch, queue_size=queue)
    await ledger.start()
    pids = await _backend_pids(admin, name)
    pg0, py0 = _cpu_seconds(pids), time.process_time()
    t0 = time.perf_counter()
    for i in range(0, len(events), 1000):
        for e in events[i : i + 1000]:
            ledger.record(e)
        await asyncio.sleep(0)  # let the writer run, as a busy server's loop would
    produced = time.perf_counter() - t0
    ok = await ledger.flush(600)
    total = time.perf_counter() - t0
    pids = sorted(set(pids) | set(await _backend_pids(admin, name)))
    pg_cpu, py_cpu = _cpu_seconds(pids) - pg0, time.process_time() - py0
    health = ledger.health()
    await ledger.close()
    assert ok and health["written"] == len(events), health
    n = len(events)
    return {
        "rows_per_s": n / total,
        "produce_s": produced,
        "total_s": total,
        "pg_us_per_row": pg_cpu / n * 1e6,
        "py_us_per_row": py_cpu / n * 1e6,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--queue-size", type=int, default=20_000)
    args = ap.parse_args()

    rng = random.Random(7)
    name = f"llm_proxy_ledger_bench_{os.getpid()}"
    admin = await asyncpg.connect(args.admin_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    base = args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://", 1)
    url = f"{base}/{name}"
    spool = Path(tempfile.mkdtemp(prefix="ledger-bench-"))
    try:
        engine = create_engine(url)
        await upgrade(engine)
        await engine.dispose()
        n = args.rows
        print(
            f"usage ledger bench: {n} rows, batch {args.batch_size}, queue {args.queue_size}, "
            f"python {sys.version.split()[0]}, {os.cpu_count()} cpu"
        )

        rec = await bench_record(url, spool, [make_event(i, rng) for i in range(60_000)])
        print(
            f"record():        mean {rec['mean_us']:.2f} us/call  p50 {rec['p50_us']:.2f} us  "
            f"p99 {rec['p99_us']:.2f} us"
        )

        repo_rate = await bench_repo(url, [make_event(i, rng) for i in range(n // 2)], args.batch_size)
        print(f"repo only:       {repo_rate:,.0f} rows/s (insert_lines, batches of {args.batch_size})")
        sqlite_url = f"sqlite+aiosqlite:///{spool / 'ledger.db'}"
        engine = create_engine(sqlite_url)
        await upgrade(engine)
        await engine.dispose()
        sqlite_rate = await bench_repo(sqlite_url, [make_event(i, rng) for i in range(n // 4)], args.batch_size)
        print(f"repo (SQLite):   {sqlite_rate:,.0f} rows/s (the default single-node database, WAL mode)")

        r = await bench_ledger(
            url, spool / "mem", [make_event(i, rng) for i in range(n)], args.batch_size, args.queue_size, admin, name
        )
        print(
            f"ledger:          {r['rows_per_s']:,.0f} rows/s sustained end to end "
            f"(producer done after {r['produce_s']:.2f} s, all committed after {r['total_s']:.2f} s)"
        )
        print(
            f"                 cpu per row: postgres {r['pg_us_per_row']:.1f} us (all backends), this process "
            f"(producer + writer) {r['py_us_per_row']:.1f} us"
        )

        r = await bench_ledger(
            url, spool / "spill", [make_event(i, rng) for i in range(n)], args.batch_size, 1000, admin, name
        )
        print(
            f"ledger (spill):  {r['rows_per_s']:,.0f} rows/s with queue_size 1000 (writer reads the journal); "
            f"cpu per row: postgres {r['pg_us_per_row']:.1f} us, this process {r['py_us_per_row']:.1f} us"
        )
        print(f"load average at the end: {' '.join(open('/proc/loadavg').read().split()[:3])} (shared cores)")
    finally:
        shutil.rmtree(spool, ignore_errors=True)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
