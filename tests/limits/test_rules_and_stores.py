"""Rules -> counters, the windows of both stores (memory, and Redis's Lua scripts), prices, config checks."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from llm_proxy.config import LimitRule, LimitsSettings
from llm_proxy.core.limits import (
    MemoryLimitStore,
    RuleLimiter,
    StoreUnavailable,
    period,
    reset_text,
    rule_checks,
    rule_keys,
)
from llm_proxy.core.pricing import PriceTable, catalogue_price
from llm_proxy.errors import ConfigError
from llm_proxy.store.redis_limits import RedisLimitStore
from llm_proxy.types import Principal, Usage

from ..helpers import native_config
from .redisutil import RedisServer

ALICE = Principal(subject="alice", groups=("contractors", "team-a"))
KEY = Principal(subject="apikey:k1", auth_method="api_key")


def _rule(**kw: object) -> LimitRule:
    return LimitRule.model_validate({"name": "r", **kw})


def test_rule_keys_per_dimension_and_match() -> None:
    assert rule_keys(_rule(per="user"), ALICE, "m") == ["user=alice"]
    assert rule_keys(_rule(per="global"), ALICE, "m") == ["global=*"]
    assert rule_keys(_rule(per=["user", "model"]), ALICE, "m") == ["user=alice|model=m"]
    # A user in two groups has a counter in each; a rule matching one group counts that group only.
    assert rule_keys(_rule(per="group"), ALICE, "m") == ["group=contractors", "group=team-a"]
    assert rule_keys(_rule(per="group", match={"groups": ["team-a"]}), ALICE, "m") == ["group=team-a"]
    assert rule_keys(_rule(per="user", match={"groups": ["staff"]}), ALICE, "m") == []
    assert rule_keys(_rule(per="group"), Principal(subject="nogroups"), "m") == []
    assert rule_keys(_rule(per="api_key"), ALICE, "m") == [] and rule_keys(_rule(per="api_key"), KEY, "m") == [
        "api_key=apikey:k1"]
    assert rule_keys(_rule(per="user", models=["openai/*"]), ALICE, "local/x") == []


def _checks(**kw: object) -> list:  # type: ignore[type-arg]
    rule = _rule(per="user", **kw)
    return rule_checks(rule, rule_keys(rule, ALICE, "m"), 900.0)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> object:
    if request.param == "memory":
        return MemoryLimitStore()
    server: RedisServer = request.getfixturevalue("fresh_redis")
    return RedisLimitStore(server.url, "t:")


async def test_request_rate_is_gcra(store: MemoryLimitStore | RedisLimitStore) -> None:
    """4 a second (one every 0.25 s): 4 at once, the fifth refused until one interval has passed, then exactly one
    more (not a window's worth: nothing resets at a boundary)."""
    checks = _checks(requests_per_second=4)
    try:
        for i in range(4):
            refused, counts = await store.admit(checks, f"a{i}", 0)
            assert refused == 0 and counts[0].used == i + 1
        refused, counts = await store.admit(checks, "b", 0)
        assert refused == 1 and counts[0].used == 4 and 0 < counts[0].reset <= 0.25
        if isinstance(store, MemoryLimitStore):  # explicit clocks; Redis uses its own: waited below
            assert (await store.admit(checks, "c", 0.2))[0] == 1
            assert (await store.admit(checks, "d", 0.26))[0] == 0
            assert (await store.admit(checks, "e", 0.26))[0] == 1
            return
        await asyncio.sleep(counts[0].reset + 0.02)  # Redis's clock: the interval is real time there
        assert (await store.admit(checks, "d", 0))[0] == 0
        refused, counts = await store.admit(checks, "e", 0)
        assert refused == 1 and counts[0].reset > 0.15  # the next slot is a whole interval away again
    finally:
        await store.close()


async def test_no_double_burst_at_a_window_boundary() -> None:
    """A fixed one-second window lets 2 through just before its end and 2 more just after; GCRA does not: the
    limit at once, then the rate."""
    store = MemoryLimitStore()
    checks = _checks(requests_per_second=2)
    assert [(await store.admit(checks, t, 0.99))[0] for t in "ab"] == [0, 0]
    assert (await store.admit(checks, "c", 1.0))[0] == 1  # a fixed window would start again here
    assert (await store.admit(checks, "d", 1.48))[0] == 1
    assert [(await store.admit(checks, t, 1.5))[0] for t in "ef"] == [0, 1]  # one interval on: one more
    # Asked every 10 ms from then on: one every 0.5 s (at 1.99, 2.49, 2.99), so 6 in [0.99, 3.0): in any stretch
    # of t seconds at most limit + t * rate (2 + 2.01 * 2) get in.
    got = [i for i in range(1, 150) if (await store.admit(checks, f"x{i}", 1.5 + i / 100))[0] == 0]
    assert got == [49, 99, 149]


async def test_an_odd_limit_is_exact(store: MemoryLimitStore | RedisLimitStore) -> None:
    """7 a minute (an interval of 8571428.57 µs, rounded up): exactly 7 at once, in both stores."""
    checks = _checks(requests_per_minute=7)
    try:
        results = [(await store.admit(checks, f"r{i}", 0))[0] for i in range(9)]
        assert results == [0] * 7 + [1, 1]
        assert [c.used for c in await store.read(checks, 0)] == [7]
    finally:
        await store.close()


async def test_redis_request_rate_exact_across_clients_over_time(fresh_redis: RedisServer) -> None:
    """Three clients (as three replicas) hammering a 10-a-second rate for about half a second: never more than
    10 + the intervals that passed on Redis's clock (and the freed slots are taken)."""
    checks = _checks(requests_per_second=10)
    stores = [RedisLimitStore(fresh_redis.url, "t:") for _ in range(3)]
    r = fresh_redis.client()
    admitted = 0
    try:
        await asyncio.gather(*[s.read(checks, 0) for s in stores])  # connected
        sec, us = r.time()
        t0 = sec + us / 1e6

        async def hammer(s: RedisLimitStore, who: int) -> None:
            nonlocal admitted
            for i in range(400):
                refused, _ = await s.admit(checks, f"{who}-{i}", 0)
                admitted += refused == 0
                if i % 8 == 7:
                    await asyncio.sleep(0.005)

        await asyncio.gather(*[hammer(s, i) for i, s in enumerate(stores)])
        sec, us = r.time()
        elapsed = sec + us / 1e6 - t0
        assert elapsed > 0.3
        assert admitted <= 10 + int(elapsed / 0.1) + 1
        assert admitted >= 10 + int(elapsed / 0.1) - 2
    finally:
        for s in stores:
            await s.close()
        r.close()


async def test_redis_takes_over_an_older_versions_request_log(fresh_redis: RedisServer) -> None:
    """A request log (sorted set) left by a version before GCRA: its requests in the window still count."""
    checks = _checks(requests_per_minute=3)
    r = fresh_redis.client()
    sec, _ = r.time()
    r.zadd("t:" + checks[0].key, {"old1": sec * 1000 - 1000, "old2": sec * 1000 - 500, "gone": sec * 1000 - 61_000})
    store = RedisLimitStore(fresh_redis.url, "t:")
    try:
        assert [c.used for c in await store.read(checks, 0)] == [2]
        refused, counts = await store.admit(checks, "new", 0)
        assert refused == 0 and counts[0].used == 3
        assert (await store.admit(checks, "next", 0))[0] == 1
        assert r.type("t:" + checks[0].key) == b"string"
    finally:
        await store.close()
        r.close()


async def test_tokens_and_usd_are_charged_after_and_admit_while_below(
    store: MemoryLimitStore | RedisLimitStore,
) -> None:
    now = datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    checks = _checks(tokens_per_day=100, usd_per_month=1.0)
    try:
        assert (await store.admit(checks, "a", now))[0] == 0
        await store.settle(checks, "a", 99, 999_999, now)  # 99 tokens, $0.999999
        refused, counts = await store.admit(checks, "b", now)
        assert refused == 0 and [c.used for c in counts] == [99, 999_999]  # below both: admitted
        await store.settle(checks, "b", 50, 1, now)
        refused, counts = await store.admit(checks, "c", now)
        assert refused == 1 and counts[0].used == 149 and counts[0].reset == pytest.approx(3600, abs=1)
        # A new day and a new month (UTC): both counters start again.
        assert (await store.admit(checks, "d", now + 3601))[0] == 0
    finally:
        await store.close()


async def test_redis_concurrency_slots_of_a_dead_replica_expire(fresh_redis: RedisServer) -> None:
    rule = _rule(per="user", concurrent_requests=1)
    checks = rule_checks(rule, rule_keys(rule, ALICE, "m"), 0.3)  # a 0.3 s lease
    store = RedisLimitStore(fresh_redis.url, "t:")
    try:
        assert (await store.admit(checks, "crashed", 0))[0] == 0  # never settled: its replica died
        assert (await store.admit(checks, "b", 0))[0] == 1
        await asyncio.sleep(0.35)  # the lease running out is the point
        assert (await store.admit(checks, "c", 0))[0] == 0
        await store.settle(checks, "c", 0, 0, 0)
        assert (await store.admit(checks, "d", 0))[0] == 0
    finally:
        await store.close()


async def test_redis_settles_a_batch_in_one_call_per_rule_set_and_day(fresh_redis: RedisServer) -> None:
    """Charges of one batch to the same counters are summed into one script call (the same day); a day's boundary
    and a concurrency slot each keep their own; every counter ends exact."""
    now = datetime(2026, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC).timestamp()  # 1 ms before a new day and month
    tokens = tuple(_checks(tokens_per_day=10_000, usd_per_month=100.0, tokens_per_minute=10_000))
    slots = tuple(_checks(concurrent_requests=5))
    store = RedisLimitStore(fresh_redis.url, "t:")
    r = fresh_redis.client()
    try:
        for tok in ("s1", "s2"):
            assert (await store.admit(slots, tok, now))[0] == 0
        await store.settle_many([(tokens, "warm", 0, 0, now)])  # (nothing to charge: no call)
        await store.settle_many([(slots, "warm", 0, 0, now)])  # (the script is in Redis's cache from here on)
        r.config_resetstat()
        await store.settle_many([(tokens, f"t{i}", 10 * i, i, now) for i in range(1, 6)]
                                + [(slots, "s1", 0, 0, now), (slots, "s2", 0, 0, now)]
                                + [(tokens, "t-next-day", 7, 3, now + 0.002), (tokens, "t-none", -5, 0, now)])
        calls = int(r.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))
        assert calls == 4  # the five (and the zero one) at once, the next day's apart, one per slot
        # (tokens per minute: Redis's clock, one window; tokens per day, USD per month: the caller's periods)
        assert [c.used for c in await store.read(list(tokens), now)] == [157, 150, 15]
        assert [c.used for c in await store.read(list(tokens), now + 0.002)] == [157, 7, 3]
        assert [c.used for c in await store.read(list(slots), now)] == [0]  # both slots given back
    finally:
        await store.close()
        r.close()


