#!/usr/bin/env python3
"""Core gateway benchmark: the proxy against the same fixed-response upstream measured directly.

One command (`make bench`, i.e. `.venv/bin/python bench/run.py`):

* starts nginx (one worker) as an upstream that returns a fixed `chat.completion` on
  `POST /v1/chat/completions` and a fixed SSE stream (20 `chat.completion.chunk` events, a usage
  chunk, `data: [DONE]`) on `POST /stream/v1/chat/completions`;
* starts `llm-proxy serve` with a generated native config (two models -> two provider base URLs);
* for the `oidc` variant, also starts the auth tests' real OpenID provider (tests/oidc/op.mjs under Node),
  configures it as the trusted issuer and has wrk send one access token as `Authorization: Bearer`;
* drives both with wrk (`bench/post.lua`), pinned so the proxy has a core of its own;
* with a local PostgreSQL as the usage database (`--database-url postgresql+asyncpg://...@127.0.0.1/...`), pins
  its postmaster and every backend to the load CPUs while measuring (the database is infrastructure, like
  nginx) and restores their affinity at the end;
* measures a variant and its `baseline` (oidc vs log, log vs noledger) interleaved, point by point;
* prints a table (direct vs proxy req/s, ratio, p50/p99, added latency, proxy CPU and RSS) and
  replaces the "## Core gateway throughput" section of bench/RESULTS.md, plus the section of its own that a
  comparison may have ("## Usage ledger cost (on vs off)"). A run of comparison pairs only (e.g.
  `--variants log,noledger`) leaves the core section alone.

Nothing is installed here: a missing nginx or wrk exits 2 with the command to run (bench/setup.sh); so does
missing Node.js or tests/oidc/node_modules when the oidc variant is selected (`make node-deps`).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
OUT = BENCH / "out"  # raw results (git-ignored)
SECTION = "## Core gateway throughput"
INSTALL_HINT = "sudo apt-get update && sudo apt-get install -y nginx wrk   (or: sh bench/setup.sh)"
OP_DIR = ROOT / "tests" / "oidc"  # the auth tests' OpenID provider (npm oidc-provider), reused by the oidc variant
OP_HINT = "Node.js 20+ on PATH, then: make node-deps   (= cd tests/oidc && npm ci)"
OIDC_AUDIENCE = "konveyor-api"  # tests/conftest_oidc.AUDIENCE: the `aud` of the provider's access tokens

# Project targets (one worker pinned to one core, load generator on the other).
TARGET_RPS_64 = 4000.0
TARGET_ADDED_P50_MS = 1.5
TARGET_ADDED_P99_MS = 4.0
TARGET_STREAMS = 2500.0
TARGET_RSS_MB = 80.0
TARGET_SCALING = 1.3  # 2 workers vs 1 on this box, where wrk and nginx also need CPU time
TARGET_FEATURE_RATIO = 0.90  # req/s with a feature (OIDC auth, usage ledger) vs the same set-up without it

CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------------------------------
# Fixtures: the upstream's fixed answers and the client's request bodies
# --------------------------------------------------------------------------------------------------

UPSTREAM_MODEL = "gpt-4o-mini-2024-07-18"
CREATED = 1730000000
ANSWER_WORDS = (
    "The quick answer is that a gateway should add as little as possible: parse once, "
    "forward once, and stream every chunk as soon as it arrives."
).split(" ")
USAGE = {
    "prompt_tokens": 42,
    "completion_tokens": 19,
    "total_tokens": 61,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}
N_CHUNKS = 20


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def upstream_json_body() -> str:
    return _dumps(
        {
            "id": "chatcmpl-bench000000000000000000001",
            "object": "chat.completion",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": " ".join(ANSWER_WORDS),
                        "refusal": None,
                        "annotations": [],
                    },
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
            "service_tier": "default",
            "system_fingerprint": "fp_bench0001",
        }
    )


def upstream_sse_body() -> str:
    """20 chunks (role, 18 content deltas, finish), one usage chunk, [DONE]; as OpenAI sends with
    stream_options.include_usage (every chunk carries "usage":null)."""

    def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-bench000000000000000000002",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": UPSTREAM_MODEL,
            "service_tier": "default",
            "system_fingerprint": "fp_bench0001",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    words = ANSWER_WORDS[: N_CHUNKS - 2]
    events = [chunk({"role": "assistant", "content": "", "refusal": None}, None)]
    events += [chunk({"content": (" " if i else "") + w}, None) for i, w in enumerate(words)]
    events.append(chunk({}, "stop"))
    assert len(events) == N_CHUNKS
    usage_chunk = chunk({}, None)
    usage_chunk["choices"] = []
    usage_chunk["usage"] = USAGE
    events.append(usage_chunk)
    return "".join(f"data: {_dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def request_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer in one short paragraph."},
            {
                "role": "user",
                "content": "In two sentences: what should an API gateway in front of language models "
                "do, and what should it avoid doing on the hot path?",
            },
        ],
        "max_tokens": 64,
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return _dumps(body).encode()


# --------------------------------------------------------------------------------------------------
# Processes: nginx upstream, the proxy
# --------------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when the harness dies (even by SIGKILL or `timeout`)."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def set_affinity(pids: Sequence[int], cpus: set[int] | None) -> None:
    if cpus is None:
        return
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def cpu_list(cpus: set[int] | None) -> str:
    return ",".join(str(c) for c in sorted(cpus)) if cpus is not None else "any"


def wait_http(port: int, path: str, method: str = "GET", body: bytes | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            status, _, _ = http_call(port, method, path, body)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"127.0.0.1:{port}{path} not ready after {timeout:.0f}s ({last})")


def http_call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        hdrs = {"content-type": "application/json"} if body is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def nginx_string(text: str) -> str:
    """A double-quoted nginx config string (nginx unescapes \\" \\\\ \\n; `$` would be a variable)."""
    if "$" in text:
        raise ValueError("fixture must not contain '$'")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def nginx_return(text: str, var: str) -> str:
    """`set` pieces + `return 200`: one nginx config token may not exceed ~4 KB."""
    pieces = [text[i : i + 2000] for i in range(0, len(text), 2000)]
    lines = [f"            set ${var}{i} {nginx_string(p)};" for i, p in enumerate(pieces)]
    joined = "".join(f"${var}{i}" for i in range(len(pieces)))
    lines.append(f'            return 200 "{joined}";')
    return "\n".join(lines)


class Nginx:
    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.dir = workdir / "nginx"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "user root root;\n" if os.geteuid() == 0 else ""
        temp = "\n".join(f"    {k}_temp_path {d / k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        conf = f"""# generated by bench/run.py
{user}daemon off;
master_process on;
worker_processes 1;
pid {d / "nginx.pid"};
error_log {d / "error.log"} warn;
events {{
    worker_connections 4096;
    multi_accept on;
}}
http {{
    access_log off;
    server_tokens off;
{temp}
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    tcp_nodelay on;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
{nginx_return(upstream_json_body(), "json")}
        }}
        location = /stream/v1/chat/completions {{
            default_type text/event-stream;
            add_header cache-control no-cache;
{nginx_return(upstream_sse_body(), "sse")}
        }}
        location / {{
            return 404;
        }}
    }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        cmd = [self.binary, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")]
        test = subprocess.run([*cmd, "-t"], capture_output=True, text=True, check=False)
        if test.returncode != 0:
            raise RuntimeError(f"nginx rejected the generated config:\n{test.stderr}")
        with open(d / "stderr.log", "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=_die_with_parent)
        wait_http(self.port, "/v1/chat/completions", "POST", b"{}", timeout=10)

    def pids(self) -> list[int]:
        return [self.proc.pid, *children(self.proc.pid)] if self.proc else []

    def pin(self, cpus: set[int] | None) -> None:
        set_affinity(self.pids(), cpus)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def _jwt_exp(token: str) -> float:
    """The `exp` claim of a JWT, read without verifying it (only to know when to fetch a new one)."""
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


class BenchOP:
    """The auth tests' real OpenID provider (tests/conftest_oidc.OpenIDProvider: tests/oidc/op.mjs under Node)
    and the one access token the oidc variant sends on every request."""

    CLIENT = "llm-cli"  # client_credentials grant: an RS256 access token, aud konveyor-api, 300 s lifetime
    REFRESH_MARGIN = 120.0  # a point with all its retries fits in this; only then is a new token fetched

    def __init__(self) -> None:
        self.op: Any = None
        self.tokens = 0  # access tokens fetched
        self._token = ""
        self._exp = 0.0

    def start(self) -> None:
        if str(ROOT) not in sys.path:
            sys.path.insert(0, str(ROOT))
        import pytest  # the provider's helper reports failures with pytest.fail

        from tests.conftest_oidc import AUDIENCE, OpenIDProvider

        if AUDIENCE != OIDC_AUDIENCE:
            raise RuntimeError(f"tests/conftest_oidc.AUDIENCE is {AUDIENCE!r}, bench/run.py expects {OIDC_AUDIENCE!r}")
        op = OpenIDProvider()
        try:
            op.start()
        except pytest.fail.Exception as exc:
            op.close()
            raise RuntimeError(str(exc)) from None
        self.op = op

    @property
    def issuer(self) -> str:
        return str(self.op.issuer)

    @property
    def jwks_uri(self) -> str:
        return str(self.op.jwks_uri)

    def authorization(self) -> str:
        """`Bearer <token>`: the same token until it is within REFRESH_MARGIN of its expiry."""
        if self._exp - time.time() < self.REFRESH_MARGIN:
            self._token = self.op.token(self.CLIENT)
            self._exp = _jwt_exp(self._token)
            self.tokens += 1
        return f"Bearer {self._token}"

    def close(self) -> None:
        if self.op is not None:
            self.op.close()
            self.op = None


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", ""})  # "" = a Unix socket


def local_postgres(url: str | None) -> bool:
    """A PostgreSQL URL whose server runs on this machine (so it competes for its CPUs)."""
    if not url or url.split(":", 1)[0].split("+", 1)[0] not in ("postgresql", "postgres"):
        return False
    from urllib.parse import urlsplit

    try:
        return (urlsplit(url).hostname or "") in LOCAL_HOSTS
    except ValueError:
        return False


def postgres_server_pid(url: str) -> int:
    """The postmaster serving `url`: the parent of the backend that answers `SELECT pg_backend_pid()`."""
    import asyncio

    import asyncpg

    dsn = re.sub(r"^postgres(?:ql)?\+\w+://", "postgresql://", url)

    async def parent_of_backend() -> tuple[int, int]:
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            pid = int(await conn.fetchval("SELECT pg_backend_pid()"))
            return pid, int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # while it lives
        finally:
            await conn.close()

    pid, ppid = asyncio.run(parent_of_backend())
    if "postgres" not in Path(f"/proc/{ppid}/comm").read_text():
        raise RuntimeError(f"backend {pid}'s parent {ppid} is not a postgres process")
    return ppid


def _set_all_threads(pid: int, cpus: set[int], policy: int | None = None) -> None:
    """sched_setaffinity on every thread of `pid` (`taskset -apc`), and the scheduling policy when given
    (`chrt -ap`): ProcessLookupError if it is gone, another OSError if it refuses."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    for tid in tids:
        with contextlib.suppress(ProcessLookupError, FileNotFoundError):  # a thread that just ended
            os.sched_setaffinity(int(tid), cpus)
            if policy is not None:
                os.sched_setscheduler(int(tid), policy, os.sched_param(0))


class DatabasePinning:
    """A local PostgreSQL server on the load CPUs while measuring: infrastructure, like nginx, not the proxy.

    pin() moves the postmaster and all its children (backends, checkpointer, WAL writer, ...) and is called again
    after every warm-up, when the proxy's pool connections exist: backends forked meanwhile inherit the
    postmaster's (pinned) set anyway, this catches any that did not. restore() puts every process back on the
    CPUs it had; a backend forked while pinned gets the postmaster's original set. It runs from a `finally`
    (errors, Ctrl-C and SIGTERM/SIGHUP included; a SIGKILLed harness cannot restore).

    While pinned the processes also run at idle priority (SCHED_IDLE): on this 2-core box the load CPU also
    carries wrk and nginx, and a batch insert (~20-30 ms of CPU per 1000 rows) otherwise takes CFS time slices
    from them, which at 8 connections slows the load side and, through it, the proxy (fewer requests per event-
    loop turn). A database on a machine of its own does not do that; SCHED_IDLE lets PostgreSQL use whatever the
    load CPU leaves idle (60-80% of it) without delaying the load. restore() puts SCHED_OTHER back."""

    def __init__(self, url: str, cpus: set[int]) -> None:
        self.url = url
        self.cpus = cpus
        self.postmaster = 0
        self.postmaster_cpus: set[int] = set()
        self.original: dict[int, set[int]] = {}
        self.pinned: set[int] = set()
        self.errors: list[str] = []
        self.restored = 0
        self.restore_errors: list[str] = []

    def family(self) -> list[int]:
        return [self.postmaster, *children(self.postmaster)] if self.postmaster else []

    def start(self) -> None:
        self.postmaster = postgres_server_pid(self.url)
        self.postmaster_cpus = set(os.sched_getaffinity(self.postmaster))
        if self.postmaster_cpus == self.cpus and self.cpus != set(range(os.cpu_count() or 1)):
            print(f"bench: WARNING: PostgreSQL is already on CPU {cpu_list(self.cpus)} only (another run without "
                  "`flock /tmp/bench.lock`?); that is what it will be restored to", flush=True)  # fmt: skip
        self.pin()
        if self.errors:
            raise RuntimeError("cannot pin PostgreSQL to the load CPUs: " + "; ".join(self.errors[:3]))

    def pin(self) -> list[int]:
        """Pin every current server process; returns their pids."""
        pids = []
        for pid in self.family():
            try:
                if pid not in self.original:
                    mask = set(os.sched_getaffinity(pid))
                    # forked after the postmaster was pinned: it inherited our set, its own is the postmaster's
                    self.original[pid] = self.postmaster_cpus if pid != self.postmaster and mask == self.cpus else mask
                _set_all_threads(pid, self.cpus, os.SCHED_IDLE)
            except ProcessLookupError:
                continue  # a backend that just exited
            except OSError as exc:
                self.errors.append(f"pid {pid}: {exc}")
                continue
            self.pinned.add(pid)
            pids.append(pid)
        return pids

    def restore(self) -> None:
        for pid in self.family():
            try:
                _set_all_threads(pid, self.original.get(pid, self.postmaster_cpus), os.SCHED_OTHER)
            except ProcessLookupError:
                continue
            except OSError as exc:
                self.restore_errors.append(f"pid {pid}: {exc}")
                continue
            self.restored += 1

    def describe(self) -> str:
        was = ", ".join(sorted({cpu_list(m) for m in self.original.values()})) or "?"
        return (
            f"PostgreSQL server (postmaster pid {self.postmaster}) and its processes pinned to CPU "
            f"{cpu_list(self.cpus)} at idle priority (SCHED_IDLE: it gets what wrk and nginx leave idle there) while "
            f"measuring: {len(self.pinned)} processes in all (postmaster, background "
            f"processes and backends, re-pinned after every warm-up to catch new backends; their CPUs before: {was})"
        )


class PrivateRedis:
    """The limits variant's Redis (`--limits-store private`, the default): a `redis-server` of the bench's own, like
    nginx, so neither other tenants' keys nor a shared server's CPU placement decide the figures.

    No persistence (`--save ""`, `--appendonly no`), no TCP (`--port 0`): a Unix socket in the work dir, which the
    proxy uses as `unix://...`. Pinned (taskset, all its threads) to the load CPUs at normal priority: unlike the
    usage database, Redis is on the request path (every admit waits for its answer), so SCHED_IDLE behind wrk would
    show up as proxy latency. Its CPU time is read from /proc around each point (Redis CPU µs/request)."""

    def __init__(self, workdir: Path, cpus: set[int] | None, wrapper: Sequence[str] = ()) -> None:
        self.dir = workdir / "redis"
        self.cpus = cpus
        self.wrapper = list(wrapper)  # e.g. valgrind (bench/limits_admit.py --redis-instructions)
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.version = ""

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, timeout: float = 10.0) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server), or pass "
                               "--limits-store redis://host:port/db")  # fmt: skip
        self.dir.mkdir(parents=True, exist_ok=True)
        cmd = [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
               "--save", "", "--appendonly", "no", "--dir", str(self.dir), "--loglevel", "warning",
               "--logfile", str(self.dir / "redis.log")]  # fmt: skip
        cmd = [*self.wrapper, *cmd]
        if self.cpus is not None:
            cmd = ["taskset", "-c", cpu_list(self.cpus), *cmd]  # (taskset execs: the pid is redis-server's)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                info = self.call(b"INFO server")
                self.version = next((ln.split(":", 1)[1].strip() for ln in info.decode().splitlines()
                                     if ln.startswith("redis_version:")), "?")  # fmt: skip
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on {self.socket}; see {self.dir / 'redis.log'}")
            time.sleep(0.02)
        set_affinity([self.proc.pid], self.cpus)  # (threads it started before taskset's mask applied: none)

    def call(self, command: bytes) -> bytes:
        """One inline command over the socket; the raw reply (enough for PING/INFO)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2.0)
            s.connect(str(self.socket))
            s.sendall(command + b"\r\n")
            head = b""
            while b"\r\n" not in head:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("connection closed")
                head += chunk
            if not head.startswith(b"$"):
                return head
            line, _, rest = head.partition(b"\r\n")
            n = int(line[1:])
            while len(rest) < n:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError("connection closed")
                rest += chunk
            return rest[:n]

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def describe(self) -> str:
        return (
            f"Limits store: a private redis-server {self.version} started by the harness (no persistence, Unix "
            f"socket, `unix://` in the proxy's config), pinned to CPU {cpu_list(self.cpus)} at normal priority and "
            "stopped at the end; its CPU time per request is the Redis column"
        )

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


def start_limits_store(args: argparse.Namespace, workdir: Path) -> PrivateRedis | None:
    """`--limits-store private`: start the private Redis and point the limits variant at it (LIMITS_STORE)."""
    if args.limits_store != "private":
        LIMITS_STORE[0] = args.limits_store
        return None
    redis = PrivateRedis(workdir, args.load_cpus)
    redis.start()
    LIMITS_STORE[0] = redis.url
    print(f"bench: {redis.describe()} ({redis.socket})", flush=True)
    return redis


@dataclass
class ProxyVariant:
    key: str
    label: str
    workers: int = 1
    access_log: bool = True
    ledger: bool = True
    floor: bool = False  # not the proxy: bench/floor.py, a bare aiohttp pass-through (reference point)
    oidc: bool = False  # auth.mode oidc against BenchOP; wrk sends its bearer token
    limits: bool = False  # three limit rules (requests, tokens, USD) on LIMITS_STORE, never reached
    # The variant this one is compared with: both proxies run at once and are measured interleaved, point by point.
    baseline: str | None = None
    feature: str = ""  # what differs from the baseline ("OIDC auth", "usage ledger")
    removes: bool = False  # False: this variant adds `feature` to its baseline; True: it turns the baseline's off
    feature_note: str = ""  # how, for the report
    section: str | None = None  # a RESULTS.md section of its own for this comparison
    metrics: bool = True  # server.metrics.enabled (GET /metrics and the per-request counting)
    target_ratio: float = TARGET_FEATURE_RATIO  # with / without the feature, geometric mean of the points


def feature_pair(v: ProxyVariant, variants: Sequence[ProxyVariant]) -> tuple[ProxyVariant, ProxyVariant] | None:
    """(with the feature, without it) for a variant whose baseline is also selected, else None."""
    base = next((b for b in variants if b.key == v.baseline), None)
    if base is None:
        return None
    return (base, v) if v.removes else (v, base)


class Proxy:
    def __init__(
        self,
        workdir: Path,
        upstream_port: int,
        variant: ProxyVariant,
        cpus: set[int] | None,
        src: str | None = None,
        database_url: str | None = None,
        op: BenchOP | None = None,
    ) -> None:
        self.src = src  # another source tree to run (its `src` directory), for A/B comparisons
        self.database_url = database_url
        if variant.oidc and op is None:
            raise ValueError(f"variant {variant.key!r} needs the OpenID provider (BenchOP)")
        self.op = op
        self.dir = workdir / f"proxy-{variant.key}"
        self.upstream_port = upstream_port
        self.variant = variant
        self.cpus = cpus
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "proxy.log"

    def auth_config(self) -> str:
        if not self.variant.oidc:
            return "auth:\n  mode: none\n  allow_unauthenticated: true"
        assert self.op is not None
        return f"""auth:
  mode: oidc
  oidc:
    issuers:
      - issuer: {self.op.issuer}
        jwks_uri: {self.op.jwks_uri}
        audiences: [{OIDC_AUDIENCE}]"""

    def price(self) -> str:
        return "\n    price: {input_per_million: 0.15, output_per_million: 0.6}" if self.variant.limits else ""

    def limits_config(self) -> str:
        """The limits variant: a request, a token and a dollar rule on every request (limits set so high that
        none refuses), in the store given by --limits-store (Redis by default), with a price for the models."""
        if not self.variant.limits:
            return ""
        return f"""limits:
  store: {LIMITS_STORE[0]}
  key_prefix: "bench:{os.getpid()}:"
  rules:
    - {{name: user-rpm, per: user, requests_per_minute: 100000000}}
    - {{name: user-tokens, per: user, tokens_per_day: 1000000000000}}
    - {{name: global-usd, per: global, usd_per_month: 1000000000}}
"""

    def config(self) -> str:
        up = f"http://127.0.0.1:{self.upstream_port}"
        d = self.dir
        return f"""# generated by bench/run.py
server:
  host: 127.0.0.1
  port: {self.port}
  workers: {self.variant.workers}
  access_log: {"true" if self.variant.access_log else "false"}
  drain_delay_seconds: 0
  shutdown_grace_seconds: 5
  metrics: {{enabled: {"true" if self.variant.metrics else "false"}}}
providers:
  - id: bench-json
    type: openai_compat
    base_url: {up}/v1
  - id: bench-sse
    type: openai_compat
    base_url: {up}/stream/v1
models:
  - id: bench-json
    provider: bench-json
    upstream_model: gpt-4o-mini{self.price()}
  - id: bench-stream
    provider: bench-sse
    upstream_model: gpt-4o-mini{self.price()}
default_model: bench-json
{self.limits_config()}{"" if self.variant.ledger else "# usage ledger off: isolates the cost of recording usage"}
{self.auth_config()}
database:
  url: {self.database_url or f"sqlite+aiosqlite:///{d / 'bench.db'}"}
usage:
  enabled: {"true" if self.variant.ledger else "false"}
  spool_dir: {d / "spool"}
"""

    def command(self) -> list[str]:
        if self.variant.floor:
            up = f"http://127.0.0.1:{self.upstream_port}"
            cmd = [sys.executable, str(BENCH / "floor.py"), "--port", str(self.port), "--upstream", up]
            return ["taskset", "-c", cpu_list(self.cpus), *cmd] if self.cpus is not None else cmd
        exe = Path(sys.executable).parent / "llm-proxy"
        base = [str(exe)] if exe.exists() and not self.src else [sys.executable, "-m", "llm_proxy"]
        cmd = [*base, "serve", "--config", str(self.dir / "config.yaml"), "--log-level", "INFO"]
        if self.variant.workers > 1:
            cmd += ["--workers", str(self.variant.workers)]
        if self.cpus is not None:
            cmd = ["taskset", "-c", cpu_list(self.cpus), *cmd]
        return cmd

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.dir / "config.yaml").write_text(self.config())
        with open(self.log_path, "wb") as log:  # the access log goes here, as it would to a log collector
            env = dict(os.environ)
            if self.src:
                env["PYTHONPATH"] = self.src + os.pathsep + env.get("PYTHONPATH", "")
            self.proc = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
                env=env,
                preexec_fn=_die_with_parent,
            )
        try:
            wait_http(self.port, "/v1/health/ready", timeout=60)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"the proxy did not become ready; its log:\n{self.tail_log()}") from None
        if self.variant.workers > 1:
            # SO_REUSEPORT: the port answers as soon as one worker listens; wait for all of them.
            deadline = time.monotonic() + 30
            while len(self.workers()) < self.variant.workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)

    def workers(self) -> list[int]:
        """The processes that serve requests (the process itself, or its worker children)."""
        if not self.proc:
            return []
        if self.variant.workers == 1:
            return [self.proc.pid]
        return [p for p in children(self.proc.pid) if "resource_tracker" not in cmdline(p)]

    def tail_log(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------------------------------
# Correctness check before measuring (a fast wrong answer is not a result)
# --------------------------------------------------------------------------------------------------


def sse_payloads(raw: bytes) -> list[bytes]:
    return [line[6:] for line in raw.split(b"\n") if line.startswith(b"data: ")]


def check_proxy(proxy_port: int, upstream_port: int, authorization: str | None = None) -> None:
    auth = {"authorization": authorization} if authorization else None
    st, _, direct = http_call(upstream_port, "POST", "/v1/chat/completions", request_body("x", False))
    st2, _, proxied = http_call(proxy_port, "POST", "/v1/chat/completions", request_body("bench-json", False), auth)
    if st != 200 or st2 != 200:
        raise RuntimeError(f"check failed: direct HTTP {st}, proxy HTTP {st2}: {proxied[:300]!r}")
    want = json.loads(direct)
    want["model"] = "bench-json"
    if json.loads(proxied) != want:
        raise RuntimeError(f"check failed: proxied JSON differs from upstream:\n{proxied[:500]!r}")

    st, _, direct = http_call(upstream_port, "POST", "/stream/v1/chat/completions", request_body("x", True))
    st2, hdrs, proxied = http_call(
        proxy_port, "POST", "/v1/chat/completions", request_body("bench-stream", True), auth
    )
    if st != 200 or st2 != 200 or not hdrs.get("content-type", "").startswith("text/event-stream"):
        raise RuntimeError(f"check failed: stream direct HTTP {st}, proxy HTTP {st2} {hdrs.get('content-type')}")
    a, b = sse_payloads(direct), sse_payloads(proxied)
    if len(a) != N_CHUNKS + 2 or len(b) != len(a) or b[-1] != b"[DONE]":
        raise RuntimeError(f"check failed: {len(b)} proxied SSE events, upstream sent {len(a)}")
    for x, y in zip(a[:-1], b[:-1], strict=True):
        ex = json.loads(x)
        ex["model"] = "bench-stream"
        if json.loads(y) != ex:
            raise RuntimeError(f"check failed: proxied chunk differs:\n{y[:300]!r}\nvs\n{x[:300]!r}")


def check_auth_enforced(proxy_port: int, authorization: str) -> None:
    """With auth on, the token must be what gets requests through: none, or one with a broken signature, is 401."""
    token = authorization.removeprefix("Bearer ")
    head, sig = token.rsplit(".", 1)
    i = len(sig) // 2  # a middle character: the last one may only carry padding bits
    forged = f"Bearer {head}.{sig[:i]}{'B' if sig[i] == 'A' else 'A'}{sig[i + 1 :]}"
    for kind, (model, _) in KINDS.items():
        for what, headers in (("no token", None), ("a token with a broken signature", {"authorization": forged})):
            st, _, body = http_call(proxy_port, "POST", "/v1/chat/completions", request_body(model, kind == "stream"),
                                    headers)  # fmt: skip
            if st != 401:
                raise RuntimeError(f"check failed: {kind} request with {what} got HTTP {st}, want 401: {body[:300]!r}")


# --------------------------------------------------------------------------------------------------
# Measuring: wrk + a sampler for RSS and CPU
# --------------------------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError):
        pass
    return 0.0


def core_times() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            nums = [int(v) for v in vals]
            idle = nums[3] + (nums[4] if len(nums) > 4 else 0)
            out[name] = (sum(nums[:8]) - idle, sum(nums[:8]))
    return out


def task_cpu_seconds() -> float:
    """CPU time spent by tasks machine-wide (user + nice + system; not irq/softirq, which no task owns)."""
    nums = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (nums[0] + nums[1] + nums[2]) / CLK_TCK


def own_cpu_seconds() -> float:
    """This process plus its waited-for children (wrk, taskset)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_idle(timeout: float, threshold: float) -> float:
    """Wait until other processes use less than `threshold` % of one core (1 s samples); returns the last figure."""
    deadline = time.monotonic() + timeout
    told = False
    while True:
        a, t0 = task_cpu_seconds(), time.monotonic()
        time.sleep(1.0)
        busy = 100.0 * (task_cpu_seconds() - a) / (time.monotonic() - t0)
        if busy < threshold or time.monotonic() >= deadline:
            if told:
                print(f"  (machine now {busy:.0f}% busy)", flush=True)
            return busy
        if not told:
            print(f"  waiting for other processes to settle ({busy:.0f}% of a core busy) ...", flush=True)
            told = True


class Sampler:
    """Max RSS of the given processes while load runs (every 100 ms), plus CPU use over the run."""

    def __init__(self, pids: list[int], quiet_pids: list[int]) -> None:
        self.pids = pids
        self.quiet_pids = quiet_pids  # also ours (nginx, PostgreSQL): counted as ours in the noise figure
        self.max_rss = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in self.pids:
                self.max_rss[p] = max(self.max_rss[p], rss_mb(p))
            self._stop.wait(0.1)

    def __enter__(self) -> Sampler:
        self.t0 = time.monotonic()
        self.cpu0 = {p: proc_cpu_seconds(p) for p in self.pids}
        self.cores0 = core_times()
        self.task0 = task_cpu_seconds()
        self.quiet0 = {p: proc_cpu_seconds(p) for p in self.quiet_pids}
        self.ours0 = own_cpu_seconds() + sum(proc_cpu_seconds(p) for p in self.pids) + sum(self.quiet0.values())
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.monotonic() - self.t0
        self.cpu_s = {p: proc_cpu_seconds(p) - self.cpu0[p] for p in self.pids}
        self.cpu_pct = {p: 100.0 * v / wall for p, v in self.cpu_s.items()}
        cores1 = core_times()
        # (a process that exited meanwhile reads 0: its CPU is not counted as ours, nor as negative)
        self.quiet_cpu_s = {p: max(0.0, proc_cpu_seconds(p) - self.quiet0[p]) for p in self.quiet_pids}
        now_ours = sum(proc_cpu_seconds(p) for p in self.pids) + sum(self.quiet0.values())
        ours = own_cpu_seconds() + now_ours + sum(self.quiet_cpu_s.values()) - self.ours0
        self.noise_pct = max(0.0, 100.0 * (task_cpu_seconds() - self.task0 - ours) / wall)
        self.core_pct = {k: 100.0 * (cores1[k][0] - b) / max(1, cores1[k][1] - t) for k, (b, t) in self.cores0.items()}


@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mb_s: float


def run_wrk(
    url: str,
    body_file: Path,
    connections: int,
    seconds: int,
    cpus: set[int] | None,
    threads: int,
    authorization: str | None = None,
) -> WrkResult:
    cmd = [
        "wrk", f"-t{min(threads, connections)}", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(BENCH / "post.lua"), url, "--", str(body_file),
    ]  # fmt: skip
    if cpus is not None:
        cmd = ["taskset", "-c", cpu_list(cpus), *cmd]
    env = {k: v for k, v in os.environ.items() if k != "BENCH_AUTH"}
    if authorization:
        env["BENCH_AUTH"] = authorization  # post.lua sends it as the Authorization header (not on the command line)
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=seconds + 60, check=False, preexec_fn=_die_with_parent, env=env
    )
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if out.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    d = json.loads(line[len("BENCH_JSON ") :])
    secs = d["duration_us"] / 1e6
    lat = d["latency_us"]
    return WrkResult(
        rps=d["requests"] / secs,
        requests=d["requests"],
        errors=sum(d["errors"].values()),
        p50_ms=lat["p50"] / 1000.0,
        p90_ms=lat["p90"] / 1000.0,
        p99_ms=lat["p99"] / 1000.0,
        max_ms=lat["max"] / 1000.0,
        mb_s=d["bytes"] / secs / 1e6,
    )


@dataclass
class Measurement:
    target: str  # "direct" or a proxy variant key
    kind: str  # "json" | "stream"
    connections: int
    wrk: WrkResult
    cpu_pct: dict[str, float] = field(default_factory=dict)  # per proxy process
    core_pct: dict[str, float] = field(default_factory=dict)
    rss_max_mb: list[float] = field(default_factory=list)  # per proxy worker, during load
    rss_after_mb: list[float] = field(default_factory=list)  # per proxy worker, 1 s after load
    noise_pct: float = 0.0  # CPU used by other processes on the machine, % of one core
    cpu_us_per_req: float = 0.0  # proxy CPU time (all workers) per request
    db_cpu_us_per_req: float | None = None  # local PostgreSQL server CPU time per request (when pinned)
    redis_cpu_us_per_req: float | None = None  # the private Redis's CPU time per request (--limits-store private)
    rep: int = 1  # repetition (--repeat) of an interleaved comparison


KINDS = {"json": ("bench-json", "/v1/chat/completions"), "stream": ("bench-stream", "/stream/v1/chat/completions")}


def _settle_before_retry(args: argparse.Namespace) -> None:
    """Before a re-measurement: wait (within the retry budget) for other processes to settle."""
    t0 = time.monotonic()
    wait_idle(min(20.0, args.retry_budget), args.max_noise / 2)
    args.retry_budget -= time.monotonic() - t0


def _measurement(target: str, kind: str, connections: int, res: WrkResult, s: Sampler, pids: list[int]) -> Measurement:
    """A point from its wrk result and the sampler's figures for the processes `pids`."""
    m = Measurement(target, kind, connections, res)
    m.cpu_pct = {str(p): round(s.cpu_pct[p], 1) for p in pids}
    m.core_pct = {k: round(v, 1) for k, v in s.core_pct.items()}
    m.rss_max_mb = [round(s.max_rss[p], 1) for p in pids]
    m.rss_after_mb = [round(rss_mb(p), 1) for p in pids]
    m.noise_pct = round(s.noise_pct, 1)
    if pids and res.requests:
        m.cpu_us_per_req = round(1e6 * sum(s.cpu_s[p] for p in pids) / res.requests, 1)
    return m


def _print_point(m: Measurement, noisy: bool = False) -> None:
    res = m.wrk
    flag = f"  !! {res.errors} errors" if res.errors else ""
    cores = " ".join(f"{k}={v:.0f}%" for k, v in sorted(m.core_pct.items()))
    proc = (
        f" proxy cpu={sum(m.cpu_pct.values()):.0f}% ({m.cpu_us_per_req:.0f} us/req) rss={max(m.rss_max_mb):.0f}MB"
        if m.rss_max_mb
        else ""
    )
    if m.db_cpu_us_per_req is not None:
        proc += f" db={m.db_cpu_us_per_req:.0f} us/req"
    if m.redis_cpu_us_per_req is not None:
        proc += f" redis={m.redis_cpu_us_per_req:.0f} us/req"
    print(
        f"  {m.target:<8} {m.kind:<6} c={m.connections:<3} {res.rps:>9.0f} req/s  p50={res.p50_ms:.2f}ms "
        f"p99={res.p99_ms:.2f}ms  [{cores} other={m.noise_pct:.0f}%]{proc}{flag}"
        + ("  (noisy: other processes were busy)" if noisy else ""),
        flush=True,
    )


def measure(
    target: str,
    kind: str,
    port: int,
    path: str,
    body_file: Path,
    connections: int,
    args: argparse.Namespace,
    pids: list[int],
    quiet_pids: list[int],
    authorization: Callable[[], str] | None = None,
    db: DatabasePinning | None = None,
    redis: PrivateRedis | None = None,
) -> Measurement:
    """One point; re-measured (up to --retries times) when other processes took CPU meanwhile.

    With `db`, the database server's processes are (re-)pinned after the warm-up, counted as ours in the noise
    figure and their CPU time per request recorded; with `redis` (the private limits store), the same for its
    CPU time (it is pinned once, at its start)."""
    url = f"http://127.0.0.1:{port}{path}"
    best: Measurement | None = None
    for attempt in range(args.retries + 1):
        if attempt:
            _settle_before_retry(args)
        auth = authorization() if authorization else None
        if args.warmup:
            run_wrk(url, body_file, connections, args.warmup, args.load_cpus, args.threads, auth)
        db_pids = db.pin() if db is not None else []
        redis_pids = redis.pids() if redis is not None else []
        with Sampler(pids, quiet_pids + db_pids + redis_pids) as s:
            res = run_wrk(url, body_file, connections, args.duration, args.load_cpus, args.threads, auth)
        time.sleep(1.0)
        m = _measurement(target, kind, connections, res, s, pids)
        if db is not None and res.requests:
            m.db_cpu_us_per_req = round(1e6 * sum(s.quiet_cpu_s[p] for p in db_pids) / res.requests, 1)
        if redis is not None and res.requests:
            m.redis_cpu_us_per_req = round(1e6 * sum(s.quiet_cpu_s[p] for p in redis_pids) / res.requests, 1)
        noisy = m.noise_pct > args.max_noise
        _print_point(m, noisy)
        if best is None or m.noise_pct < best.noise_pct:
            best = m
        if attempt:
            args.retry_budget -= args.warmup + args.duration + 1
        if not noisy:
            break
        if args.retry_budget <= 0:
            if not args.budget_told:
                print("  (retry budget spent: keeping noisy points from now on; see --retry-budget)", flush=True)
                args.budget_told = True
            break
    assert best is not None
    return best


def measure_together(
    proxies: Sequence[Proxy],
    kind: str,
    body_file: Path,
    connections: int,
    args: argparse.Namespace,
    quiet_pids: list[int],
    db: DatabasePinning | None = None,
    redis: PrivateRedis | None = None,
) -> list[Measurement]:
    """One point for several proxies loaded at the same moment (--together): one wrk per proxy, started together,
    the proxies sharing the proxy CPU. What drifts on the machine over a run (other tenants, clock) then hits them
    alike, so their ratio of throughput (and of CPU per request) is steadier than from points taken one after the
    other. Each proxy gets about an equal share of the CPU (the kernel's fair scheduler), so its req/s is about
    half its single-proxy figure: the ratio is the point. Re-measured like measure() when other processes were busy."""
    urls = [f"http://127.0.0.1:{x.port}/v1/chat/completions" for x in proxies]

    def wrk_all(seconds: int) -> list[WrkResult]:
        with ThreadPoolExecutor(len(urls)) as pool:
            futs = [pool.submit(run_wrk, u, body_file, connections, seconds, args.load_cpus, args.threads)
                    for u in urls]  # fmt: skip
            return [f.result() for f in futs]

    best: list[Measurement] | None = None
    best_noise = 0.0
    for attempt in range(args.retries + 1):
        if attempt:
            _settle_before_retry(args)
        if args.warmup:
            wrk_all(args.warmup)
        db_pids = db.pin() if db is not None else []
        redis_pids = redis.pids() if redis is not None else []
        pid_sets = [x.workers() for x in proxies]
        with Sampler([p for ps in pid_sets for p in ps], quiet_pids + db_pids + redis_pids) as s:
            results = wrk_all(args.duration)
        time.sleep(1.0)
        db_us = sum(s.quiet_cpu_s[p] for p in db_pids) if db is not None else 0.0
        redis_us = sum(s.quiet_cpu_s[p] for p in redis_pids)
        # Redis serves the proxies with limits only: its CPU per request of those.
        limited = sum(r.requests for y, r in zip(proxies, results, strict=True) if y.variant.limits)
        # The database serves every proxy with a ledger: its CPU per row, for rows of those proxies.
        rows = sum(r.requests for y, r in zip(proxies, results, strict=True) if y.variant.ledger)
        out: list[Measurement] = []
        for x, pids, res in zip(proxies, pid_sets, results, strict=True):
            m = _measurement(x.variant.key, kind, connections, res, s, pids)
            if db is not None and any(r.requests for r in results):
                m.db_cpu_us_per_req = round(1e6 * db_us / rows, 1) if x.variant.ledger and rows else 0.0
            if redis is not None:
                m.redis_cpu_us_per_req = round(1e6 * redis_us / limited, 1) if x.variant.limits and limited else 0.0
            _print_point(m)
            out.append(m)
        if best is None or s.noise_pct < best_noise:
            best, best_noise = out, s.noise_pct
        if attempt:
            args.retry_budget -= args.warmup + args.duration + 1
        if s.noise_pct <= args.max_noise or args.retry_budget <= 0:
            break
        print("  (noisy: other processes were busy; measuring again)", flush=True)
    assert best is not None
    return best


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split("\n", 1)[0].split()[1])
        mem = f"{kb / 1024 / 1024:.0f} GiB"

    def version(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else "?"

    try:
        import aiohttp

        aiohttp_v = aiohttp.__version__
    except ImportError:
        aiohttp_v = "?"
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp_v,
        "nginx": version(["nginx", "-v"]).replace("nginx version: ", ""),
        "wrk": version(["wrk", "-v"]).split(" [")[0],
        "commit": commit + (" + uncommitted changes" if dirty else ""),
    }


