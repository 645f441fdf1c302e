"""Hostile clients against a proxy process: a stream nobody reads, request smuggling shapes, repeated disconnects.

The proxy runs as its own process (`python -m llm_proxy serve`) so that its memory and file descriptors can be read
from /proc; the upstream is a raw fake on loopback (for a stream as fast as the socket allows) or the emulator.
Each case has a bounded outcome and the proxy answers normally afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import pytest

from ..conftest import Emulator

CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o","choices":[{"index":0,'
    b'"delta":{"content":"' + b"x" * 900 + b'"},"finish_reason":null}]}\n\n'
)
STREAM_BYTES = 256 * 1024 * 1024  # far more than any buffer on the way: the proxy must push back, not keep it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FastUpstream:
    """An OpenAI-shaped upstream that streams STREAM_BYTES of chunks as fast as the socket takes them."""

    def __init__(self) -> None:
        self.sent = 0
        self.finished = threading.Event()  # the connection to the proxy ended (closed by the proxy, or all sent)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
            head, _, rest = buf.partition(b"\r\n\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            while len(rest) < length:
                rest += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
            block = CHUNK * 64
            try:
                while self.sent < STREAM_BYTES:
                    conn.sendall(block)
                    self.sent += len(block)
            except OSError:
                pass
            finally:
                self.finished.set()

    def close(self) -> None:
        self.sock.close()


class ProxyProcess:
    """`python -m llm_proxy serve` as a child process; its stderr is drained by a thread."""

    def __init__(self, config: Path) -> None:
        self.port = _free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llm_proxy", "serve", "--config", str(config), "--port", str(self.port)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        listening = threading.Event()

        def drain() -> None:
            assert self.proc.stderr is not None
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace")
                self.lines.append(line)
                if '"listening"' in line:
                    listening.set()
            listening.set()

        threading.Thread(target=drain, daemon=True).start()
        if not listening.wait(30) or self.proc.poll() is not None:
            raise AssertionError("proxy did not start:\n" + "".join(self.lines[-20:]))
        self.url = f"http://127.0.0.1:{self.port}"

    def rss_kb(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def healthy(self) -> None:
        r = httpx.get(self.url + "/v1/health", timeout=5)
        assert r.status_code == 200

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def _config(tmp: Path, base_url: str) -> Path:
    cfg = tmp / "config.yaml"
    cfg.write_text(f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 1, access_log: false}}
providers:
  - {{id: openai, type: openai, base_url: "{base_url}", api_key: sk-upstream-hostile-0123}}
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}
auth: {{mode: none, allow_unauthenticated: true}}
usage: {{enabled: false}}
""")
    return cfg


@pytest.fixture()
def fast_upstream() -> Iterator[FastUpstream]:
    up = FastUpstream()
    yield up
    up.close()


def _post(port: int, body: bytes, extra_headers: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
              + extra_headers + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return s


STREAM_BODY = b'{"model":"openai/gpt-4o","stream":true,"messages":[{"role":"user","content":"fast"}]}'


def _until_stalled(read: object, what: str, quiet: float = 1.0, timeout: float = 30.0) -> int:
    """Poll a counter until it has not moved for `quiet` seconds (the stream is held up by back-pressure)."""
    assert callable(read)
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never stalled")
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return int(last)


def test_stream_nobody_reads_is_held_by_back_pressure(tmp_path: Path, fast_upstream: FastUpstream) -> None:
    px = ProxyProcess(_config(tmp_path, f"http://127.0.0.1:{fast_upstream.port}/v1"))
    try:
        px.healthy()
        before = px.rss_kb()
        client = _post(px.port, STREAM_BODY)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        first = client.recv(4096)
        assert first.startswith(b"HTTP/1.1 200")
        # The client reads nothing more: the upstream must stop being read, far below what it has to send.
        sent = _until_stalled(lambda: fast_upstream.sent, "the upstream")
        assert sent < 64 * 1024 * 1024, f"the proxy read {sent} bytes for a client that reads nothing"
        grown_mb = (px.rss_kb() - before) / 1024
        assert grown_mb < 32, f"proxy RSS grew by {grown_mb:.1f} MB while holding one unread stream"
        # The client goes away: the proxy drops the upstream connection (it does not read it to the end).
        client.close()
        assert fast_upstream.finished.wait(10)
        assert fast_upstream.sent < STREAM_BYTES
        px.healthy()
    finally:
        px.stop()


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"transfer-encoding: chunked\r\n", id="CL+TE"),
        pytest.param(b"content-length: 5\r\n", id="two-CL"),
        pytest.param(b"transfer-encoding: chunked, identity\r\n", id="TE-list"),
        pytest.param(b"transfer-encoding : chunked\r\n", id="TE-space"),
    ],
)
def test_smuggling_shapes_are_refused_and_nothing_reaches_the_upstream(
    tmp_path: Path, emulator: Emulator, headers: bytes
) -> None:
    px = ProxyProcess(_config(tmp_path, emulator.base_url))
    try:
        emulator.script({"reset": True})
        inner = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\ncontent-length: 2\r\n\r\n{}"
        body = b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"a"}]}' + inner
        s = _post(px.port, body, headers)
        got = b""
        s.settimeout(10)
        while True:  # the proxy answers and closes: the rest of the bytes is never taken as a second request
            try:
                data = s.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            got += data
        s.close()
        assert got.startswith(b"HTTP/1.1 400 "), got[:200]
        assert got.count(b"HTTP/1.") == 1, got
        head, _, body = got.partition(b"\r\n\r\n")
        assert b"x-request-id:" in head.lower()
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}  # the envelope, nothing echoed
        assert b"embeddings" not in body and b"chunked" not in body
        assert emulator.requests() == []
        px.healthy()
    finally:
        px.stop()


async def _disconnect_rounds(port: int, rounds: int) -> None:
    async def one(stream: bool) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        body = (b'{"model":"openai/gpt-4o","stream":%s,"messages":[{"role":"user","content":"bye"}]}'
                % (b"true" if stream else b"false"))
        w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(body), body))
        await w.drain()
        if stream:
            await r.readuntil(b"\n\n")  # headers and at least part of the first event
        w.transport.abort()  # RST, no goodbye

    for _ in range(rounds):
        await asyncio.gather(*(one(i % 2 == 0) for i in range(10)))


def test_repeated_disconnects_leak_no_fds_or_memory(tmp_path: Path, emulator: Emulator) -> None:
    # Streams trickle; non-streamed answers come late: every request is cut while the proxy holds it.
    emulator.script({"reset": True, "responses": [
        {"content": "a b c d e f g h", "chunk_delay_ms": 50, "delay_ms": 200} for _ in range(1000)]})
    px = ProxyProcess(_config(tmp_path, emulator.base_url))
    try:
        asyncio.run(_disconnect_rounds(px.port, 5))  # warm-up: pools, buffers, first-use allocations
        fds0 = _until_stalled(px.fds, "fd count", quiet=0.5)
        rss0 = px.rss_kb()
        asyncio.run(_disconnect_rounds(px.port, 30))  # 300 more cut requests
        fds1 = _until_stalled(px.fds, "fd count", quiet=0.5)
        assert fds1 <= fds0 + 2, f"fds {fds0} -> {fds1} after 300 cut requests"
        grown_mb = (px.rss_kb() - rss0) / 1024
        assert grown_mb < 8, f"RSS grew by {grown_mb:.1f} MB over 300 cut requests"
        px.healthy()
        emulator.script({"reset": True})
        r = httpx.post(px.url + "/v1/chat/completions", timeout=10,
                       json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "still here?"}]})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    finally:
        px.stop()
