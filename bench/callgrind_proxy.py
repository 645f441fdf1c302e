#!/usr/bin/env python3
"""Instructions per request of the proxy process (valgrind callgrind), for judging an optimisation.

    .venv/bin/python bench/callgrind_proxy.py [--requests 400] [--connections 8] [--kinds json,stream]
        [--variant log|floor]
        [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/llm_proxy_bench] [--src DIR]

Instructions do not depend on the load of a shared box, unlike wall-clock figures. The proxy runs the `log`
variant of bench/run.py (access log, usage ledger) under `valgrind --tool=callgrind --instr-atstart=no`;
the upstream is a small asyncio server on loopback (outside valgrind) answering with bench/run.py's fixed
bodies, content-length framed, headers and body in one write (as nginx sends them). Per kind: a warm-up,
then instrumentation on, `--requests` requests over `--connections` keep-alive connections, a dump;
instructions / requests is printed (the whole process: the event loop, aiohttp, the ledger writer...).
`--keep` leaves the callgrind.out files in bench/out/ for callgrind_annotate / kcachegrind.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: the fixtures and the proxy's config


class Upstream(asyncio.Protocol):
    """Fixed answers, HTTP/1.1 keep-alive, one write per response."""

    bodies: dict[bytes, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            n = int(m.group(1)) if m else 0
            if len(self.buf) < end + 4 + n:
                return
            self.buf = self.buf[end + 4 + n :]
            path = head.split(b" ", 2)[1]
            self.t.write(self.bodies.get(path, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"))  # type: ignore[attr-defined]


def response(body: str, ctype: str) -> bytes:
    raw = body.encode()
    return (f"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: {ctype}\r\nContent-Length: {len(raw)}\r\n"
            "Connection: keep-alive\r\n\r\n").encode() + raw


async def one_conn(port: int, body: bytes, n: int) -> None:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    req = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(n):
        w.write(req)
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
        if m:
            await r.readexactly(int(m.group(1)))
        else:  # chunked: read to the last chunk
            buf = b""
            while not buf.endswith(b"\r\n0\r\n\r\n"):
                buf += await r.read(65536)
                if not buf:
                    raise RuntimeError("connection closed mid-response")
    w.close()


async def load(port: int, body: bytes, requests: int, connections: int) -> None:
    per = requests // connections
    await asyncio.gather(*(one_conn(port, body, per) for _ in range(connections)))


def total_ir(path: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--kinds", default="json,stream")
    p.add_argument("--variant", default="log", choices=("log", "floor"), help="floor: bench/floor.py instead")
    p.add_argument("--database-url", default=None, help="default: SQLite in a temporary directory")
    p.add_argument("--src", default=None, help="another source tree's src/ (before/after comparisons)")
    p.add_argument("--keep", action="store_true", help="keep the callgrind.out files (bench/out/)")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is needed (apt-get install -y valgrind)")
    work = Path(tempfile.mkdtemp(prefix="cg-proxy-"))
    loop = asyncio.new_event_loop()
    Upstream.bodies = {
        b"/v1/chat/completions": response(run.upstream_json_body(), "application/json"),
        b"/stream/v1/chat/completions": response(run.upstream_sse_body(), "text/event-stream"),
    }
    server = loop.run_until_complete(loop.create_server(Upstream, "127.0.0.1", 0))
    up_port = server.sockets[0].getsockname()[1]
    variant = run.ProxyVariant(a.variant, a.variant, floor=a.variant == "floor")
    proxy = run.Proxy(work, up_port, variant, None, src=a.src, database_url=a.database_url)
    proxy.dir.mkdir(parents=True, exist_ok=True)
    proxy.port = run.free_port()
    (proxy.dir / "config.yaml").write_text(proxy.config())
    out = proxy.dir / "callgrind.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
           *proxy.command()]
    env = dict(os.environ)
    path = ([a.src] if a.src else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in path)  # the proxy runs in its own cwd
    with open(proxy.log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=proxy.dir, stdout=subprocess.DEVNULL, stderr=log, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                loop.run_until_complete(load(proxy.port, run.request_body("bench-json", False), 1, 1))
                break
            except (OSError, RuntimeError, asyncio.IncompleteReadError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"proxy did not start:\n{proxy.tail_log()}") from None
                time.sleep(1)
        for kind in a.kinds.split(","):
            model = {"json": "bench-json", "stream": "bench-stream"}[kind]
            body = run.request_body(model, kind == "stream")
            loop.run_until_complete(load(proxy.port, body, a.warmup, a.connections))
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
            loop.run_until_complete(load(proxy.port, body, a.requests, a.connections))
            time.sleep(0.5)  # the ledger's batch after the last answer (its writer runs on a timer)
            subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
            before = set(glob.glob(f"{out}.{proc.pid}*"))
            subprocess.run(["callgrind_control", "-d", kind, str(proc.pid)], check=True, capture_output=True)
            new = sorted(set(glob.glob(f"{out}.{proc.pid}*")) - before)
            ir = total_ir(new[-1])
            n = a.requests // a.connections * a.connections
            print(f"{kind}: {ir / n:,.0f} instructions per request ({n} requests, {a.connections} connections)",
                  flush=True)
            if a.keep:
                run.OUT.mkdir(exist_ok=True)
                shutil.copy(new[-1], run.OUT / f"callgrind-{kind}.out")
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        server.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
