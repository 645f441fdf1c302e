"""The ledger behind the real proxy: one row per request under load, outages, /v1/usage, stored completions, CLI."""

from __future__ import annotations

import asyncio
import csv
import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio

from llm_proxy.cli import main
from llm_proxy.config import LoadedConfig
from llm_proxy.core.usage import UsageLedger
from llm_proxy.errors import ProxyError, ledger_error_type
from llm_proxy.store.db import create_engine
from llm_proxy.store.repos import UsageRepo

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .dbutil import (
    HeaderAuth,
    RelayThread,
    config_text,
    create_pg_database,
    drop_pg_database,
    eventually,
    pg_available,
    pg_url,
)

MSG: list[Any] = [{"role": "user", "content": "count my tokens please"}]


def start_proxy(loaded: LoadedConfig) -> ProxyServer:
    return ProxyServer(loaded, authenticator=HeaderAuth(), usage=UsageLedger.from_config(loaded))


@pytest.fixture(scope="module")
def proxy(emulator: Emulator, db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyServer]:
    spool = tmp_path_factory.mktemp("spool")
    loaded = native_config(config_text(emulator.base_url, db_url, spool))
    with start_proxy(loaded) as px:
        yield px


@pytest_asyncio.fixture(scope="module")
async def repo(db_url: str) -> AsyncIterator[UsageRepo]:
    engine = create_engine(db_url)
    yield UsageRepo(engine)
    await engine.dispose()


def ledger_of(px: ProxyServer) -> UsageLedger:
    usage = px.services.usage
    assert isinstance(usage, UsageLedger)
    return usage


def sdk(px: ProxyServer, user: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=px.base_url, api_key="k", max_retries=0, timeout=20, default_headers={"x-test-user": user}
    )


@dataclass
class Seen:
    """What the client observed for one request."""

    user: str
    model: str
    streamed: bool
    status: int
    error_type: str | None = None
    usage: tuple[int, int, int] | None = None


async def call(c: openai.AsyncOpenAI, user: str, model: str, *, stream: bool = False, disconnect: bool = False,
               store: bool | None = None) -> tuple[str, Seen]:
    extra: Any = {} if store is None else {"store": store}
    try:
        if not stream:
            raw = await c.chat.completions.with_raw_response.create(model=model, messages=MSG, **extra)
            comp = raw.parse()
            assert comp.usage is not None
            u = comp.usage
            return raw.headers["x-request-id"], Seen(user, model, False, 200, None,
                                                     (u.prompt_tokens, u.completion_tokens, u.total_tokens))
        raw = await c.chat.completions.with_raw_response.create(
            model=model, messages=MSG, stream=True, stream_options={"include_usage": True}
        )
        rid = raw.headers["x-request-id"]
        chunks = raw.parse()
        got: tuple[int, int, int] | None = None
        n = 0
        async for chunk in chunks:
            n += 1
            if disconnect and n == 2:
                await chunks.close()  # the client goes away mid-stream
                return rid, Seen(user, model, True, 499, "client_disconnected")
            if chunk.usage is not None:
                got = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens)
        return rid, Seen(user, model, True, 200, None, got)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        # The row keeps our closed set of error types: the client's type if it is one of them, else the status's.
        stored = ledger_error_type(ProxyError("", status=e.status_code, type=str(body.get("type"))))
        return e.response.headers["x-request-id"], Seen(user, model, stream, e.status_code, stored)