def _fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def _pair(a: float, b: float) -> str:
    return f"{a:.2f} / {b:.2f}"


def geomean(values: Sequence[float]) -> float:
    return math.prod(values) ** (1.0 / len(values)) if values else float("nan")


def database_description(args: argparse.Namespace) -> str:
    if not args.database_url:
        return "SQLite in a temp dir; production would use PostgreSQL"
    if "postgres" not in args.database_url:
        return str(args.database_url).split(":", 1)[0]
    return "PostgreSQL on this machine" if local_postgres(args.database_url) else "PostgreSQL"


Point = tuple[str, int, Measurement, Measurement]  # kind, connections, with the feature, without it


def pair_points(
    ms: Sequence[Measurement], pair: tuple[ProxyVariant, ProxyVariant], args: argparse.Namespace, rep: int
) -> list[Point]:
    on, off = pair
    by = {(m.target, m.kind, m.connections): m for m in ms if m.rep == rep}
    return [
        (kind, c, by[(on.key, kind, c)], by[(off.key, kind, c)])
        for kind in args.kinds
        for c in args.connections
        if (on.key, kind, c) in by and (off.key, kind, c) in by
    ]


def build_pair_section(
    ms: Sequence[Measurement],
    v: ProxyVariant,
    variants: Sequence[ProxyVariant],
    args: argparse.Namespace,
    info: dict[str, str],
) -> str | None:
    """The section of a comparison (`v.section`): with / without the feature, every repetition, ratios."""
    pair = feature_pair(v, variants)
    if pair is None or v.section is None:
        return None
    on, off = pair
    reps = sorted({m.rep for m in ms if m.target in (on.key, off.key)})
    runs = {r: pair_points(ms, pair, args, r) for r in reps}
    runs = {r: pts for r, pts in runs.items() if pts}
    if not runs:
        return None
    feat = v.feature
    has_db = any(m.db_cpu_us_per_req is not None for pts in runs.values() for _, _, a, b in pts for m in (a, b))
    has_redis = any(m.redis_cpu_us_per_req is not None for pts in runs.values() for _, _, a, b in pts
                    for m in (a, b))  # fmt: skip
    head = ["workload", "conns", feat]
    for r in runs:
        head += [f"run {r} req/s", f"run {r} proxy CPU µs/req"] + ([f"run {r} PostgreSQL CPU µs/req"] if has_db else [])
        head += [f"run {r} Redis CPU µs/req"] if has_redis else []
    rows = ["| " + " | ".join(head) + " |", "|---|--:|---|" + "--:|" * (len(head) - 3)]

    def db_cell(m: Measurement) -> list[str]:
        out = [f"{m.db_cpu_us_per_req:.0f}" if m.db_cpu_us_per_req is not None else "-"] if has_db else []
        if has_redis:
            out.append(f"{m.redis_cpu_us_per_req:.1f}" if m.redis_cpu_us_per_req is not None else "-")
        return out

    first = next(iter(runs.values()))
    for i, (kind, c, _, _) in enumerate(first):
        workload = "chat JSON" if kind == "json" else f"SSE {N_CHUNKS}+usage (streams/s)"
        r_on, r_off, r_ratio = [workload, str(c), "on"], [workload, str(c), "off"], [workload, str(c), "on / off"]
        for pts in runs.values():
            _, _, a, b = pts[i]
            err_a = f" ({a.wrk.errors} errors!)" if a.wrk.errors else ""
            err_b = f" ({b.wrk.errors} errors!)" if b.wrk.errors else ""
            r_on += [f"{_fmt_rps(a.wrk.rps)}{err_a}", f"{a.cpu_us_per_req:.0f}", *db_cell(a)]
            r_off += [f"{_fmt_rps(b.wrk.rps)}{err_b}", f"{b.cpu_us_per_req:.0f}", *db_cell(b)]
            cpu = a.cpu_us_per_req / b.cpu_us_per_req if b.cpu_us_per_req else float("nan")
            r_ratio += [f"**{a.wrk.rps / b.wrk.rps:.2f}**", f"{cpu:.2f} ({a.cpu_us_per_req - b.cpu_us_per_req:+.0f})"]
            r_ratio += [""] * (has_db + has_redis)
        rows += ["| " + " | ".join(r) + " |" for r in (r_on, r_off, r_ratio)]

    all_ratios = [a.wrk.rps / b.wrk.rps for pts in runs.values() for _, _, a, b in pts]
    gm_all = geomean(all_ratios)
    per_run = ", ".join(
        f"run {r} **{geomean([a.wrk.rps / b.wrk.rps for _, _, a, b in pts]):.3f}**" for r, pts in runs.items()
    )
    extra = [a.cpu_us_per_req - b.cpu_us_per_req for pts in runs.values() for _, _, a, b in pts]
    off_cpu = [b.cpu_us_per_req for pts in runs.values() for _, _, _, b in pts]
    target = v.target_ratio
    mark = "PASS" if gm_all >= target else "FAIL"
    bullets = [
        f"- {mark}: throughput {feat} on / off, geometric mean of the points: {per_run}"
        + (f"; all {len(all_ratios)} points **{gm_all:.3f}**" if len(runs) > 1 else "")
        + f" (target >= {target:.2f}; lowest point {min(all_ratios):.2f}, "
        f"highest {max(all_ratios):.2f}).",
        f"- Proxy CPU per request, {feat} on minus off: {min(extra):+.0f} to {max(extra):+.0f} µs "
        f"(mean {sum(extra) / len(extra):+.0f} µs on a mean of {sum(off_cpu) / len(off_cpu):.0f} µs without it; "
        "CPU µs/req is the figure least disturbed by other load; the ratio column is on / off, the bracket the "
        "difference).",
    ]
    def server_cpu(name: str, attr: str, fmt: str, tail: str) -> str:
        on_ = [getattr(a, attr) or 0.0 for pts in runs.values() for _, _, a, _ in pts]
        off_ = [getattr(b, attr) or 0.0 for pts in runs.values() for _, _, _, b in pts]
        return (f"- {name} CPU per request: {min(on_):{fmt}}-{max(on_):{fmt}} µs with the {feat} on, "
                f"{min(off_):{fmt}}-{max(off_):{fmt}} µs with it off; spent on the load CPU "
                f"({cpu_list(args.load_cpus)}){tail}.")  # fmt: skip

    if has_db:
        bullets.append(server_cpu("PostgreSQL server", "db_cpu_us_per_req", ".0f", ", not the proxy's"))
    if has_redis:
        bullets.append(server_cpu("Redis (the limits store)", "redis_cpu_us_per_req", ".1f", ""))
    noise = [m.noise_pct for pts in runs.values() for _, _, a, b in pts for m in (a, b)]
    errors = sum(m.wrk.errors for pts in runs.values() for _, _, a, b in pts for m in (a, b))
    bullets.append(
        f"- Other processes used at most {max(noise):.0f}% of a core during these points (re-measured above "
        f"{args.max_noise:.0f}%); request errors: {errors}."
    )
    now = args.started.strftime("%Y-%m-%d %H:%M %Z")
    order = "on, off, off, on, ..." if v.removes else "off, on, on, off, ..."  # the baseline goes first
    rep_note = (
        f" {len(runs)} repetitions (`--repeat {len(runs)}`): the whole set of points measured {len(runs)} times over, "
        "the alternation continuing."
        if len(runs) > 1
        else ""
    )
    lines = [
        v.section,
        "",
        f"Run {now} with `{args.command}`; commit {info['commit']}.",
        "",
        f'"on" = {on.label}; "off" = {off.label}: {v.feature_note} Same machine, upstream, load and pinning as '
        f'"Core gateway throughput" (proxy on CPU {cpu_list(args.proxy_cpus)}, wrk and nginx on CPU '
        f"{cpu_list(args.load_cpus)}; {args.duration} s per point after {args.warmup} s warm-up); usage database: "
        f"{database_description(args)}. " + (
            f"Both proxies run at once, both on CPU {cpu_list(args.proxy_cpus)}, and every point loads them at the "
            "same moment (`--together`: one wrk each, started together), so whatever drifts on the shared machine "
            "hits both alike; each gets about half of the core (the kernel's fair scheduler), so each one's req/s is "
            "about half of what it does alone, and their ratio is the figure."
            if args.together else
            f"Both proxies run at once and are measured point by point in alternating order ({order}), so drift "
            "of the shared machine over the run does not decide their ratio."
        ) + f"{rep_note}" + (f" {args.db_note}." if args.db_note else "")
        + (f" {args.redis_note}." if v.limits and args.redis_note else ""),
        "",
        *rows,
        "",
        *bullets,
        "",
    ]
    return "\n".join(lines)


