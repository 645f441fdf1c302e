"""The Redis store over a Unix socket, on the bench's private redis-server (bench/run.py PrivateRedis), and what
the bench writes about it (the Redis column, the kept history of a comparison's section)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import redis

from llm_proxy.config import LimitRule
from llm_proxy.core.limits import rule_checks, rule_keys
from llm_proxy.store.redis_limits import RedisLimitStore
from llm_proxy.types import Principal

BENCH_RUN = Path(__file__).resolve().parents[2] / "bench" / "run.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_run", BENCH_RUN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def private_redis(bench: ModuleType, tmp_path: Path) -> Iterator[object]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    cpus = {os.cpu_count() - 1} if (os.cpu_count() or 1) > 1 else None  # type: ignore[operator]
    server = bench.PrivateRedis(tmp_path, cpus)
    server.start()
    yield server
    server.stop()


def _checks(**kw: object) -> list:  # type: ignore[type-arg]
    rule = LimitRule.model_validate({"name": "r", "per": "user", **kw})
    return rule_checks(rule, rule_keys(rule, Principal(subject="alice"), "m"), 900.0)


async def test_store_over_a_unix_socket_on_the_private_redis(private_redis: object, bench: ModuleType) -> None:
    server = private_redis
    assert server.url.startswith("unix://") and server.socket.exists()  # type: ignore[attr-defined]
    pid = server.pids()[0]  # type: ignore[attr-defined]
    if (os.cpu_count() or 1) > 1:
        assert os.sched_getaffinity(pid) == server.cpus  # type: ignore[attr-defined]
    # No TCP listener, no persistence.
    direct = redis.Redis(unix_socket_path=str(server.socket))  # type: ignore[attr-defined]
    try:
        cfg = direct.config_get("port") | direct.config_get("save") | direct.config_get("appendonly")
        assert cfg == {"port": "0", "save": "", "appendonly": "no"}
        checks = _checks(requests_per_minute=2, tokens_per_day=100)
        store = RedisLimitStore(f"{server.url}?db=2", "u:")  # type: ignore[attr-defined]
        try:
            now = time.time()  # (names the day of the token counter)
            assert [(await store.admit(checks, t, now))[0] for t in "abc"] == [0, 0, 1]
            await store.settle(checks, "a", 60, 0, now)  # (the request rate is left as it is: counted at admit)
            assert [c.used for c in await store.read(checks, now)] == [2, 60]
        finally:
            await store.close()
        direct.select(2)
        assert direct.exists("u:" + checks[0].key)  # in database 2 (`?db=2`)
    finally:
        direct.close()
    cpu = bench.proc_cpu_seconds(pid)
    assert cpu >= 0.0
    server.stop()  # type: ignore[attr-defined]
    assert server.pids() == []  # type: ignore[attr-defined]


def test_history_of_a_section_survives_a_new_run(bench: ModuleType, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Limits cost (on vs off)\n\nold table\n\n"
                       f"{bench.HISTORY} (three rules):\n- run A: **0.8**\n\n## Next\n\nkept\n")
    bench.write_results("## Limits cost (on vs off)\n\nnew table\n", results, "## Limits cost (on vs off)")
    text = results.read_text()
    assert "old table" not in text and "new table" in text
    assert text.index("new table") < text.index(bench.HISTORY) < text.index("- run A: **0.8**") < text.index(
        "## Next")
    assert text.endswith("## Next\n\nkept\n")