def check_row(row: dict[str, Any] | None, seen: Seen) -> None:
    assert row is not None
    upstream = {"openai/gpt-4o": "gpt-4o", "openai/gpt-4o-mini": "gpt-4o-mini", "openai/slow": "slow-model"}
    assert (row["subject"], row["username"]) == (seen.user, f"{seen.user}@example.com")
    assert (row["endpoint"], row["model"], row["provider_id"]) == ("chat.completions", seen.model, "openai")
    assert row["upstream_model"] == upstream[seen.model]
    assert (row["streamed"], row["status"], row["error_type"]) == (seen.streamed, seen.status, seen.error_type)
    if seen.usage is not None:
        assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == seen.usage
    elif seen.status == 499:
        assert row["ttft_ms"] is not None and row["ttft_ms"] > 0
    assert row["latency_ms"] > 0 and row["ended_at"] >= row["started_at"] and row["attempts"] >= 1
    if seen.streamed and seen.status == 200:
        assert row["ttft_ms"] is not None and 0 < row["ttft_ms"] <= row["latency_ms"]


async def wait_rows(repo: UsageRepo, ids: list[str], timeout: float = 20) -> None:
    want = set(ids)

    async def present() -> bool:
        return want <= set(await repo.event_ids())

    await eventually(present, timeout)


async def test_one_row_per_request_under_concurrent_load(proxy: ProxyServer, emulator: Emulator,
                                                        repo: UsageRepo) -> None:
    errors = [{"model": "gpt-4o-mini", "error": {"status": 500 if i % 2 else 429, "message": f"boom {i}"}}
              for i in range(12)]
    slow = [{"model": "slow-model", "content": " ".join(["word"] * 40), "chunk_delay_ms": 20} for _ in range(6)]
    emulator.script({"models": ["gpt-4o", "gpt-4o-mini", "slow-model"], "responses": errors + slow})
    users = ["alice", "bob", "carol"]
    clients = {u: sdk(proxy, u) for u in users}
    jobs = []
    for i in range(60):
        u = users[i % 3]
        jobs.append(call(clients[u], u, "openai/gpt-4o", stream=i % 2 == 0))
    jobs += [call(clients["bob"], "bob", "openai/gpt-4o-mini", stream=i % 3 == 0) for i in range(12)]
    jobs += [call(clients["carol"], "carol", "openai/slow", stream=True, disconnect=True) for _ in range(6)]
    results = await asyncio.gather(*jobs)
    for c in clients.values():
        await c.close()
    seen = dict(results)
    assert len(seen) == len(jobs)  # distinct request ids
    statuses = sorted(s.status for s in seen.values())
    assert statuses.count(200) == 60 and statuses.count(499) == 6 and statuses.count(500) + statuses.count(429) == 12

    await wait_rows(repo, list(seen))
    for rid, s in seen.items():
        check_row(await repo.get_event(rid), s)
    # nothing else was recorded for these requests (exactly one row each; the ledger is idempotent)
    h = proxy.lt.call(ledger_of(proxy).health)
    assert h["database"] is True and h["rejected"] == 0 and h["duplicates"] == 0