def build_report(
    ms: list[Measurement], variants: list[ProxyVariant], args: argparse.Namespace, info: dict[str, str]
) -> str:
    """Markdown body of the section (table and target verdicts). With --repeat, the first repetition."""
    direct = {(m.kind, m.connections): m for m in ms if m.target == "direct"}
    by = {(m.target, m.kind, m.connections): m for m in ms if m.rep == 1}
    rows = [
        "| proxy | workload | conns | direct req/s | proxy req/s | ratio | direct p50 / p99 ms "
        "| proxy p50 / p99 ms | added p50 / p99 ms | proxy CPU % | CPU us/req | RSS MB max / after | other CPU % |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for v in variants:
        for kind in args.kinds:
            for c in args.connections:
                m = by.get((v.key, kind, c))
                d = direct.get((kind, c))
                if m is None or d is None:
                    continue
                w, dw, dm = m.wrk, d.wrk, d
                workload = "chat JSON" if kind == "json" else f"SSE {N_CHUNKS}+usage (streams/s)"
                cpu = "+".join(f"{x:.0f}" for x in m.cpu_pct.values())
                rss = f"{max(m.rss_max_mb):.0f} / {max(m.rss_after_mb):.0f}"
                if len(m.rss_max_mb) > 1:
                    rss += " per worker"
                err = f" ({w.errors} errors!)" if w.errors else ""
                rows.append(
                    f"| {v.label} | {workload} | {c} | {_fmt_rps(dw.rps)} | {_fmt_rps(w.rps)}{err} "
                    f"| {w.rps / dw.rps:.3f} | {_pair(dw.p50_ms, dw.p99_ms)} | {_pair(w.p50_ms, w.p99_ms)} "
                    f"| {_pair(w.p50_ms - dw.p50_ms, w.p99_ms - dw.p99_ms)} | {cpu} | {m.cpu_us_per_req:.0f} | {rss} "
                    f"| {dm.noise_pct:.0f} / {m.noise_pct:.0f} |"
                )

    verdicts: list[str] = []

    def verdict(ok: bool | None, text: str) -> None:
        mark = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        verdicts.append(f"- {mark} {text}")

    paired = {k for v in variants if feature_pair(v, variants) for k in (v.key, v.baseline)}
    for v in variants:
        if v.workers != 1 or v.floor or (args.together and v.key in paired):
            continue  # (--together: these proxies shared one core, their absolute figures are not the targets')
        tag = f"[{v.label}]"
        m = by.get((v.key, "json", 64))
        if m:
            verdict(m.wrk.rps >= TARGET_RPS_64, f"{tag} non-streaming at 64 conns: {m.wrk.rps:,.0f} req/s "
                    f"(target >= {TARGET_RPS_64:,.0f})")  # fmt: skip
        m, d = by.get((v.key, "json", 8)), direct.get(("json", 8))
        if m and d:
            a50, a99 = m.wrk.p50_ms - d.wrk.p50_ms, m.wrk.p99_ms - d.wrk.p99_ms
            verdict(a50 <= TARGET_ADDED_P50_MS and a99 <= TARGET_ADDED_P99_MS,
                    f"{tag} added latency at 8 conns: p50 {a50:.2f} ms, p99 {a99:.2f} ms "
                    f"(target <= {TARGET_ADDED_P50_MS} / <= {TARGET_ADDED_P99_MS} ms)")  # fmt: skip
        best = max((x.wrk.rps for x in ms if x.target == v.key and x.kind == "stream"), default=None)
        if best is not None:
            verdict(best >= TARGET_STREAMS, f"{tag} streaming: {best:,.0f} streams/s at best "
                    f"(target >= {TARGET_STREAMS:,.0f})")  # fmt: skip
        peak = max((max(x.rss_max_mb) for x in ms if x.target == v.key), default=None)
        if peak is not None:
            verdict(peak <= TARGET_RSS_MB, f"{tag} RSS under load: {peak:.0f} MB max "
                    f"(target <= {TARGET_RSS_MB:.0f} MB)")  # fmt: skip
    for v in variants:
        pair = feature_pair(v, variants)
        pts = pair_points(ms, pair, args, rep=1) if pair else []
        if not pair or not pts:
            continue
        on, off = pair
        ratios = [m.wrk.rps / b.wrk.rps for _, _, m, b in pts]
        gmean = geomean(ratios)
        text = ", ".join(
            f"{'JSON' if kind == 'json' else 'SSE'} c{c} {m.wrk.rps:,.0f} / {b.wrk.rps:,.0f} = "
            f"{m.wrk.rps / b.wrk.rps:.2f} (CPU {m.cpu_us_per_req:.0f} / {b.cpu_us_per_req:.0f} us/req)"
            for kind, c, m, b in pts
        )
        verdict(gmean >= v.target_ratio, f"[{on.label}] vs [{off.label}]: req/s ratio {gmean:.3f} "
                f"(geometric mean of the points; target >= {v.target_ratio:.2f}; lowest point "
                f"{min(ratios):.2f}): {text}")  # fmt: skip
    one = next((v for v in variants if v.workers == 1 and v.access_log and v.ledger and not v.oidc), None)
    for v in variants:
        if v.workers == 1 or one is None:
            continue
        for kind in args.kinds:
            a, b = by.get((one.key, kind, 64)), by.get((v.key, kind, 64))
            if a and b:
                f = b.wrk.rps / a.wrk.rps
                verdict(f >= TARGET_SCALING, f"[{v.label}] {kind} at 64 conns: {f:.2f}x one worker "
                        f"(expect >= {TARGET_SCALING}x here: wrk and nginx share the 2 cores)")  # fmt: skip
        peak = max((max(x.rss_max_mb) for x in ms if x.target == v.key), default=None)
        if peak is not None:
            verdict(peak <= TARGET_RSS_MB, f"[{v.label}] RSS under load: {peak:.0f} MB max per worker "
                    f"(target <= {TARGET_RSS_MB:.0f} MB)")  # fmt: skip

    pc, lc = cpu_list(args.proxy_cpus), cpu_list(args.load_cpus)
    db = database_description(args)
    now = args.started.strftime("%Y-%m-%d %H:%M %Z")
    oidc = next((v for v in variants if v.oidc), None)
    auth_note = (
        f' "{oidc.label}" = "defaults" with `auth.mode: oidc`: one trusted issuer, the OpenID provider of the auth '
        "tests (tests/oidc/op.mjs, npm oidc-provider under Node, on this machine; idle while measuring), audience "
        f"{OIDC_AUDIENCE}; wrk sends one RS256 client-credentials access token as `Authorization: Bearer` on every "
        "request (`BENCH_AUTH`), so after its first request the proxy finds it in its verified-token cache "
        "(SHA-256 of the token, kept until `exp`). The harness checks first that the token gets 200 and that no "
        "token, or a broken signature, gets 401."
        + (
            f' Both "{oidc.label}" and its no-auth counterpart run at once (both on CPU {pc}, the idle one '
            "uses next to nothing) and are measured point by point in alternating order, so drift of the shared "
            "machine over the run does not decide their ratio."
            if oidc.baseline in {v.key for v in variants}
            else ""
        )
        if oidc
        else ""
    )
    lines = [
        SECTION,
        "",
        f"Run {now} with `{args.command}`; commit {info['commit']}.",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory']}, Linux {info['kernel']}; "
        f"Python {info['python']}, aiohttp {info['aiohttp']}, uvloop; nginx {info['nginx']}; {info['wrk']}.",
        "",
        f"Setup: upstream = nginx, 1 worker, fixed bodies from memory (`return 200`; chat.completion "
        f"{len(upstream_json_body())} B, SSE {len(upstream_sse_body())} B = {N_CHUNKS} chunks + usage chunk + "
        f"[DONE], content-length framed). Load = wrk, 1 thread, keep-alive, `bench/post.lua` "
        f"({len(request_body('bench-json', False))} B request body), {args.duration} s per point after "
        f"{args.warmup} s warm-up. Streaming requests send `stream_options.include_usage` and count as done "
        "when the whole stream has been read (streams/s).",
        "",
        f'Pinning: proxy on CPU {pc}; wrk and nginx on CPU {lc} while the proxy is measured; for "direct" '
        f"nginx moves to CPU {pc} (wrk stays on {lc}). `--workers 2` runs on CPUs "
        f"{cpu_list(args.all_cpus)} while wrk and nginx also need CPU {lc}, so 2x is out of reach on this box. "
        + (f"{args.db_note}. " if args.db_note else "")
        + f"Proxy config: auth none{' (but the OIDC rows)' if oidc else ''}, one openai_compat provider per workload. "
        '"defaults" = production defaults: access log on (one JSON line per request to stderr, here a file) and '
        f"usage ledger on (journal file + database, here {db}).{auth_note}",
        "",
        "Added latency = proxy percentile - direct percentile at the same connection count. With a closed "
        "loop (wrk), latency at saturation is mostly queueing: about connections / throughput. Proxy CPU % is "
        "per worker (100 = one core); CPU us/req = proxy CPU time (all workers) / requests, the figure least "
        "disturbed by other load. Other CPU % = CPU used by unrelated processes during the direct / proxy "
        f"point, in % of one core (a point is re-measured when it exceeds {args.max_noise:.0f}%).",
        "",
        *rows,
        "",
        "Targets (one worker pinned to one core, load on the other):",
        "",
        *verdicts,
        "",
    ]
    return "\n".join(lines)


HISTORY = "Runs of this comparison so far"  # a hand-kept paragraph that a new run of its section keeps


def write_results(section: str, path: Path, title: str = SECTION) -> None:
    """Replace the section `title` (up to the next `## `) of `path`, or append it. A paragraph of the old section
    that starts with HISTORY (up to the section's end) is carried over, after the new figures."""
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    pattern = re.compile(rf"^{re.escape(title)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    old = pattern.search(text)
    if old:
        at = old.group(0).find("\n" + HISTORY)
        if at >= 0 and HISTORY not in section:
            section = section.rstrip("\n") + "\n\n" + old.group(0)[at + 1 :].rstrip("\n") + "\n"
        text = pattern.sub(lambda _m: section.rstrip("\n") + "\n\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    path.write_text(text.rstrip("\n") + "\n")


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_cpus(text: str) -> set[int] | None:
    if text in ("", "any", "none"):
        return None
    out: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick",
        action="store_true",
        help="~30 s smoke run: 2 s points, 1 worker with access log only; does not touch RESULTS.md",
    )
    p.add_argument("--duration", type=int, default=None, help="seconds per measured point (default 10)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up seconds before each point (default 2)")
    p.add_argument("--connections", default=None, help="comma-separated connection counts (default 8,64)")
    p.add_argument(
        "--variants",
        default=None,
        help="proxy variants: log (1 worker, production defaults: access log and usage ledger on), oidc (log with "
        "auth.mode oidc against tests/oidc/op.mjs, one bearer token on every request; needs Node.js and "
        "`make node-deps`), noledger (log with usage.enabled false; measured interleaved with log), nolog (access "
        "log off), bare (access log and ledger off), floor (bench/floor.py: bare aiohttp pass-through, for "
        "reference), w2 (2 workers, defaults), limits (log with three limit rules on --limits-store; measured "
        "interleaved with log); default log,oidc,noledger,nolog,bare,floor,w2",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure interleaved comparisons (a variant with its baseline selected too) this many times over; "
        "the core table shows the first repetition, a comparison's own section all of them (default 1)",
    )
    p.add_argument(
        "--together",
        action="store_true",
        help="comparisons: load both proxies at the same moment (one wrk each, both proxies on the proxy CPU, sharing "
        "it) instead of one after the other; the machine's drift then hits both alike (see RESULTS.md)",
    )
    p.add_argument("--kinds", default="json,stream", help="json,stream (default both)")
    p.add_argument("--proxy-cpus", default="0", help="CPUs of the (single-worker) proxy (default 0)")
    p.add_argument("--load-cpus", default="1", help="CPUs of wrk (and of nginx while the proxy runs) (default 1)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--max-noise",
        type=float,
        default=15.0,
        help="re-measure a point when other processes used more than this %% of a core (default 15)",
    )
    p.add_argument("--retries", type=int, default=2, help="re-measurements of a noisy point (default 2)")
    p.add_argument(
        "--retry-budget",
        type=float,
        default=None,
        help="seconds the whole run may spend re-measuring noisy points (default 180; --quick 20)",
    )
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md even with --quick")
    p.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    p.add_argument("--results", default=str(RESULTS), help="results file (default bench/RESULTS.md)")
    p.add_argument(
        "--src",
        default=None,
        help="run the proxy from this source directory instead of the installed package (A/B runs), e.g. "
        "`git archive HEAD | tar -x -C /tmp/base` then --src /tmp/base/src",
    )
    p.add_argument("--src-label", default=None, help="what --src is, for RESULTS.md (e.g. 'HEAD 1234abc')")
    p.add_argument(
        "--database-url",
        default=None,
        help="usage ledger database (default: SQLite in the temp dir), e.g. postgresql+asyncpg://user:pw@host/db",
    )
    p.add_argument("--limits-store", default="private",
                   help="limits.store of the limits variant: `private` (default) starts a redis-server of the bench's "
                   "own on a Unix socket, pinned to the load CPUs and stopped at the end; or a URL, e.g. "
                   "redis://127.0.0.1:6379/15")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)  # used by bench/profile_proxy.py
    args = p.parse_args(argv)
    args.command = ("python bench/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])).rstrip()
    args.command = re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", args.command)  # no database password in RESULTS.md
    if args.quick:
        args.duration = args.duration or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        args.variants = args.variants or "log"
    args.duration = args.duration or 10
    args.retry_budget = args.retry_budget if args.retry_budget is not None else (20.0 if args.quick else 180.0)
    args.budget_told = False
    args.warmup = 2 if args.warmup is None else args.warmup
    args.connections = [int(c) for c in (args.connections or "8,64").split(",")]
    args.variants = (args.variants or DEFAULT_VARIANTS).split(",")
    args.kinds = [k for k in args.kinds.split(",") if k]
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    args.db_note = ""  # set by main() when it pins a local PostgreSQL
    args.redis_note = ""  # set by main() when it starts the private Redis
    for k in args.kinds:
        if k not in KINDS:
            p.error(f"unknown kind {k!r}")
    args.write = (args.write or not args.quick) and not args.no_write
    ncpu = os.cpu_count() or 1
    if ncpu < 2:
        print("bench: fewer than 2 CPUs: running unpinned (figures are not comparable to the targets)")
        args.proxy_cpus = args.load_cpus = args.all_cpus = None
    else:
        args.proxy_cpus = parse_cpus(args.proxy_cpus)
        args.load_cpus = parse_cpus(args.load_cpus)
        args.all_cpus = set(range(ncpu))
    return args


LIMITS_STORE = ["unix:///nonexistent"]  # the limits variant's store: --limits-store, or the private Redis

VARIANTS = {
    "log": ProxyVariant("log", "1 worker, defaults", 1, True),
    "oidc": ProxyVariant(
        "oidc", "1 worker, defaults + OIDC bearer", 1, True, oidc=True, baseline="log", feature="OIDC bearer auth"
    ),
    "noledger": ProxyVariant(
        "noledger",
        "1 worker, defaults but usage ledger off",
        1,
        True,
        False,
        baseline="log",
        feature="usage ledger",
        removes=True,
        feature_note="the same config with `usage.enabled: false` (no journal, no database writes; the access log "
        "stays on in both, to the same kind of file).",
        section="## Usage ledger cost (on vs off)",
    ),
    "nometrics": ProxyVariant(
        "nometrics",
        "1 worker, defaults but metrics off",
        baseline="log",
        feature="Prometheus metrics",
        removes=True,
        feature_note="the same config with `server.metrics.enabled: false` (nothing counted per request; nobody "
        "scrapes /metrics during the run).",
        section="## Metrics cost (on vs off)",
        metrics=False,
        target_ratio=0.97,  # issue 16: metrics cost <= 3% of throughput
    ),
    "limits": ProxyVariant(
        "limits",
        "1 worker, defaults + three limit rules on Redis",
        1,
        True,
        limits=True,
        baseline="log",
        feature="limits",
        feature_note="the same config plus `limits` with three rules (requests per minute per user, tokens per day "
        "per user, USD per month global; never reached) on the store of --limits-store (default a private "
        "redis-server), and a `price` on the models: one Lua call to admit per request, the charges of the answers "
        "of a few ms summed into one call per rule set.",
        section="## Limits cost (on vs off)",
    ),
    "nolog": ProxyVariant("nolog", "1 worker, access log off", 1, False),
    "w2": ProxyVariant("w2", "2 workers, defaults", 2, True),
    "bare": ProxyVariant("bare", "1 worker, access log + ledger off", 1, False, False),
    "floor": ProxyVariant(
        "floor",
        "reference: bare aiohttp pass-through (bench/floor.py)",
        1,
        False,
        False,
        True,
        baseline="log",
        feature="gateway's own work",
        removes=True,
        feature_note="bench/floor.py: aiohttp's server and client relaying the bytes as they come (no auth, access "
        "log, usage ledger, metrics or stream decoding); \"on\" is the proxy with its defaults. Issue 12: streams "
        ">= 1.0x the floor, non-streamed at parity.",
        section="## Proxy vs bare aiohttp pass-through (interleaved)",
        target_ratio=1.0,
    ),
}
DEFAULT_VARIANTS = "log,oidc,noledger,nolog,bare,floor,w2"


def measuring_groups(variants: list[ProxyVariant], hold: bool = False) -> list[list[ProxyVariant]]:
    """The variants in measuring order. A variant whose baseline is also selected (oidc or noledger with log) forms
    one group with it: the proxies run at once and are measured point by point in alternating order (A B, B A, ...), so
    that slow drift of a shared machine over the run does not decide their ratio."""
    keys = {v.key for v in variants}
    groups: list[list[ProxyVariant]] = []
    placed: set[str] = set()
    for v in variants:
        if v.key in placed:
            continue
        group = [v]
        if not hold:
            if v.baseline in keys and v.baseline not in placed:
                group.insert(0, next(b for b in variants if b.key == v.baseline))
            group += [w for w in variants if w.baseline == group[0].key and w.key not in placed and w not in group]
        placed.update(x.key for x in group)
        groups.append(group)
    return groups


def find_tools(openid_provider: bool = False) -> str:
    places = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
    nginx = shutil.which("nginx") or next((p for p in places if os.access(p, os.X_OK)), None)
    missing = [name for name, path in (("nginx", nginx), ("wrk", shutil.which("wrk"))) if not path]
    if not shutil.which("taskset"):
        missing.append("taskset (package util-linux)")
    if missing:
        print(f"bench: missing {', '.join(missing)}. Install with:\n  {INSTALL_HINT}", file=sys.stderr)
        raise SystemExit(2)
    if openid_provider:
        if not shutil.which("node"):
            missing.append("node (Node.js 20+)")
        if not (OP_DIR / "node_modules" / "oidc-provider" / "package.json").is_file():
            missing.append("tests/oidc/node_modules (npm package oidc-provider)")
        if missing:
            print(f"bench: the oidc variant needs {', '.join(missing)}. Install with:\n  {OP_HINT}\n"
                  "(or leave it out: --variants log,noledger,nolog,bare,floor,w2)", file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
    assert nginx is not None
    return nginx


@contextlib.contextmanager
def workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="llm-proxy-bench-"))
    try:
        yield d
    finally:
        if keep:
            print(f"bench: kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def _terminate(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the `finally` blocks that stop nginx and the proxy


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.started = dt.datetime.now().astimezone()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    for v in args.variants:
        if v not in VARIANTS:
            print(f"bench: unknown variant {v!r} (choose from {', '.join(VARIANTS)})", file=sys.stderr)
            return 2
    variants = [VARIANTS[v] for v in args.variants]
    nginx_bin = find_tools(openid_provider=any(v.oidc for v in variants))
    info = machine_info()
    if args.src:
        args.src = str(Path(args.src).resolve())
        info["commit"] = args.src_label or f"proxy code from {args.src} (not the working tree)"
    print(f"bench: {info['nproc']} CPUs ({info['cpu']}); proxy CPU {cpu_list(args.proxy_cpus)}, "
          f"load CPU {cpu_list(args.load_cpus)}; {args.duration} s points, {args.warmup} s warm-up")  # fmt: skip
    busy = wait_idle(60, args.max_noise)
    if busy >= args.max_noise:
        print(f"bench: WARNING: other processes keep {busy:.0f}% of a core busy; figures will be low", flush=True)
    ms: list[Measurement] = []
    with workdir(args.keep) as tmp:
        bodies: dict[tuple[str, bool], Path] = {}
        for kind, (model, _) in KINDS.items():
            for via_proxy in (False, True):
                f = tmp / f"body-{kind}-{'proxy' if via_proxy else 'direct'}.json"
                f.write_bytes(request_body(model if via_proxy else UPSTREAM_MODEL, kind == "stream"))
                bodies[(kind, via_proxy)] = f
        upstream = Nginx(nginx_bin, tmp)
        op: BenchOP | None = None
        db: DatabasePinning | None = None
        redis: PrivateRedis | None = None
        upstream.start()
        try:
            if any(v.limits for v in variants):
                redis = start_limits_store(args, tmp)
            if local_postgres(args.database_url) and args.load_cpus is not None:
                db = DatabasePinning(args.database_url, args.load_cpus)
                try:
                    db.start()
                except Exception as exc:
                    raise RuntimeError(f"PostgreSQL of --database-url: {type(exc).__name__}: {exc}") from exc
                print(f"bench: {db.describe()}", flush=True)
            print("direct (nginx alone):", flush=True)
            upstream.pin(args.proxy_cpus)
            for kind in args.kinds:
                for c in args.connections:
                    ms.append(measure("direct", kind, upstream.port, KINDS[kind][1], bodies[(kind, False)], c,
                                      args, [], upstream.pids()))  # fmt: skip
            upstream.pin(args.load_cpus)
            for group in measuring_groups(variants, args.hold):
                if any(v.oidc for v in group) and op is None:
                    op = BenchOP()
                    op.start()
                    print(f"OpenID provider (tests/oidc/op.mjs): issuer {op.issuer}", flush=True)
                proxies: list[Proxy] = []
                auths: dict[str, Callable[[], str] | None] = {}
                try:
                    for v in group:
                        cpus = args.proxy_cpus if v.workers == 1 else args.all_cpus
                        proxy = Proxy(tmp, upstream.port, v, cpus, args.src, args.database_url, op if v.oidc else None)
                        proxies.append(proxy)
                        print(f"proxy ({v.label}; CPU {cpu_list(cpus)}):", flush=True)
                        proxy.start()
                        auth = auths[v.key] = op.authorization if v.oidc and op is not None else None
                        if not v.floor:
                            check_proxy(proxy.port, upstream.port, auth() if auth else None)
                        if auth:
                            check_auth_enforced(proxy.port, auth())
                    if args.hold:
                        proxy = proxies[0]
                        print(f"bench: holding proxy pid {proxy.proc.pid if proxy.proc else '?'} on port "
                              f"{proxy.port}; Ctrl-C to stop", flush=True)  # fmt: skip
                        with contextlib.suppress(KeyboardInterrupt):
                            signal.pause()
                        continue
                    reps = args.repeat if len(proxies) > 1 else 1
                    if len(proxies) > 1:
                        how = ("loaded together, sharing CPU " + cpu_list(args.proxy_cpus) if args.together
                               else "measured point by point in alternating order")  # fmt: skip
                        print(f"  ({' and '.join(x.variant.key for x in proxies)}: all up, {how}"
                              f"{f', {reps} times over' if reps > 1 else ''})", flush=True)  # fmt: skip
                    points = [(kind, c) for kind in args.kinds for c in args.connections]
                    for i, (r, kind, c) in enumerate((r, k, c) for r in range(1, reps + 1) for k, c in points):
                        if args.together and len(proxies) > 1:
                            for m in measure_together(proxies, kind, bodies[(kind, True)], c, args, upstream.pids(),
                                                      db, redis):  # fmt: skip
                                m.rep = r
                                ms.append(m)
                            continue
                        for proxy in proxies if i % 2 == 0 else proxies[::-1]:
                            v = proxy.variant
                            pids = proxy.workers()
                            others = upstream.pids() + ([proxy.proc.pid] if proxy.proc and v.workers > 1 else [])
                            m = measure(v.key, kind, proxy.port, "/v1/chat/completions", bodies[(kind, True)], c,
                                        args, pids, others, auths[v.key], db, redis)  # fmt: skip
                            m.rep = r
                            ms.append(m)
                    for proxy in proxies:
                        if proxy.proc is not None and proxy.proc.poll() is not None:
                            raise RuntimeError(f"the proxy exited during the run:\n{proxy.tail_log()}")
                        size = proxy.log_path.stat().st_size if proxy.log_path.exists() else 0
                        print(f"  ({proxy.variant.key} proxy log: {size / 1e6:.1f} MB)", flush=True)
                finally:
                    for proxy in proxies:
                        proxy.stop()
        finally:
            upstream.stop()
            if redis is not None:
                redis.stop()
                args.redis_note = redis.describe()
                print("bench: stopped the private Redis", flush=True)
            if op is not None:
                print(f"  (OpenID provider: {op.tokens} access token(s) fetched)", flush=True)
                op.close()
            if db is not None:
                db.restore()
                told = f"restored the CPU affinity of {db.restored} PostgreSQL processes"
                if db.restore_errors:
                    told += f"; FAILED for {len(db.restore_errors)}: {'; '.join(db.restore_errors[:3])}"
                print(f"bench: {told}", flush=True)
                if db.errors:
                    print(f"bench: could not pin {len(db.errors)} PostgreSQL processes: {'; '.join(db.errors[:3])}",
                          flush=True)  # fmt: skip
                failed = f", except {len(db.restore_errors)}" if db.restore_errors else ""
                args.db_note = f"{db.describe()}; affinity restored at the end ({db.restored} still running{failed})"
    if args.hold:
        return 0

    sections = [(v.section, build_pair_section(ms, v, variants, args, info)) for v in variants if v.section]
    paired = {k for v in variants if v.section and feature_pair(v, variants) for k in (v.key, v.baseline)}
    section = build_report(ms, variants, args, info)
    write_core = any(v.key not in paired for v in variants)
    print()
    print(section)
    for _, text in sections:
        if text:
            print()
            print(text)
    OUT.mkdir(exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    raw = OUT / f"core-{stamp}.json"
    raw.write_text(json.dumps({"info": info, "command": args.command,
                               "measurements": [asdict(m) for m in ms]}, indent=1))  # fmt: skip
    print(f"bench: raw figures in {raw.relative_to(ROOT)}")
    if args.write:
        if write_core:
            write_results(section, Path(args.results))
            print(f"bench: updated section {SECTION!r} in {args.results}")
        else:
            print(f"bench: comparison pairs only: section {SECTION!r} left as it is")
        for title, text in sections:
            if title and text:
                write_results(text, Path(args.results), title)
                print(f"bench: updated section {title!r} in {args.results}")
    errors = sum(m.wrk.errors for m in ms)
    if errors:
        print(f"bench: {errors} request errors during the run: figures are suspect", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