async def test_redis_admit_is_atomic_under_concurrency(fresh_redis: RedisServer) -> None:
    """Three clients (as three replicas) racing: exactly the limit gets in."""
    checks = _checks(requests_per_minute=20, tokens_per_minute=10_000)
    stores = [RedisLimitStore(fresh_redis.url, "t:") for _ in range(3)]
    try:
        results = await asyncio.gather(*[stores[i % 3].admit(checks, f"r{i}", 0) for i in range(60)])
        assert sum(1 for refused, _ in results if refused == 0) == 20
    finally:
        for s in stores:
            await s.close()


async def test_redis_url_with_password_and_database() -> None:
    server = RedisServer(password="pw-secret")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        checks = _checks(requests_per_minute=1)
        good = RedisLimitStore(f"redis://:pw-secret@127.0.0.1:{server.port}/3", "t:")
        assert (await good.admit(checks, "a", 0))[0] == 0
        assert (await good.admit(checks, "b", 0))[0] == 1
        await good.close()
        with server.client() as c:
            c.select(3)
            assert c.exists("t:" + checks[0].key)  # in database 3
        bad = RedisLimitStore(f"redis://:wrong@127.0.0.1:{server.port}/0", "t:")
        with pytest.raises(StoreUnavailable, match="refused the connection setup") as info:
            await bad.admit(checks, "c", 0)
        assert "wrong" not in str(info.value)
        await bad.close()
    finally:
        server.stop()