async def test_usage_report_own_rows_and_admin_view(proxy: ProxyServer, repo: UsageRepo) -> None:
    dave, erin = sdk(proxy, "dave"), sdk(proxy, "erin")
    done = await asyncio.gather(
        *[call(dave, "dave", "openai/gpt-4o") for _ in range(3)],
        call(dave, "dave", "openai/gpt-4o", stream=True),
        *[call(erin, "erin", "openai/gpt-4o") for _ in range(2)],
    )
    await dave.close()
    await erin.close()
    dave_tokens = sum(s.usage[2] for _, s in done if s.user == "dave" and s.usage)

    async with aiohttp.ClientSession(proxy.url) as http:
        async def get(user: str, query: str) -> tuple[int, Any]:
            async with http.get("/v1/usage" + query, headers={"x-test-user": user}) as r:
                return r.status, orjson.loads(await r.read())

        # no polling: the handler waits for the caller's own recent rows to be written
        status, doc = await get("dave", "?group_by=user,model,day")
        assert status == 200
        assert doc["object"] == "usage.report" and doc["scope"] == "user" and doc["user"] == "dave"
        assert doc["group_by"] == ["user", "model", "day"]
        (row,) = doc["data"]
        assert (row["user"], row["username"], row["model"]) == ("dave", "dave@example.com", "openai/gpt-4o")
        assert row["requests"] == 4 and row["total_tokens"] == dave_tokens and row["errors"] == 0
        assert len(row["day"]) == 10 and doc["totals"]["requests"] == 4
        # Cost beside tokens (gpt-4o: the genai-prices catalogue's price), none unpriced.
        assert row["cost_usd"] > 0 and row["requests_without_cost"] == 0
        assert doc["totals"]["cost_usd"] == row["cost_usd"]

        status, doc = await get("root", "?group_by=user")
        assert status == 200 and doc["scope"] == "all"
        by_user = {r["user"]: r for r in doc["data"]}
        assert by_user["dave"]["requests"] == 4 and by_user["erin"]["requests"] == 2
        assert doc["totals"]["requests"] == sum(r["requests"] for r in doc["data"])

        status, doc = await get("root", "?group_by=model&user=erin")
        assert status == 200 and doc["data"] == [doc["data"][0]] and doc["data"][0]["requests"] == 2

        status, doc = await get("dave", "?user=erin")
        assert status == 403 and doc["error"]["type"] == "permission_error"
        status, doc = await get("dave", "?group_by=user,colour")
        assert status == 400 and "colour" in doc["error"]["message"]
        status, doc = await get("dave", "?from=yesterday")
        assert status == 400
        status, doc = await get("dave", "?from=2000-01-01&to=2000-01-02")
        assert status == 200 and doc["data"] == [] and doc["totals"]["requests"] == 0


