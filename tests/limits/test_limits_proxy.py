"""Limits through the proxy (in-process, official openai SDK as client) on a private Redis: answers' headers,
refusals, the ledger rows, a Redis that dies and comes back, a proxy restart, concurrency, prices."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import openai
import pytest

from llm_proxy.cli import main
from llm_proxy.core.usage_memory import MemoryUsageSink

from ..conftest import Emulator, basic_config
from ..helpers import ProxyServer, native_config
from .redisutil import RedisServer
from .util import client, limits_config, wait_used


@contextmanager
def limited(emulator: Emulator, limits: str) -> Iterator[tuple[ProxyServer, MemoryUsageSink]]:
    sink = MemoryUsageSink()
    with ProxyServer(native_config(limits_config(emulator.base_url, limits)), usage=sink) as px:
        yield px, sink


def _limits(store: str, rules: str, extra: str = "") -> str:
    return f"limits:\n  store: {store}\n{extra}  rules:\n{rules}"


RPM_3 = ("    - {name: user-rpm, per: user, requests_per_minute: 3}\n"
         "    - {name: user-tpm, per: user, tokens_per_minute: 1000}\n")
_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s)$|^\d+m\d+s$")


async def _wait_for(pred: object, seconds: float = 5.0) -> None:
    end = time.monotonic() + seconds
    while not pred():  # type: ignore[operator]
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)  # polling, with a deadline


async def test_headers_refusal_and_ledger_rows(emulator: Emulator, fresh_redis: RedisServer) -> None:
    with limited(emulator, _limits(fresh_redis.url, RPM_3)) as (px, sink):
        async with client(px.port, "alice") as c:
            raw = await c.chat.completions.with_raw_response.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            h = raw.headers
            assert h["x-ratelimit-limit-requests"] == "3" and h["x-ratelimit-remaining-requests"] == "2"
            assert h["x-ratelimit-limit-tokens"] == "1000" and h["x-ratelimit-remaining-tokens"] == "1000"
            assert _DURATION.match(h["x-ratelimit-reset-requests"]) and _DURATION.match(h["x-ratelimit-reset-tokens"])
            # A stream gets them on its response headers, before the first frame.
            raw = await c.chat.completions.with_raw_response.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True)
            assert raw.headers["x-ratelimit-remaining-requests"] == "1"
            async for _ in raw.parse():
                pass
            await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.RateLimitError) as info:
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            exc = info.value
            assert exc.status_code == 429 and exc.code == "rate_limit_exceeded" and "user-rpm" in exc.message
            assert 1 <= int(exc.response.headers["retry-after"]) <= 60
            assert exc.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert exc.response.headers["x-request-id"].startswith("req_")
            assert isinstance(exc.body, dict) and set(exc.body) == {"message", "type", "param", "code"}
        # Another user has their own counter.
        async with client(px.port, "bob") as other:
            await other.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
        await _wait_for(lambda: len(sink.events) == 5)
        statuses = [(e.subject, e.status, e.error_type) for e in sink.events]
        assert statuses.count(("alice", 429, "rate_limit_error")) == 1
        assert statuses.count(("alice", 200, None)) == 3 and ("bob", 200, None) in statuses
        refused = next(e for e in sink.events if e.status == 429)
        assert refused.cost_usd is None and refused.total_tokens is None
        assert all(e.cost_usd is not None and e.cost_usd > 0 for e in sink.events if e.status == 200)


def test_no_rules_no_limiter(emulator: Emulator) -> None:
    with ProxyServer(native_config(basic_config(emulator.base_url))) as px:
        # The exchange (web/exchange.py) is the one caller of the Limiter port: it reads services.limiter alone.
        assert px.services.limiter is None
        sdk = openai.OpenAI(base_url=px.base_url, api_key="x", max_retries=0)
        raw = sdk.chat.completions.with_raw_response.create(model="openai/gpt-4o",
                                                             messages=[{"role": "user", "content": "hi"}])
        assert not [k for k in raw.headers if k.lower().startswith("x-ratelimit")]


async def test_redis_down_deny_gives_503_then_recovers(emulator: Emulator, fresh_redis: RedisServer) -> None:
    with limited(emulator, _limits(fresh_redis.url, RPM_3)) as (px, sink):
        async with client(px.port, "alice") as c:
            await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            fresh_redis.stop()
            with pytest.raises(openai.InternalServerError) as info:
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert info.value.status_code == 503 and info.value.code == "limits_unavailable"
            assert px.services.readiness()["checks"]["limits"]["ok"] is False
            fresh_redis.start()  # the same port, empty
            # Recovery is automatic: the next request reconnects.
            await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            assert px.services.readiness()["checks"]["limits"]["ok"] is True
        await _wait_for(lambda: len(sink.events) == 3)
        assert [e.status for e in sink.events] == [200, 503, 200]


async def test_redis_down_allow_serves_and_logs_loudly_once(
    emulator: Emulator, fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    limits = _limits(fresh_redis.url, "    - {name: user-rpm, per: user, requests_per_minute: 2}\n",
                     "  on_store_error: allow\n")
    with limited(emulator, limits) as (px, _):
        async with client(px.port, "alice") as c:
            fresh_redis.stop()
            with caplog.at_level(logging.ERROR, logger="llm_proxy.limits"):
                for _ in range(4):  # more than the limit: nothing can be counted, so all are served
                    await c.chat.completions.create(model="openai/gpt-4o",
                                                    messages=[{"role": "user", "content": "hi"}])
            loud = [r for r in caplog.records if "serving WITHOUT limits" in r.getMessage()]
            assert len(loud) == 1  # one line per period, not one per request
            fresh_redis.start()
            for _ in range(2):
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.RateLimitError):  # counted again
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])


async def test_limits_survive_a_proxy_restart(emulator: Emulator, fresh_redis: RedisServer) -> None:
    limits = _limits(fresh_redis.url, "    - {name: user-rpm, per: user, requests_per_minute: 2}\n")
    with limited(emulator, limits) as (px, _):
        async with client(px.port, "alice") as c:
            for _ in range(2):
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with limited(emulator, limits) as (px, _):
        async with client(px.port, "alice") as c:
            with pytest.raises(openai.RateLimitError, match="user-rpm"):
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])


async def test_concurrent_requests_released_when_done(emulator: Emulator, fresh_redis: RedisServer) -> None:
    limits = _limits(fresh_redis.url, "    - {name: one-at-a-time, per: user, concurrent_requests: 1}\n")
    with limited(emulator, limits) as (px, _):
        emulator.script({"responses": [{"content": "slow", "delay_ms": 400}]})
        async with client(px.port, "alice") as c:
            first = asyncio.ensure_future(c.chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}]))
            await asyncio.to_thread(emulator.wait_until, lambda: len(emulator.server.state.requests) >= 1)
            with pytest.raises(openai.RateLimitError, match="one-at-a-time"):
                await c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            await first
            # The slot is given back when the answer is done (off the request path: polled, with a deadline).
            end = time.monotonic() + 5
            while True:
                try:
                    await c.chat.completions.create(model="openai/gpt-4o",
                                                    messages=[{"role": "user", "content": "hi"}])
                    break
                except openai.RateLimitError:
                    assert time.monotonic() < end
                    await asyncio.sleep(0.01)


async def test_unpriced_model_rows_say_null_and_start_reports_it(
    emulator: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="llm_proxy.pricing"):
        with limited(emulator, "") as (px, sink):
            async with client(px.port, "alice") as c:
                await c.chat.completions.create(model="local/unpriced", messages=[{"role": "user", "content": "a"}])
                await c.chat.completions.create(model="local/priced", messages=[{"role": "user", "content": "a"}])
            await _wait_for(lambda: len(sink.events) == 2)
    assert px.services.prices.unpriced == ["local/unpriced"]
    assert any("local/unpriced" in r.getMessage() and "no price" in r.getMessage() for r in caplog.records)
    unpriced, priced = sink.events
    assert unpriced.total_tokens and unpriced.cost_usd is None  # never $0
    assert priced.prompt_tokens is not None and priced.completion_tokens is not None
    assert priced.cost_usd == pytest.approx((priced.prompt_tokens * 1000 + priced.completion_tokens * 2000) / 1e6)


def test_limits_show_cli(emulator: Emulator, fresh_redis: RedisServer, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    limits = _limits(fresh_redis.url, RPM_3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(limits_config(emulator.base_url, limits))
    with limited(emulator, limits) as (px, _):
        sdk = openai.OpenAI(base_url=px.base_url, api_key="x", max_retries=0,
                            default_headers=client(px.port, "alice").default_headers)  # type: ignore[arg-type]
        sdk.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
        sdk2 = openai.OpenAI(base_url=px.base_url, api_key="x", max_retries=0,
                             default_headers=client(px.port, "bob").default_headers)  # type: ignore[arg-type]
        sdk2.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    capsys.readouterr()
    assert main(["limits", "show", "--config", str(cfg), "--user", "alice"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RULE", "LIMIT", "KEY", "USED", "MAX", "REMAINING", "RESET"]
    rpm = next(line.split() for line in out if line.startswith("user-rpm"))
    assert rpm[:6] == ["user-rpm", "requests_per_minute", "user=alice", "1", "3", "2"]
    assert not any("user=bob" in line for line in out)
    assert main(["limits", "show", "--config", str(cfg), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["key"] for r in rows if r["rule"] == "user-rpm"} == {"user=alice", "user=bob"}
    tpm = next(r for r in rows if r["rule"] == "user-tpm" and r["key"] == "user=alice")
    assert tpm["used"] > 0 and tpm["max"] == 1000


async def test_a_stream_cut_short_is_charged_an_estimate(emulator: Emulator, fresh_redis: RedisServer,
                                                         tmp_path: Path) -> None:
    limits = _limits(fresh_redis.url, "    - {name: user-tokens, per: user, tokens_per_day: 100000}\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(limits_config(emulator.base_url, limits))
    words = " ".join(f"word{i}" for i in range(400))
    emulator.script({"responses": [{"content": words, "chunks": 200, "chunk_delay_ms": 20}]})
    with limited(emulator, limits) as (px, _):
        async with client(px.port, "alice") as c:
            stream = await c.chat.completions.create(
                model="openai/gpt-4o", messages=[{"role": "user", "content": "tell me everything"}], stream=True,
                stream_options={"include_usage": True})
            got = 0
            async for chunk in stream:
                got += bool(chunk.choices and chunk.choices[0].delta.content)
                if got >= 5:
                    break
            await stream.close()  # the client leaves: no usage ever comes from the upstream
        # The prompt and the part relayed are charged (estimated), not nothing.
        used = await wait_used(cfg, "user-tokens", 10)
        assert used < 400  # far less than the whole answer would have cost