def test_periods_and_reset_text() -> None:
    dec31 = datetime(2026, 12, 31, 12, tzinfo=UTC).timestamp()
    assert period("day", dec31) == ("20261231", datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert period("month", dec31) == ("202612", datetime(2027, 1, 1, tzinfo=UTC).timestamp())
    assert period("month", datetime(2026, 2, 3, tzinfo=UTC).timestamp())[1] == datetime(
        2026, 3, 1, tzinfo=UTC).timestamp()
    assert [reset_text(x) for x in (0.02, 1.5, 59.9994, 360, 3723)] == ["20ms", "1.5s", "59.999s", "6m0s", "1h2m3s"]


async def test_memory_limiter_headers_pick_the_most_constraining_rule() -> None:
    settings = LimitsSettings.model_validate({"rules": [
        {"name": "wide", "per": "global", "requests_per_minute": 100},
        {"name": "tight", "per": "user", "requests_per_minute": 5, "tokens_per_minute": 50},
        {"name": "other", "per": "user", "match": {"groups": ["staff"]}, "requests_per_minute": 1},
    ]})
    limiter = RuleLimiter(settings, MemoryLimitStore())
    ticket = await limiter.admit(ALICE, "m", "chat.completions", "r1")
    assert ticket is not None
    h = ticket.headers
    assert h["x-ratelimit-limit-requests"] == "5" and h["x-ratelimit-remaining-requests"] == "4"
    assert ticket.headers["x-ratelimit-limit-tokens"] == "50"
    assert [c.rule for c in ticket.checks] == ["tight"]  # the ones settle() charges (tokens)
    # No rule matching: nothing to track.
    settings2 = LimitsSettings.model_validate({"rules": [{"name": "s", "match": {"groups": ["staff"]},
                                                         "requests_per_minute": 1}]})
    assert await RuleLimiter(settings2, MemoryLimitStore()).admit(ALICE, "m", "chat.completions", "r") is None


def test_config_problems() -> None:
    base = "providers: []\nauth: {mode: none, allow_unauthenticated: true}\n"
    with pytest.raises(ConfigError) as info:
        native_config(base + """limits:
  store: mysql://x
  rules:
    - {name: a, per: user}
    - {name: a, per: [user, user], requests_per_minute: 1}
""")
    text = "\n".join(info.value.problems)
    assert "limits.store" in text and "no limit set" in text and "duplicate rule name 'a'" in text
    assert "at most once" in text
    with pytest.raises(ConfigError) as info:
        native_config(base + "limits:\n  store: 'redis://:s3cr3t@h:port/x'\n"
                      "  rules: [{name: a, requests_per_minute: 1}]\n")
    assert "not a usable Redis URL" in str(info.value) and "s3cr3t" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        native_config(base + "limits:\n  rules:\n    - {name: 'bad name', requests_per_minute: 0}\n")
    text = "\n".join(info.value.problems)
    assert "limits.rules.0.name" in text and "limits.rules.0.requests_per_minute" in text


def test_prices_catalogue_config_and_none() -> None:
    loaded = native_config("""
providers:
  - {id: openai, type: openai, api_key: sk-x}
  - {id: local, type: openai_compat, base_url: "http://127.0.0.1:9/v1"}
models:
  - {id: a, provider: openai, upstream_model: gpt-4o}
  - {id: b, provider: local, upstream_model: my-model, price: {input_per_million: 1, output_per_million: 3,
     cached_input_per_million: 0.5}}
  - {id: c, provider: local, upstream_model: my-other-model}
auth: {mode: none, allow_unauthenticated: true}
""")
    table = PriceTable(loaded.settings)
    assert table.unpriced == ["c"]
    gpt = table.get("openai", "gpt-4o")
    assert gpt is not None and gpt.source == "genai-prices"
    assert table.cost("openai", "gpt-4o", Usage(1_000_000, 1_000_000, 2_000_000)) == pytest.approx(12.5)
    # Cached prompt tokens at the cached price.
    assert table.cost("local", "my-model", Usage(1_000_000, 0, 1_000_000, cached_tokens=400_000)) == pytest.approx(
        0.6 + 0.2)
    assert table.cost("local", "my-other-model", Usage(10, 10, 20)) is None  # no price: unknown, not $0
    assert table.cost("openai", "gpt-4o", None) is None
    assert catalogue_price(None, "no-such-model-anywhere") is None


async def test_redis_script_of_a_large_rule_set(fresh_redis: RedisServer) -> None:
    """The admit script is written per rule set: one of 120 counters (a caller in 40 groups, three kinds each)
    still runs, in one call."""
    many = Principal(subject="m", groups=tuple(f"g{i}" for i in range(40)))
    rule = _rule(per="group", requests_per_minute=1, tokens_per_minute=100, concurrent_requests=5)
    checks = rule_checks(rule, rule_keys(rule, many, "m"), 900.0)
    assert len(checks) == 120
    store = RedisLimitStore(fresh_redis.url, "t:")
    try:
        refused, counts = await store.admit(checks, "a", 0)
        assert refused == 0 and {c.used for c in counts} == {1, 0}
        refused, _ = await store.admit(checks, "b", 0)
        assert refused == 1  # the first group's request rate
    finally:
        await store.close()
