#!/usr/bin/env python3
"""Profile the proxy under load with py-spy and summarise where its CPU time goes.

    .venv/bin/pip install py-spy        # once (not a project dependency)
    .venv/bin/python bench/profile_proxy.py [--kinds json,stream] [--connections 64] [--variant log]

Same setup as bench/run.py (nginx upstream, proxy pinned to CPU 0, wrk on CPU 1); py-spy samples the
proxy from CPU 1 without pausing it (--nonblocking: some stacks are torn, so inclusive figures are
lower bounds). For each workload it writes the collapsed stacks (bench/out/profile-*.txt; load
them into https://www.speedscope.app or flamegraph.pl) and prints:
time per component (the file of the innermost Python frame), the hottest functions by self time,
and the proxy's own functions by inclusive time.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py, the harness this reuses

LEDGER_FILES = ("/llm_proxy/core/usage.py", "/llm_proxy/store/")
FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def component(path: str) -> str:
    p = path.replace("\\", "/")
    for key, name in (
        ("/llm_proxy/", "llm_proxy"),
        ("/aiohttp/", "aiohttp"),
        ("/asyncio/", "asyncio"),
        ("/logging/", "logging"),
        ("/multidict/", "multidict"),
        ("/yarl/", "yarl"),
        ("/uvloop/", "uvloop"),
        ("/aiosignal/", "aiohttp"),
        ("/frozenlist/", "aiohttp"),
        ("/propcache/", "yarl"),
        ("/pydantic", "pydantic"),
        ("/sqlalchemy/", "sqlalchemy"),
        ("/asyncpg/", "asyncpg"),
        ("/http/", "stdlib http"),
        ("/email/", "stdlib email"),
    ):
        if key in p:
            return name
    if "/lib/python3" in p and "site-packages" not in p:
        return "stdlib (other)"
    return "other"


def short(frame: str) -> str:
    """'func (/long/path/pkg/mod.py:12)' -> 'pkg/mod.py:12 func'."""
    m = FRAME.match(frame)
    if not m:
        return frame
    f = m["file"]
    for marker in ("/site-packages/", "/src/", "/lib/python3.11/", "/lib/python3.12/", "/lib/python3.13/"):
        if marker in f:
            f = f.split(marker, 1)[1]
            break
    return f"{f}:{m['line'] or '?'} {m['func']}"


def frame_file(frame: str) -> str:
    m = FRAME.match(frame)
    return m["file"] if m else ""


def func_key(frame: str) -> str:
    """A function (all its lines together): 'pkg/mod.py func'."""
    s = short(frame)
    loc, _, func = s.partition(" ")
    return f"{loc.rsplit(':', 1)[0]} {func}"


def summarise(collapsed: Path, top: int) -> str:
    stacks: list[tuple[list[str], int]] = []
    by_thread: collections.Counter[str] = collections.Counter()
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = [f for f in stack.split(";") if f and not f.startswith("process ")]
        thread = parts[0] if parts and parts[0].startswith("thread ") else "thread ?"
        frames = [f for f in parts if not f.startswith("thread ")]
        if frames:
            stacks.append((frames, int(count)))
            by_thread[thread] += int(count)
    total = sum(c for _, c in stacks)
    if not total:
        return "no samples"
    by_comp: collections.Counter[str] = collections.Counter()
    self_fn: collections.Counter[str] = collections.Counter()
    incl_fn: collections.Counter[str] = collections.Counter()
    own_line: collections.Counter[str] = collections.Counter()
    ledger = 0  # samples with a usage-ledger frame anywhere on the stack (record() and the batch writer)
    for frames, c in stacks:
        if any(any(m in frame_file(f) for m in LEDGER_FILES) for f in frames):
            ledger += c
        leaf = frames[-1]
        by_comp[component(frame_file(leaf))] += c
        self_fn[func_key(leaf)] += c
        for key in {func_key(f) for f in frames}:
            incl_fn[key] += c
        # The innermost frame of the proxy's own code: which line of ours led to this sample.
        mine = next((f for f in reversed(frames) if "/llm_proxy/" in frame_file(f)), None)
        if mine is not None:
            own_line[short(mine)] += c

    def pct(n: int) -> str:
        return f"{100.0 * n / total:5.1f}%"

    out = [f"{total} samples (CPU only; idle time in the event loop's poll is excluded)", "", "time by component:"]
    out += [f"  {pct(n)}  {name}" for name, n in by_comp.most_common()]
    out += ["", f"usage ledger, inclusive (a frame of {' or '.join(LEDGER_FILES)} on the stack): {pct(ledger)}"]
    out += ["", "time by thread:"]
    out += [f"  {pct(n)}  {name}" for name, n in by_thread.most_common()]
    out += ["", f"top {top} functions by self time:"]
    out += [f"  {pct(n)}  {name}" for name, n in self_fn.most_common(top)]
    out += ["", f"top {top} llm_proxy functions by inclusive time (own code + what it calls):"]
    out += [f"  {pct(n)}  {name}" for name, n in incl_fn.most_common() if name.startswith("llm_proxy/")][:top]
    out += ["", f"top {top} llm_proxy lines (innermost own frame) by inclusive time:"]
    out += [f"  {pct(n)}  {name}" for name, n in own_line.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="json,stream")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--variant", default="log", choices=sorted(k for k, v in run.VARIANTS.items() if not v.oidc))
    p.add_argument("--duration", type=int, default=15, help="seconds of sampling per workload")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--native", action="store_true", help="also sample C frames (py-spy --native)")
    p.add_argument("--database-url", default=None, help="usage database, as for bench/run.py (default SQLite)")
    p.add_argument("--src", default=None, help="run the proxy from this source directory, as for bench/run.py")
    p.add_argument("--limits-store", default="private",
                   help="the limits variant's store, as for bench/run.py (default: a private redis-server)")
    p.add_argument(
        "--blocking",
        action="store_true",
        help="pause the proxy for each sample: whole stacks, but idle threads then count as busy",
    )
    a = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, run._terminate)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.access(spy, os.X_OK):
        print("bench/profile_proxy.py: py-spy is missing: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    nginx_bin = run.find_tools()
    args = run.parse_args(["--quick", "--limits-store", a.limits_store])
    variant = run.VARIANTS[a.variant]
    run.OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    with run.workdir(False) as tmp:
        redis = run.start_limits_store(args, tmp) if variant.limits else None  # before the proxy reads its config
        upstream = run.Nginx(nginx_bin, tmp)
        upstream.start()
        upstream.pin(args.load_cpus)
        cpus = args.proxy_cpus if variant.workers == 1 else args.all_cpus
        proxy = run.Proxy(tmp, upstream.port, variant, cpus, a.src, a.database_url)
        db = None
        if run.local_postgres(a.database_url) and args.load_cpus is not None:
            db = run.DatabasePinning(a.database_url, args.load_cpus)  # on the load side, as in bench/run.py
            db.start()
            print(db.describe())
        proxy.start()
        try:
            run.check_proxy(proxy.port, upstream.port)
            pid = proxy.workers()[0]
            for kind in a.kinds.split(","):
                model, _ = run.KINDS[kind]
                body = tmp / f"body-{kind}.json"
                body.write_bytes(run.request_body(model, kind == "stream"))
                url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions"
                wrk = [
                    "taskset", "-c", run.cpu_list(args.load_cpus), "wrk", "-t1", f"-c{a.connections}",
                    f"-d{a.duration + 6}s", "--timeout", "10s", "-s", str(run.BENCH / "post.lua"), url, "--", str(body),
                ]  # fmt: skip
                load = subprocess.Popen(wrk, stdout=subprocess.PIPE, text=True, preexec_fn=run._die_with_parent)
                time.sleep(2)
                if db is not None:
                    db.pin()  # the proxy's new pool connections
                raw = run.OUT / f"profile-{stamp}-{kind}-c{a.connections}.txt"
                cmd = [
                    "taskset", "-c", run.cpu_list(args.load_cpus), spy, "record",
                    "--rate", str(a.rate), "--duration", str(a.duration), "--format", "raw", "-o", str(raw),
                    "--threads", "--full-filenames", *([] if a.blocking else ["--nonblocking"]),
                    "--pid", str(pid),
                ]  # fmt: skip
                if a.native:
                    cmd.append("--native")
                subprocess.run(cmd, check=True, capture_output=True, preexec_fn=run._die_with_parent)
                stdout, _ = load.communicate()
                line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), "")
                print(f"\n=== {kind}, {a.connections} connections, proxy {variant.label} ===")
                print(f"wrk (includes sampling time): {line[len('BENCH_JSON ') :][:200]}")
                print(f"collapsed stacks: {raw.relative_to(run.ROOT)}\n")
                print(summarise(raw, a.top))
        finally:
            proxy.stop()
            upstream.stop()
            if redis is not None:
                redis.stop()
            if db is not None:
                db.restore()
                print(f"restored the CPU affinity of {db.restored} PostgreSQL processes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
