#!/usr/bin/env python3
"""What one request's limits cost, without HTTP around them: the limiter of the bench's limits variant (three rules:
requests per minute per user, tokens per day per user, USD per month global) on a private redis-server, driven
like the proxy drives it (admit before the upstream call, settle after the answer) by --concurrency coroutines
under uvloop.

    .venv/bin/python bench/limits_admit.py [--requests 20000] [--concurrency 8]
    .venv/bin/python bench/limits_admit.py --instructions      # + valgrind callgrind: instructions per request

Prints, per request: this process's CPU µs (the proxy's share: our RESP client, the limiter, the event loop),
redis-server's CPU µs (the Lua scripts, read from /proc around the run), and Redis's own per-call figures from
INFO commandstats (evalsha usec_per_call). --instructions runs the loop twice under callgrind (the Redis stays
outside it) and reports (Ir(n2) - Ir(n1)) / (n2 - n1): instructions per request, a figure that does not depend on
the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "src"))

import run  # noqa: E402  (bench/run.py: the private Redis)

RULES = [  # bench/run.py's limits variant (never reached)
    {"name": "user-rpm", "per": "user", "requests_per_minute": 100_000_000},
    {"name": "user-tokens", "per": "user", "tokens_per_day": 1_000_000_000_000},
    {"name": "global-usd", "per": "global", "usd_per_month": 1_000_000_000},
]


async def drive(store_url: str, requests: int, concurrency: int, prefix: str,
                warm: Callable[[], object] = lambda: None) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of `requests` admits + settles; the store is warmed up first (then
    `warm` is called)."""
    from llm_proxy.config import LimitsSettings
    from llm_proxy.core.limits import build_limiter
    from llm_proxy.types import Principal, Usage

    settings = LimitsSettings.model_validate({"store": store_url, "key_prefix": prefix, "rules": RULES})
    limiter = build_limiter(settings)
    assert limiter is not None
    await limiter.start()
    who = Principal(subject="bench-user")
    usage = Usage(42, 19, 61)
    left = [0]

    async def worker() -> None:
        while left[0] > 0:
            left[0] -= 1
            ticket = await limiter.admit(who, "bench-json", "chat.completions", f"req_{left[0]:024d}")
            assert ticket is not None, "refused or store down"
            await asyncio.sleep(0)  # the upstream call: at least one loop turn
            limiter.settle(ticket, usage, 0.0000177)

    left[0] = min(500, requests)
    await asyncio.gather(*[worker() for _ in range(concurrency)])  # warm-up: connection, scripts, caches
    await asyncio.sleep(0.01)  # (its last charges)
    warm()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    left[0] = requests
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    await limiter.close()  # the last charges go out
    return time.process_time() - cpu0, time.perf_counter() - wall0


def commandstats(redis: run.PrivateRedis) -> dict[str, tuple[int, float]]:
    out = {}
    for line in redis.call(b"INFO commandstats").decode().splitlines():
        m = re.match(r"cmdstat_(\w+):calls=(\d+),usec=\d+,usec_per_call=([\d.]+)", line)
        if m:
            out[m[1]] = (int(m[2]), float(m[3]))
    return out


def callgrind_ir(store_url: str, requests: int, concurrency: int, out: Path) -> int:
    cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, __file__, "--child",
           "--store", store_url, "--requests", str(requests), "--concurrency", str(concurrency)]
    subprocess.run(cmd, check=True, capture_output=True)
    m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.M)
    assert m, "no totals in callgrind's output"
    return int(m[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--instructions", action="store_true", help="also count instructions per request (callgrind)")
    p.add_argument("--redis-instructions", action="store_true",
                   help="run redis-server under callgrind: its instructions per request (the Lua scripts)")
    p.add_argument("--keep-profile", action="store_true", help="keep redis-server's callgrind file in bench/out")
    p.add_argument("--redis-cpus", default="1", help="CPUs of the private redis-server (default 1)")
    p.add_argument("--cpus", default="0", help="CPUs of this process (default 0)")
    p.add_argument("--store", default=None, help=argparse.SUPPRESS)  # --child: the Redis of the parent
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import uvloop

    if a.child:
        uvloop.run(drive(a.store, a.requests, a.concurrency, f"c{a.requests}:"))
        return 0
    import os

    os.sched_setaffinity(0, run.parse_cpus(a.cpus) or set(range(os.cpu_count() or 1)))
    with tempfile.TemporaryDirectory(prefix="limits-admit-") as tmp:
        cg = Path(tmp) / "redis.callgrind"
        wrapper = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={cg}"] if a.redis_instructions else []
        redis = run.PrivateRedis(Path(tmp), run.parse_cpus(a.redis_cpus), wrapper)
        redis.start(timeout=60.0)
        try:
            pid = redis.pids()[0]
            r0 = [0.0]

            def warm() -> None:
                redis.call(b"CONFIG RESETSTAT")
                r0[0] = run.proc_cpu_seconds(pid)
                if a.redis_instructions:
                    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)

            cpu, wall = uvloop.run(drive(redis.url, a.requests, a.concurrency, "m:", warm))
            rcpu = run.proc_cpu_seconds(pid) - r0[0]
            stats = commandstats(redis)
            redis_ir = 0
            if a.redis_instructions:
                subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
                dumps = sorted(Path(tmp).glob("redis.callgrind*"), key=lambda f: f.stat().st_mtime)
                m = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
                redis_ir = int(m[1]) if m else 0
                if a.keep_profile:
                    keep = run.OUT / "limits-admit-redis.callgrind"
                    run.OUT.mkdir(exist_ok=True)
                    keep.write_bytes(dumps[-1].read_bytes())
                    print(f"  (callgrind profile of redis-server: {keep}; callgrind_annotate it)")
            n = a.requests
            print(f"redis-server {redis.version} on {redis.url} (CPU {a.redis_cpus}); {n} requests, "
                  f"{a.concurrency} at a time, this process on CPU {a.cpus}")
            print(f"  this process: {1e6 * cpu / n:.1f} CPU µs/request ({n / wall:,.0f} requests/s)")
            print(f"  redis-server: {1e6 * rcpu / n:.1f} CPU µs/request (/proc, {run.CLK_TCK} ticks/s)")
            if redis_ir:
                print(f"  redis-server: {redis_ir / n:,.0f} instructions/request (callgrind, zeroed after warm-up)")
            for name, (calls, per) in sorted(stats.items()):
                print(f"  redis {name}: {calls} calls ({calls / n:.2f}/request), {per:.2f} µs/call")
            if a.instructions:
                n1, n2 = max(200, n // 10), max(1200, n // 2)
                ir1 = callgrind_ir(redis.url, n1, a.concurrency, Path(tmp) / "cg1")
                ir2 = callgrind_ir(redis.url, n2, a.concurrency, Path(tmp) / "cg2")
                print(f"  this process: {(ir2 - ir1) / (n2 - n1):,.0f} instructions/request "
                      f"(callgrind, {n1} vs {n2} requests)")
        finally:
            redis.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
