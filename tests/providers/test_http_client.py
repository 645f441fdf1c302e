"""The upstream HTTP/1.1 client (providers/http.py): framing, pooling, timeouts, TLS, hostile responses.

Parser cases feed bytes straight into one connection's protocol object (every split point, no sockets);
pooling, timeouts and TLS run against a raw scripted server on a real loopback port.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from llm_proxy.config import ProviderSettings, TimeoutSettings
from llm_proxy.errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from llm_proxy.providers import http as http_mod
from llm_proxy.providers.base import UpstreamRequest
from llm_proxy.providers.http import (
    INFLATE_PIECE,
    MAX_BUFFERED,
    BadResponse,
    ProxyEnv,
    TooLarge,
    UpstreamClient,
    UpstreamResponse,
    _Conn,
    _Pool,
)

from ..helpers import tls_material

# ---- the protocol object alone -------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.paused = False
        self.aborted = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(bytes(data))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def _conn(stream: bool = False) -> tuple[_Conn, FakeTransport]:
    pool = _Pool(asyncio.get_running_loop(), "upstream", 80, None, 4)
    conn = _Conn(pool)
    t = FakeTransport()
    conn.connection_made(t)
    conn.start(b"POST / HTTP/1.1\r\n\r\n", stream)
    return conn, t


def _feed_split(conn: _Conn, raw: bytes, step: int) -> None:
    for i in range(0, len(raw), step):
        conn.data_received(raw[i : i + step])


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    + b"X-Twice: a\r\nx-twice: b\r\n\r\n"
    + b"7;ext=1\r\ndata: 1\r\n"
    + b"%x\r\n%s\r\n" % (len(b"\n\ndata: 2\n\ndata: "), b"\n\ndata: 2\n\ndata: ")
    + b"0\r\nx-trailer: t\r\n\r\n"
)


async def test_chunked_body_at_every_split_point() -> None:
    for step in (1, 2, 3, 7, 64, len(CHUNKED)):
        conn, t = _conn()
        _feed_split(conn, CHUNKED, step)
        assert conn.complete and conn.status == 200, step
        assert conn.take() == b"data: 1\n\ndata: 2\n\ndata: ", step
        assert conn.headers["content-type"] == "text/event-stream"
        assert conn.headers["x-twice"] == "a, b"
        assert conn.reusable and not t.aborted


async def test_content_length_body_and_interim_100_continue() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhello"
    for step in (1, 5, len(raw)):
        conn, _ = _conn()
        _feed_split(conn, raw, step)
        assert conn.complete and conn.status == 201 and conn.take() == b"hello" and conn.reusable


async def test_body_to_close_and_connection_close_are_not_reused() -> None:
    conn, _ = _conn()
    conn.data_received(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
    conn.data_received(b"part two")
    assert not conn.complete
    conn.eof_received()
    assert conn.complete and conn.take() == b"part one, part two" and not conn.reusable

    conn, _ = _conn()
    conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
    assert conn.complete and not conn.reusable
    conn, _ = _conn()
    conn.data_received(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert conn.complete and not conn.reusable


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/2 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: value\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1_0\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"a" * (70 * 1024),
    ],
)
async def test_malformed_responses_drop_the_connection(raw: bytes) -> None:
    conn, t = _conn()
    conn.data_received(raw)
    assert isinstance(conn._exc, BadResponse) and t.aborted and not conn.reusable


async def test_lines_parsed_before_are_judged_the_same_the_next_time() -> None:
    """The parser keeps what it made of the status and header lines it has seen (by their bytes): a head made of
    such lines is still refused when they conflict or frame the body wrongly, and still read as it was."""
    for _ in range(2):  # the second round: every line below is a known one
        for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nhello!",
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
                    b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"):
            conn, _ = _conn()
            conn.data_received(raw)
            assert conn.complete and conn._exc is None
        assert http_mod._HEADER_LINES and http_mod._STATUS_LINES
        for raw in (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
                    b"HTTP/1.1 200 OK\r\n Content-Length: 5\r\n\r\nhello"):
            conn, t = _conn()
            conn.data_received(raw)
            assert not conn.reusable
            if raw.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nTransfer"):
                assert conn.complete and conn.take() == b"ok"  # read, never reused
            else:
                assert isinstance(conn._exc, BadResponse) and t.aborted, raw
        conn, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
        assert conn.complete and not conn.reusable and conn.headers == {"connection": "close", "content-length": "2"}
        conn, _ = _conn()
        conn.data_received(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert conn.complete and not conn.reusable and conn.status == 200
        conn, _ = _conn()
        conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello")
        assert conn.complete and conn.reusable and conn.headers["content-length"] == "5, 5"


async def test_chunked_with_content_length_is_read_but_never_reused() -> None:
    conn, _ = _conn()
    conn.data_received(
        b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert conn.complete and conn.take() == b"ok" and not conn.reusable


async def test_bytes_after_the_response_forbid_reuse() -> None:
    conn, _ = _conn()
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA")
    assert conn.complete and not conn.reusable


async def test_a_stream_that_falls_behind_pauses_the_socket() -> None:
    conn, t = _conn(stream=True)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    frame = b"%x\r\n" % len(piece) + piece + b"\r\n"
    while not t.paused:
        conn.data_received(frame)
        assert conn.buffered <= MAX_BUFFERED + len(piece)
    got = conn.take()
    assert len(got) > MAX_BUFFERED and not t.paused  # taking the bytes resumes reading


async def test_a_non_streamed_body_is_never_paused() -> None:  # its reader waits for the end: pausing would hang
    conn, t = _conn(stream=False)
    body = b"y" * (3 * MAX_BUFFERED)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert conn.complete and not t.paused and conn.take() == body


async def test_a_responses_chunks_end_as_a_generator_would() -> None:
    """chunks() is an iterator object, not an async generator: it ends for good at the body's end, at aclose()
    and after raising, and a bad Content-Encoding is the first read's error (not the call's)."""
    loop = asyncio.get_running_loop()

    def response(raw: bytes) -> tuple[UpstreamResponse, _Conn, FakeTransport]:
        conn, t = _conn(stream=True)
        conn.data_received(raw)
        return UpstreamResponse(conn, conn.pool, "p", loop.time() + 5, 5.0, loop.time() + 10), conn, t

    resp, conn, _ = response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    chunks = resp.chunks()
    assert await anext(chunks) == b"ab" and not resp.finished()
    loop.call_soon(conn.data_received, b"cd")  # arrives while the reader waits
    assert await anext(chunks) == b"cd" and resp.finished()
    for _ in range(2):
        with pytest.raises(StopAsyncIteration):
            await anext(chunks)

    resp, conn, _ = response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab")
    chunks = resp.chunks()
    assert await anext(chunks) == b"ab"
    await chunks.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)

    resp, conn, t = response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")
    chunks = resp.chunks()
    assert await anext(chunks) == b"ab"
    loop.call_soon(conn.data_received, b"zz\r\n")  # not a chunk size
    with pytest.raises(ProxyError, match="invalid HTTP response"):
        await anext(chunks)
    assert t.aborted
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)

    resp, conn, t = response(b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nab")
    chunks = resp.chunks()  # no error yet
    with pytest.raises(ProxyError, match="unsupported Content-Encoding 'br'"):
        await anext(chunks)
    assert t.aborted

    resp, conn, _ = response(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n")
    chunks = resp.chunks()
    task = asyncio.ensure_future(anext(chunks))
    loop.call_soon(task.cancel)  # runs after the task's first step, which leaves it waiting for the body
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)


# ---- a scripted server on a real port ----------------------------------------------------------------

Action = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class Script:
    """A raw HTTP/1.1 server: each request gets the next scripted action (which writes the answer)."""

    def __init__(self) -> None:
        self.actions: deque[Action] = deque()
        self.requests: list[tuple[bytes, bytes]] = []
        self.connections = 0
        self.open = 0
        self.peak = 0
        self.closed = asyncio.Event()  # set whenever a connection ends
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/x"

    async def start(self, ssl_ctx: ssl.SSLContext | None = None) -> Script:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=ssl_ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                keep = await self.actions.popleft()(reader, writer)
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the client went away, or the test's loop is closing
        finally:
            self.open -= 1
            writer.close()
            self.closed.set()


def reply(raw: bytes, keep: bool = True) -> Action:
    async def act(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(raw)
        await w.drain()
        return keep

    return act


def ok(body: bytes = b'{"ok":true}', extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(
        body
    ) + body


@pytest.fixture
async def script() -> AsyncIterator[Script]:
    s = await Script().start()
    yield s
    await s.stop()


async def _client(base_url: str, **kw: Any) -> UpstreamClient:
    client = UpstreamClient()
    client.register(ProviderSettings(id="p", type="openai_compat", base_url=base_url, **kw))
    await client.start()
    return client


def _req(url: str, stream: bool = False, headers: dict[str, str] | None = None) -> UpstreamRequest:
    return UpstreamRequest("POST", url, headers or {"content-type": "application/json"}, b'{"x":1}', stream)


T = TimeoutSettings(connect=2, first_byte=2, idle=2, total=10)


async def _get(client: UpstreamClient, url: str, timeouts: TimeoutSettings = T, **kw: Any) -> tuple[int, bytes]:
    resp = await client.send("p", _req(url, **kw), timeouts)
    body = await resp.read()
    resp.release()
    return resp.status, body


async def test_request_on_the_wire_and_keep_alive_reuse(script: Script) -> None:
    client = await _client(f"http://127.0.0.1:{script.port}/v1")
    url = f"http://127.0.0.1:{script.port}/v1/chat/completions?api-version=1"
    script.actions.extend([reply(ok(b"one")), reply(ok(b"two"))])
    assert await _get(client, url, headers={"authorization": "Bearer k", "Host": "ignored", "Content-Length": "1"}) == (
        200, b"one",
    )
    assert await _get(client, url) == (200, b"two")
    assert script.connections == 1
    head, body = script.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions?api-version=1 HTTP/1.1"
    names = [ln.split(b":")[0].lower() for ln in lines[1:] if ln]
    assert names.count(b"host") == 1 and names.count(b"content-length") == 1
    assert f"host: 127.0.0.1:{script.port}".encode() in lines
    assert b"authorization: Bearer k" in lines and b"accept-encoding" not in names
    assert body == b'{"x":1}'
    await client.close()


async def test_connection_close_and_body_to_eof_open_new_connections(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    script.actions.extend([
        reply(ok(b"a", b"Connection: close\r\n"), keep=False),
        reply(b"HTTP/1.1 200 OK\r\n\r\nto the end", keep=False),
        reply(ok(b"c")),
    ])
    assert await _get(client, url) == (200, b"a")
    assert await _get(client, url) == (200, b"to the end")
    assert await _get(client, url) == (200, b"c")
    assert script.connections == 3
    await client.close()


async def test_a_kept_alive_connection_closed_by_the_server_is_retried_once_on_a_new_one(script: Script) -> None:
    client = await _client(script.base)
    url = script.url

    async def close_without_answer(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> bool:
        return False

    script.actions.extend([reply(ok(b"first")), close_without_answer, reply(ok(b"second"))])
    assert await _get(client, url) == (200, b"first")
    assert await _get(client, url) == (200, b"second")  # the dropped reuse was retried on a fresh connection
    assert script.connections == 2 and len(script.requests) == 3

    script.actions.append(close_without_answer)  # a fresh connection that fails is an error, not a loop
    client2 = await _client(script.base)
    with pytest.raises(UpstreamUnreachable, match="closed the connection before responding"):
        await _get(client2, url)
    await client.close()
    await client2.close()


async def test_a_408_sent_on_an_idle_connection_is_not_a_client_error(script: Script) -> None:
    """Some servers say `408 Request Timeout` on a kept-alive connection before closing it."""
    client = await _client(script.base)
    url = script.url

    async def answer_then_408(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(ok(b"first"))
        await w.drain()
        await asyncio.sleep(0.05)  # the connection sits idle in the pool (a deliberate delay, not synchronisation)
        w.write(b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        return False

    script.actions.extend([answer_then_408, reply(ok(b"second"))])
    assert await _get(client, url) == (200, b"first")
    script.closed.clear()
    await script.closed.wait()
    assert await _get(client, url) == (200, b"second")
    assert script.connections == 2
    await client.close()


async def test_mid_body_disconnect_is_502_and_a_stream_keeps_what_arrived(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    script.actions.append(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part", keep=False))
    with pytest.raises(UpstreamUnreachable, match="closed the connection mid-response"):
        await _get(client, url)

    script.actions.append(reply(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n", keep=False))
    resp = await client.send("p", _req(url, stream=True), T)
    got = []
    with pytest.raises(UpstreamUnreachable, match="mid-stream"):
        async for chunk in resp.chunks():
            got.append(chunk)
    assert b"".join(got) == b"first"
    await client.close()


async def test_pool_limit_caps_open_connections(script: Script) -> None:
    client = await _client(script.base, max_connections=2)
    url = script.url
    gate = asyncio.Event()
    arrived = 0

    async def held(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            gate.set()
        await gate.wait()
        w.write(ok(b"held"))
        await w.drain()
        return True

    script.actions.extend([held] * 6)
    results = await asyncio.gather(*(_get(client, url) for _ in range(6)))
    assert results == [(200, b"held")] * 6
    assert script.peak == 2 and script.connections == 2
    await client.close()


async def test_header_with_a_line_break_is_refused_before_sending(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    with pytest.raises(ProxyError) as info:
        await client.send("p", _req(url, headers={"authorization": "Bearer key\n"}), T)
    assert info.value.code == "bad_upstream_header" and "key" not in info.value.message
    assert script.requests == []
    await client.close()


async def test_gzip_bodies_are_decoded(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    z = gzip.compress(b"data: zipped\n\n" * 50)
    script.actions.extend([reply(ok(z, b"Content-Encoding: gzip\r\n")), reply(ok(z, b"Content-Encoding: gzip\r\n"))])
    assert await _get(client, url) == (200, b"data: zipped\n\n" * 50)
    resp = await client.send("p", _req(url, stream=True), T)
    assert b"".join([c async for c in resp.chunks()]) == b"data: zipped\n\n" * 50
    await client.close()


async def test_timeouts_first_byte_idle_and_total(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    release = asyncio.Event()

    async def silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    async def one_chunk_then_silent(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await w.drain()
        await release.wait()
        return False

    short = TimeoutSettings(connect=2, first_byte=0.2, idle=0.2, total=10)
    script.actions.append(silent)
    with pytest.raises(UpstreamTimeout, match="first byte"):
        await _get(client, url, short)

    script.actions.append(silent)
    with pytest.raises(UpstreamTimeout, match="first byte"):
        await client.send("p", _req(url, stream=True), short)

    async def first_chunk_then(timeouts: TimeoutSettings, match: str) -> None:
        script.actions.append(one_chunk_then_silent)
        resp = await client.send("p", _req(url, stream=True), timeouts)
        chunks = resp.chunks()
        assert await anext(chunks) == b"first"
        with pytest.raises(UpstreamTimeout, match=match):
            await anext(chunks)

    await first_chunk_then(short, "without data mid-stream")
    await first_chunk_then(TimeoutSettings(connect=2, first_byte=5, idle=5, total=0.3), "total")
    release.set()
    await client.close()


async def test_each_request_on_a_kept_alive_connection_gets_its_own_timeouts(script: Script) -> None:
    """A connection keeps one timer across waits and requests (re-armed when it fires early): a later request's
    longer first-byte timeout is not cut by an earlier request's shorter one, and a shorter one still fires."""
    client = await _client(script.base)
    url = script.url
    loop = asyncio.get_running_loop()

    def late(raw: bytes, delay: float) -> Action:
        async def act(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            await asyncio.sleep(delay)  # an upstream slow to answer (the point of the test, not synchronisation)
            w.write(raw)
            await w.drain()
            return True

        return act

    release = asyncio.Event()

    async def silent(_r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> bool:
        await release.wait()
        return False

    short = TimeoutSettings(connect=2, first_byte=0.2, idle=0.2, total=10)
    long = TimeoutSettings(connect=2, first_byte=3, idle=3, total=10)
    script.actions.extend([reply(ok(b"quick")), late(ok(b"slow"), 0.5), late(ok(b"slow stream"), 0.5), silent])
    assert await _get(client, url, short) == (200, b"quick")  # arms the connection's timer at +0.2 s
    assert await _get(client, url, long) == (200, b"slow")  # that timer fires early and is re-armed
    resp = await client.send("p", _req(url, stream=True), long)
    assert b"".join([c async for c in resp.chunks()]) == b"slow stream"
    resp.release()
    assert script.connections == 1
    started = loop.time()
    with pytest.raises(UpstreamTimeout, match="first byte"):
        await _get(client, url, short)  # the timer armed for `long` is due too late: re-armed earlier
    assert loop.time() - started < 2
    release.set()
    await client.close()


async def test_cancelling_a_request_drops_its_connection(script: Script) -> None:
    client = await _client(script.base)
    url = script.url
    arrived = asyncio.Event()

    async def never(r: asyncio.StreamReader, _w: asyncio.StreamWriter) -> bool:
        arrived.set()
        assert await r.read(1) == b""  # never answers; returns when the client drops the connection
        return False

    script.actions.append(never)
    task = asyncio.create_task(_get(client, url))
    await arrived.wait()
    script.closed.clear()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await script.closed.wait()  # the server saw the connection go
    assert script.open == 0
    await client.close()


async def test_unreachable_upstream_is_502() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    client = await _client(f"http://127.0.0.1:{port}")
    with pytest.raises(UpstreamUnreachable, match="is unreachable"):
        await _get(client, f"http://127.0.0.1:{port}/x")
    await client.close()


async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    ca, cert, key = tls_material(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    s = await Script().start(server_ctx)
    url = f"https://127.0.0.1:{s.port}/x"
    s.actions.extend([reply(ok(b"secure")), reply(ok(b"again")), reply(ok(b"unverified"))])
    trusted = await _client(f"https://127.0.0.1:{s.port}", tls_cafile=str(ca))
    assert await _get(trusted, url) == (200, b"secure")
    assert await _get(trusted, url) == (200, b"again")
    assert s.connections == 1

    untrusted = await _client(f"https://127.0.0.1:{s.port}")
    with pytest.raises(UpstreamUnreachable, match="is unreachable"):
        await _get(untrusted, url)
    insecure = await _client(f"https://127.0.0.1:{s.port}", verify_tls=False)
    assert await _get(insecure, url) == (200, b"unverified")
    for c in (trusted, untrusted, insecure):
        await c.close()
    await s.stop()


async def test_a_slow_reader_is_not_cut_by_the_idle_timeout(script: Script) -> None:
    """The idle clock runs only while the reader waits for bytes, not while it is busy with the last ones."""
    client = await _client(script.base)
    url = script.url
    asked = asyncio.Event()

    async def frame_per_ask(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            await asked.wait()  # the reader is back for more (after being busy longer than `idle`)
            asked.clear()
            await asyncio.sleep(0.03)  # then the upstream answers well within `idle`
            frame = b"data: %d\n\n" % i
            w.write(b"%x\r\n%s\r\n" % (len(frame), frame))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        return True

    script.actions.append(frame_per_ask)
    resp = await client.send("p", _req(url, stream=True), TimeoutSettings(connect=2, first_byte=2, idle=0.1, total=10))
    chunks = resp.chunks()
    got = []
    for _ in range(3):
        asked.set()
        got.append(await anext(chunks))
        await asyncio.sleep(0.25)  # a client slower than `idle` (a deliberate delay, not synchronisation)
    assert [c async for c in chunks] == []
    assert got == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    resp.release()
    await client.close()


# ---- HTTP proxies from the environment --------------------------------------------------------------


def test_proxy_environment_is_read_like_curl(caplog: pytest.LogCaptureFixture) -> None:
    env = {
        "HTTPS_PROXY": "http://ignored-upper:1",
        "https_proxy": "http://us%40r:p%3Ass@proxy.corp:3128",
        "HTTP_PROXY": "proxy.corp:8080",
        "NO_PROXY": "localhost, .svc,cluster.local:443, 10.0.0.0/8,192.168.1.7",
    }
    pe = ProxyEnv.from_env(env)
    assert pe.https is not None and (pe.https.host, pe.https.port) == ("proxy.corp", 3128)
    assert pe.https.auth == "Basic " + base64.b64encode(b"us@r:p:ss").decode()
    assert "p:ss" not in repr(pe) and "us@r" not in repr(pe)
    assert pe.http is not None and (pe.http.host, pe.http.port, pe.http.auth) == ("proxy.corp", 8080, None)
    for host in ("localhost", "vllm.ns.svc", "svc", "a.cluster.local", "10.1.2.3", "192.168.1.7"):
        assert pe.for_url("https", host) is None, host
    for host in ("api.openai.com", "notsvc", "192.168.1.8", "11.0.0.1"):
        assert pe.for_url("https", host) is pe.https, host
    assert ProxyEnv.from_env({"https_proxy": "http://p:1", "no_proxy": "*"}).for_url("https", "x.y") is None

    with caplog.at_level("WARNING", logger="llm_proxy.upstream"):
        bad = ProxyEnv.from_env({"https_proxy": "socks5://u:secret@p:1080", "http_proxy": "http://p:notaport"})
    assert bad.https is None and bad.http is None
    assert "HTTPS_PROXY" in caplog.text and "HTTP_PROXY" in caplog.text and "secret" not in caplog.text


class TinyProxy:
    """An HTTP proxy for the tests: CONNECT tunnels and absolute-form forwarding, or a fixed refusal."""

    def __init__(self, refuse: int | None = None) -> None:
        self.heads: list[bytes] = []
        self.refuse = refuse
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> TinyProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ")
        if self.refuse:
            writer.write(b"HTTP/1.1 %d Nope\r\nContent-Length: 0\r\n\r\n" % self.refuse)
            writer.close()
            return
        if method == b"CONNECT":
            host, port = target.decode().rsplit(":", 1)
            up_r, up_w = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            u = urlsplit(target.decode())
            up_r, up_w = await asyncio.open_connection(u.hostname, u.port)
            up_w.write(head)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()

        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))


async def test_https_upstream_through_a_connect_tunnel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ca, cert, key = tls_material(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    s = await Script().start(server_ctx)
    proxy = await TinyProxy().start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:pw@127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = await _client(f"https://127.0.0.1:{s.port}", tls_cafile=str(ca))
    url = f"https://127.0.0.1:{s.port}/x"
    s.actions.extend([reply(ok(b"tunnelled")), reply(ok(b"same tunnel"))])
    assert await _get(client, url) == (200, b"tunnelled")
    assert await _get(client, url) == (200, b"same tunnel")
    assert len(proxy.heads) == 1 and s.connections == 1
    lines = proxy.heads[0].split(b"\r\n")
    assert lines[0] == f"CONNECT 127.0.0.1:{s.port} HTTP/1.1".encode()
    assert b"proxy-authorization: Basic " + base64.b64encode(b"bob:pw") in lines
    assert s.requests[0][0].startswith(b"POST /x HTTP/1.1")  # inside the tunnel: origin form, over TLS
    await client.close()

    refusing = await TinyProxy(refuse=407).start()
    monkeypatch.setenv("HTTPS_PROXY", f"http://bob:pw@127.0.0.1:{refusing.port}")
    client = await _client(f"https://127.0.0.1:{s.port}", tls_cafile=str(ca))
    with pytest.raises(UpstreamUnreachable, match="proxy answered 407") as info:
        await _get(client, url)
    assert "pw" not in info.value.message and "bob" not in info.value.message
    await client.close()

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # bypass: straight to the upstream although the proxy refuses
    s.actions.append(reply(ok(b"direct")))
    client = await _client(f"https://127.0.0.1:{s.port}", tls_cafile=str(ca))
    assert await _get(client, url) == (200, b"direct")
    await client.close()
    await s.stop()


async def test_plain_http_upstream_through_a_forward_proxy(script: Script, monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = await TinyProxy().start()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = await _client(script.base)
    script.actions.append(reply(ok(b"forwarded")))
    assert await _get(client, f"http://127.0.0.1:{script.port}/v1/x?a=1") == (200, b"forwarded")
    line = proxy.heads[0].split(b"\r\n")[0]
    assert line == f"POST http://127.0.0.1:{script.port}/v1/x?a=1 HTTP/1.1".encode()
    await client.close()


# ---- body caps, compressed bodies, a stream's end marker --------------------------------------------------


async def test_a_body_over_max_response_bytes_is_refused_and_dropped(script: Script) -> None:
    pool = _Pool(asyncio.get_running_loop(), "upstream", 80, None, 4, max_body=4096)
    conn = _Conn(pool)
    t = FakeTransport()
    conn.connection_made(t)
    conn.start(b"POST / HTTP/1.1\r\n\r\n", False)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4097\r\n\r\n")  # refused from its header on
    assert isinstance(conn._exc, TooLarge) and t.aborted and not conn.reusable

    client = await _client(script.base, max_response_bytes=4096)
    url = script.url
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"400\r\n" + b"z" * 1024 + b"\r\n") * 5
    bomb = gzip.compress(b"0" * (1024 * 1024))  # ~1 KiB on the wire
    script.actions.extend([
        reply(ok(b"y" * 5000)),
        reply(chunked + b"0\r\n\r\n"),
        reply(ok(bomb, b"Content-Encoding: gzip\r\n")),
        reply(ok(b"y" * 4096)),
    ])
    for _ in range(3):
        script.closed.clear()
        with pytest.raises(ProxyError) as info:
            await _get(client, url)
        assert info.value.status == 502 and info.value.code == "upstream_response_too_large"
        await script.closed.wait()  # the connection was dropped, not pooled
    assert await _get(client, url) == (200, b"y" * 4096)  # up to the cap is fine
    await client.close()


async def test_a_compressed_stream_is_inflated_in_bounded_pieces(script: Script) -> None:
    client = await _client(script.base)
    plain = b"data: {}\n\n" * (500 * 1024)  # 5 MB from ~5 KB of gzip
    script.actions.append(reply(ok(gzip.compress(plain), b"Content-Encoding: gzip\r\n")))
    resp = await client.send("p", _req(script.url, stream=True), T)
    pieces = [c async for c in resp.chunks()]
    assert b"".join(pieces) == plain and max(map(len, pieces)) <= INFLATE_PIECE
    await client.close()


async def test_an_error_body_to_a_stream_request_is_read_past_the_pause_limit(script: Script) -> None:
    client = await _client(script.base)
    body = b'{"error": "' + b"e" * (3 * MAX_BUFFERED) + b'"}'
    script.actions.append(reply(ok(body).replace(b"200 OK", b"500 Internal Server Error")))
    resp = await client.send("p", _req(script.url, stream=True), T)
    assert resp.status == 500 and await resp.read() == body  # not paused for a reader that waits for the end
    await client.close()


async def test_a_stream_released_at_its_end_marker_goes_back_to_the_pool_once_its_body_ends(
    script: Script, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = await _client(script.base)
    url = script.url
    gate = asyncio.Event()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    done = b"e\r\ndata: [DONE]\n\n\r\n"

    def done_then(rest: bytes | None) -> Action:
        async def act(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> bool:
            w.write(head + done)
            await w.drain()
            await gate.wait()  # the client has stopped reading at [DONE] and released the response
            if rest is None:
                return False  # hang up inside the chunked body (llama.cpp)
            w.write(rest)
            await w.drain()
            return True

        return act

    async def to_done() -> None:
        gate.clear()
        resp = await client.send("p", _req(url, stream=True), T)
        assert await anext(resp.chunks()) == b"data: [DONE]\n\n"
        resp.release()
        gate.set()

    async def idle() -> int:
        pools = list(client._pools.values())
        deadline = asyncio.get_running_loop().time() + 5
        while not (pools and pools[0].idle) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        return sum(len(p.idle) for p in pools)

    script.actions.extend([done_then(b"0\r\n\r\n"), reply(ok(b"reused"))])
    await to_done()
    assert await idle() == 1  # the last chunk came in a later read: the connection was kept
    assert await _get(client, url) == (200, b"reused") and script.connections == 1

    script.closed.clear()
    script.actions.extend([done_then(None), reply(ok(b"fresh"))])
    await to_done()
    await script.closed.wait()
    assert await _get(client, url) == (200, b"fresh") and script.connections == 2  # the hang-up: not reused

    script.closed.clear()
    script.actions.extend([done_then(b"0\r\n\r\nHTTP/1.1 200 OK\r\n"), reply(ok(b"fresh again"))])
    await to_done()  # bytes after the end of the body: never reused
    await script.closed.wait()
    assert await _get(client, url) == (200, b"fresh again") and script.connections == 3

    monkeypatch.setattr(http_mod, "LINGER_SECONDS", 0.05)
    script.closed.clear()
    script.actions.append(done_then(b""))  # the body never ends: dropped after LINGER_SECONDS
    await to_done()
    await script.closed.wait()
    assert sum(len(p.idle) for p in client._pools.values()) == 0 and script.open == 0
    await client.close()