async def test_usage_report_by_group(proxy: ProxyServer, repo: UsageRepo, emulator: Emulator, db_url: str,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The row takes the principal's groups; /v1/usage and `llm-proxy usage --group-by` report by group (a request
    under each of its caller's groups), a non-admin still sees only their own rows."""
    def client(user: str, groups: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0, timeout=20,
                                  default_headers={"x-test-user": user, "x-test-groups": groups})

    ivy, jack, kim = client("ivy", "grp-red,grp-blue"), client("jack", "grp-blue"), client("kim", "")
    done = await asyncio.gather(call(ivy, "ivy", "openai/gpt-4o"), call(ivy, "ivy", "openai/gpt-4o", stream=True),
                                call(jack, "jack", "openai/gpt-4o"), call(kim, "kim", "openai/gpt-4o"))
    for c in (ivy, jack, kim):
        await c.close()
    tokens = {u: sum(s.usage[2] for _, s in done if s.user == u and s.usage) for u in ("ivy", "jack", "kim")}
    await wait_rows(repo, [rid for rid, _ in done])
    row = await repo.get_event(done[0][0])
    assert row is not None and row["groups"] == ["grp-red", "grp-blue"] and row["client_api"] == "openai.chat"
    kim_row = await repo.get_event(done[3][0])
    assert kim_row is not None and kim_row["groups"] is None  # no groups: stored as none

    async with aiohttp.ClientSession(proxy.url) as http:
        async def get(user: str, query: str) -> tuple[int, Any]:
            async with http.get("/v1/usage" + query, headers={"x-test-user": user}) as r:
                return r.status, orjson.loads(await r.read())

        status, doc = await get("ivy", "?group_by=group")
        assert status == 200 and doc["scope"] == "user" and doc["group_by"] == ["group"]
        assert {r["group"]: r["requests"] for r in doc["data"]} == {"grp-red": 2, "grp-blue": 2}
        assert all(r["total_tokens"] == tokens["ivy"] for r in doc["data"])
        assert doc["totals"]["requests"] == 2  # each row once

        status, doc = await get("kim", "?group_by=group,client_api")
        assert status == 200 and [(r["group"], r["client_api"], r["requests"]) for r in doc["data"]] == [
            (None, "openai.chat", 1)]

        status, doc = await get("root", "?group_by=group")
        assert status == 200 and doc["scope"] == "all"
        by_group = {r["group"]: r for r in doc["data"]}
        assert by_group["grp-blue"]["requests"] == 3 and by_group["grp-red"]["requests"] == 2
        assert by_group["grp-blue"]["total_tokens"] == tokens["ivy"] + tokens["jack"]
        assert by_group[None]["requests"] == doc["totals"]["requests"] - 3  # every row without groups

        status, doc = await get("jack", "?group_by=group&user=ivy")
        assert status == 403  # visibility unchanged

    cfg = tmp_path / "ops.yaml"
    cfg.write_text(config_text(emulator.base_url, db_url, tmp_path / "unused-spool"))
    capsys.readouterr()
    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--group-by", "group", "--json"]) == 0
    cli_doc = orjson.loads(capsys.readouterr().out)
    assert {r["group"]: r["requests"] for r in cli_doc["data"] if r["group"]} == {"grp-blue": 3, "grp-red": 2}
    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--group-by", "user,group", "--csv",
                                          "--user", "ivy"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted((r["user"], r["group"], r["requests"]) for r in rows) == [
        ("ivy", "grp-blue", "2"), ("ivy", "grp-red", "2")]
    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--group-by", "group", "--user",
                                          "kim"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["GROUP", "REQUESTS"] and table[2].split()[:2] == ["-", "1"]


async def test_stored_completions_list_and_get(proxy: ProxyServer) -> None:
    frank = sdk(proxy, "frank")
    stored = [await frank.chat.completions.create(model="openai/gpt-4o", messages=MSG) for _ in range(3)]
    await frank.chat.completions.create(model="openai/gpt-4o", messages=MSG, store=False)  # opted out
    streamed = await frank.chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True)
    async for _ in streamed:
        pass  # streamed completions are not stored
    await frank.close()

    async with aiohttp.ClientSession(proxy.url) as http:
        async def get(user: str, path: str) -> tuple[int, Any]:
            async with http.get(path, headers={"x-test-user": user}) as r:
                return r.status, orjson.loads(await r.read())

        status, page = await get("frank", "/v1/chat/completions?limit=2")
        assert status == 200 and page["object"] == "list" and page["has_more"] is True
        assert [c["id"] for c in page["data"]] == [stored[2].id, stored[1].id]
        status, rest = await get("frank", f"/v1/chat/completions?after={page['last_id']}")
        assert [c["id"] for c in rest["data"]] == [stored[0].id] and rest["has_more"] is False

        status, one = await get("frank", f"/v1/chat/completions/{stored[0].id}")
        assert status == 200
        assert one["input_messages"] == MSG
        assert one["choices"][0]["message"]["content"] == stored[0].choices[0].message.content
        assert stored[0].usage is not None
        assert one["model"] == "openai/gpt-4o" and one["usage"]["total_tokens"] == stored[0].usage.total_tokens

        status, _ = await get("gina", f"/v1/chat/completions/{stored[0].id}")
        assert status == 404  # someone else's completion does not exist for gina
        status, mine = await get("gina", "/v1/chat/completions")
        assert status == 200 and mine["data"] == [] and mine["first_id"] is None
        status, _ = await get("root", f"/v1/openai/v1/chat/completions/{stored[0].id}")
        assert status == 200
        status, everyone = await get("root", "/v1/chat/completions?limit=100&order=asc")
        assert {c.id for c in stored} <= {c["id"] for c in everyone["data"]}
        status, _ = await get("frank", "/v1/chat/completions?limit=0")
        assert status == 400


