"""Three `llm-proxy serve` processes on one Redis and one PostgreSQL ledger: limits exact across replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import openai
import pytest

from ..conftest import Emulator
from ..store.dbutil import PG_ADMIN_DSN, create_pg_database, drop_pg_database, pg_available, pg_url
from ..test_shutdown import Proc
from .redisutil import RedisServer
from .util import client, counters, limits_config, wait_used

LIMITS = """
limits:
  store: {redis}
  rules:
    - {{name: user-rpm, per: user, requests_per_minute: 20}}
    - {{name: bob-tokens, per: user, match: {{subjects: [bob]}}, tokens_per_day: 100}}
    - {{name: team-usd, per: group, match: {{groups: [team-a]}}, usd_per_month: 0.5}}
"""


@pytest.fixture
def pg_db() -> Iterator[str]:
    if not asyncio.run(pg_available()):
        pytest.skip("PostgreSQL is not reachable")
    name = asyncio.run(create_pg_database("limits"))
    yield name
    asyncio.run(drop_pg_database(name))


@pytest.fixture
def replicas(pg_db: str, emulator: Emulator, fresh_redis: RedisServer, tmp_path: Path) -> Iterator[list[Proc]]:
    procs = []
    try:
        for i in range(3):
            cfg = tmp_path / f"p{i}.yaml"
            cfg.write_text(limits_config(emulator.base_url, LIMITS.format(redis=fresh_redis.url),
                                         db_url=pg_url(pg_db), spool=str(tmp_path / f"spool{i}")))
            procs.append(Proc(cfg))
            procs[-1].cfg = cfg  # type: ignore[attr-defined]
        for p in procs:
            assert p.listening.wait(60), "".join(p.raw)
        yield procs
    finally:
        for p in procs:
            p.kill()


async def _rows(db: str, expect: int, deadline: float = 15.0) -> list[asyncpg.Record]:
    dsn = PG_ADMIN_DSN.rsplit("/", 1)[0] + "/" + db
    conn = await asyncpg.connect(dsn)
    try:
        end = time.monotonic() + deadline
        while True:
            try:
                rows = await conn.fetch("SELECT subject, model, status, error_type, total_tokens, cost_usd "
                                        "FROM usage_events ORDER BY started_at")
            except asyncpg.UndefinedTableError:
                rows = []
            if len(rows) >= expect or time.monotonic() > end:
                return rows
            await asyncio.sleep(0.05)  # polling the ledger's flush, with a deadline
    finally:
        await conn.close()


async def test_three_replicas_hold_20_requests_per_minute_exactly(replicas: list[Proc], pg_db: str) -> None:
    clients = [client(p.port, "alice") for p in replicas]

    async def one(i: int) -> int | str:
        try:
            await clients[i % 3].chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": f"n{i}"}])
            return 200
        except openai.RateLimitError as exc:
            return f"{exc.code}: {exc.message}"

    results = await asyncio.gather(*[one(i) for i in range(40)])
    for c in clients:
        await c.close()
    ok = [r for r in results if r == 200]
    refused = [r for r in results if r != 200]
    assert len(ok) == 20, results
    assert len(refused) == 20 and all("user-rpm" in str(r) and "rate_limit_exceeded" in str(r) for r in refused)

    rows = await _rows(pg_db, 40)
    assert len(rows) == 40
    assert sorted(r["status"] for r in rows) == [200] * 20 + [429] * 20
    assert {r["error_type"] for r in rows if r["status"] == 429} == {"rate_limit_error"}
    # gpt-4o is in the genai-prices catalogue: every answered row has its cost; refused rows used nothing.
    assert all(r["cost_usd"] is not None and r["cost_usd"] > 0 for r in rows if r["status"] == 200)
    assert all(r["cost_usd"] is None for r in rows if r["status"] == 429)


async def _until_refused(c: openai.AsyncOpenAI, model: str, limit: int = 20) -> tuple[int, openai.RateLimitError]:
    """Requests on one replica until it refuses; returns how many were answered and the refusal."""
    for n in range(limit):
        try:
            await c.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        except openai.RateLimitError as exc:
            return n, exc
    raise AssertionError(f"no refusal after {limit} requests")


async def test_tokens_and_dollars_are_charged_after_the_fact_across_replicas(
    replicas: list[Proc], emulator: Emulator
) -> None:
    # 60 tokens an answer against bob's 100 a day: two answers are served (0 < 100, 60 < 100), then none, on
    # whichever replica, once the second answer's tokens have been charged.
    emulator.script({"reset": True, "responses": [
        {"content": "x", "usage": {"prompt_tokens": 30, "completion_tokens": 30}} for _ in range(6)]})
    cfg = replicas[0].cfg  # type: ignore[attr-defined]
    a, b, c = (client(p.port, "bob") for p in replicas)
    try:
        await a.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "1"}])
        # Charges are made after the answer, off the request path: wait for this one to land.
        assert await wait_used(cfg, "bob-tokens", 60) == 60
        stream = await b.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "2"}],
                                                 stream=True, stream_options={"include_usage": True})
        async for _ in stream:
            pass
        assert await wait_used(cfg, "bob-tokens", 120) == 120  # a stream is charged too (60 < 100 admitted it)
        answered, exc = await _until_refused(c, "openai/gpt-4o")
        assert answered == 0
        assert "bob-tokens" in str(exc) and int(exc.response.headers["retry-after"]) >= 1
        with pytest.raises(openai.RateLimitError, match="bob-tokens"):
            await a.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "3"}])
    finally:
        for x in (a, b, c):
            await x.close()

    # $0.50 a month for team-a on local/priced ($1000 / $2000 per million): 100 + 100 tokens = $0.30 an answer.
    emulator.script({"reset": True, "responses": [
        {"content": "x", "usage": {"prompt_tokens": 100, "completion_tokens": 100}} for _ in range(6)]})
    x, y = client(replicas[0].port, "carol", "team-a"), client(replicas[1].port, "dan", "team-a")
    try:
        await x.chat.completions.create(model="local/priced", messages=[{"role": "user", "content": "1"}])
        assert await wait_used(cfg, "team-usd", 0.3) == pytest.approx(0.3)
        # $0.30 < $0.50: one more (the charge lands after the answer, off the request path: waited for) ...
        await y.chat.completions.create(model="local/priced", messages=[{"role": "user", "content": "2"}])
        assert await wait_used(cfg, "team-usd", 0.6) == pytest.approx(0.6)
        answered, exc = await _until_refused(y, "local/priced")
        assert answered == 0  # ... $0.60 >= $0.50: refused
        body = exc.body
        assert isinstance(body, dict) and body.get("code") == "budget_exceeded" and "team-usd" in body["message"]
        assert body.get("type") == "insufficient_quota"
        # A user outside the group is not held by the group's budget.
        async with client(replicas[2].port, "erin") as other:
            await other.chat.completions.create(model="local/priced", messages=[{"role": "user", "content": "1"}])
    finally:
        await x.close()
        await y.close()
    shown = {(r["rule"], r["key"]): r for r in await counters(cfg)}
    assert shown[("team-usd", "group=team-a")]["max"] == 0.5
    assert shown[("bob-tokens", "user=bob")]["used"] == 120 and shown[("bob-tokens", "user=bob")]["remaining"] == 0