async def test_cli_usage_report(proxy: ProxyServer, emulator: Emulator, db_url: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    hal = sdk(proxy, "hal")
    await asyncio.gather(*[call(hal, "hal", "openai/gpt-4o") for _ in range(2)])
    await hal.close()
    assert await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ledger_of(proxy).flush(10), proxy.lt.loop))
    cfg = tmp_path / "ops.yaml"
    cfg.write_text(config_text(emulator.base_url, db_url, tmp_path / "unused-spool"))
    capsys.readouterr()

    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--since", "7d", "--by", "user,model"]) == 0
    table = capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].split() == ["USER", "USERNAME", "MODEL", "REQUESTS", "ERRORS", "PROMPT_TOKENS",
                                "COMPLETION_TOKENS", "TOTAL_TOKENS", "CACHED_TOKENS", "ESTIMATED_REQUESTS",
                                "REQUESTS_WITHOUT_TOKENS", "COST_USD", "REQUESTS_WITHOUT_COST", "AVG_LATENCY_MS",
                                "AVG_TTFT_MS"]
    (hal_line,) = [x for x in lines if x.startswith("hal ")]
    assert hal_line.split()[:4] == ["hal", "hal@example.com", "openai/gpt-4o", "2"]
    assert any(x.startswith("TOTAL") for x in lines)

    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--by", "user", "--json"]) == 0
    doc = orjson.loads(capsys.readouterr().out)
    assert doc["scope"] == "all" and {"hal", "dave", "erin"} <= {r["user"] for r in doc["data"]}
    assert doc["totals"]["requests"] == sum(r["requests"] for r in doc["data"])
    # Cost beside tokens: gpt-4o at the genai-prices catalogue's $2.50 / $10 per million tokens.
    (hal_row,) = [r for r in doc["data"] if r["user"] == "hal"]
    assert hal_row["cost_usd"] == pytest.approx(
        (hal_row["prompt_tokens"] * 2.5 + hal_row["completion_tokens"] * 10) / 1e6, rel=1e-6)

    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--by", "day,user", "--csv",
                                          "--user", "hal"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["user"], r["requests"]) for r in rows] == [("hal", "2")]

    assert await asyncio.to_thread(main, ["usage", "--config", str(cfg), "--by", "colour"]) == 2


async def test_database_outage_mid_load_loses_nothing(emulator: Emulator, tmp_path: Path) -> None:
    """PostgreSQL behind a TCP relay that is cut mid-load and restored (a database of its own)."""
    if not await pg_available():
        pytest.skip("PostgreSQL is not reachable")
    name = await create_pg_database("outage")
    relay = RelayThread()
    engine = create_engine(pg_url(name))
    repo = UsageRepo(engine)
    loaded = native_config(config_text(emulator.base_url, pg_url(name, relay.port), tmp_path / "spool"))
    try:
        with start_proxy(loaded) as px:
            ledger = ledger_of(px)
            c = sdk(px, "ivan")
            seen: dict[str, Seen] = {}

            async def wave(n: int) -> None:
                results = await asyncio.gather(*[call(c, "ivan", "openai/gpt-4o", stream=i % 2 == 1)
                                                 for i in range(n)])
                seen.update(results)

            await wave(40)
            relay.cut()
            await wave(40)  # the database is gone: clients must not notice
            async with aiohttp.ClientSession(px.url) as http, http.get("/v1/health/ready") as r:
                ready = orjson.loads(await r.read())
            assert r.status == 200  # the ledger never blocks readiness
            assert ready["checks"]["usage"]["ok"] is True
            await wave(40)
            h = px.lt.call(ledger.health)
            assert h["database"] is False and h["backlog"] > 0 and h["spool_bytes"] > 0
            relay.restore()
            await wave(20)
            await c.close()
            assert all(s.status == 200 for s in seen.values())  # 0 failed client requests
            assert await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(ledger.flush(20), px.lt.loop))
            h = px.lt.call(ledger.health)
            assert h["database"] is True and h["backlog"] == 0 and h["spool_bytes"] == 0
        await wait_rows(repo, list(seen))  # 0 missing rows
        for rid, s in seen.items():
            check_row(await repo.get_event(rid), s)
    finally:
        relay.close()
        await engine.dispose()
        await drop_pg_database(name)
