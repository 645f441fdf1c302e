"""web/response.py's Reply: a whole answer written as one block must be, byte for byte (headers in any order),
what aiohttp's web.Response sends for it, and leave the response as aiohttp's finish_response expects it.

Unit tests compare the two on a real StreamWriter over a recording transport, case by case (HTTP/1.0 and 1.1,
keep-alive or not, force_close, errors with extra headers, HEAD, 204, special extra headers, an
on_response_prepare handler, header values with control characters...). End-to-end tests check what the proxy
sends for a JSON reply and a whole stream over a socket: the exact header set, keep-alive, one write after the
usage row.
"""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import Iterator
from typing import Any
from unittest import mock

import orjson
import pytest
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE, HttpVersion, HttpVersion10, HttpVersion11
from aiohttp.http_writer import StreamWriter
from aiohttp.test_utils import make_mocked_request
from multidict import CIMultiDict

from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.web import response as response_mod
from llm_proxy.web.response import JSON, SSE, Kind, Reply

from ..helpers import ProxyServer, native_config
from ..test_upstream_hop import SCENARIOS, RawUpstream, _config, _raw, _row
from .rawhttp import connect, read_reply

# ---- unit: Reply against web.Response ----------------------------------------------------------------------------


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        self.writes.append(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def _request(method: str = "POST", version: HttpVersion = HttpVersion11, keep_alive: bool = True,
             app: web.Application | None = None) -> tuple[web.Request, _Transport, StreamWriter]:
    transport = _Transport()
    protocol = mock.Mock()
    protocol.transport = transport
    protocol._paused = False
    writer = StreamWriter(protocol, asyncio.get_running_loop())
    req = make_mocked_request(method, "/v1/chat/completions", version=version, closing=not keep_alive,
                              writer=writer, protocol=protocol, transport=transport, app=app)
    if req._message.should_close == keep_alive:  # make_mocked_request closes every HTTP/1.0 request
        req._message = req._message._replace(should_close=not keep_alive)
    return req, transport, writer


async def _send(resp: web.StreamResponse, req: web.Request) -> None:
    """What RequestHandler.finish_response does with a handler's answer."""
    await resp.prepare(req)
    await resp.write_eof()


def _parts(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    return status, sorted(lines), body


def _aiohttp(body: bytes, kind: Kind, status: int, headers: dict[str, str] | None, rid: str | None) -> web.Response:
    """The answer as the proxy built it before Reply: the kind's headers, the extra ones, x-request-id."""
    real: CIMultiDict[str] = CIMultiDict(kind.pairs)
    real.update(headers or {})
    if rid is not None:
        real["x-request-id"] = rid
    return web.Response(body=body, status=status, headers=real)


async def _both(body: bytes = b'{"ok":true}', kind: Kind = JSON, status: int = 200,
                headers: dict[str, str] | None = None, rid: str | None = "req_1", **request: Any
                ) -> tuple[tuple[web.Response, _Transport, StreamWriter], tuple[Reply, _Transport, StreamWriter]]:
    out = []
    for resp in (_aiohttp(body, kind, status, headers, rid),
                 Reply(body, kind, status=status, headers=headers, request_id=rid)):
        req, transport, writer = _request(**request)
        await _send(resp, req)
        out.append((resp, transport, writer))
    return out[0], out[1]


@pytest.fixture
def _one_date(monkeypatch: pytest.MonkeyPatch) -> None:
    # Both paths format the same second; a fixed text keeps a second's turn out of the comparison.
    monkeypatch.setattr(response_mod, "rfc822_formatted_time", lambda: "Thu, 01 Jan 2026 00:00:00 GMT")
    monkeypatch.setattr("aiohttp.web_response.rfc822_formatted_time", lambda: "Thu, 01 Jan 2026 00:00:00 GMT")


LIMITS = {"x-ratelimit-limit-requests": "1000", "x-ratelimit-remaining-requests": "999",
          "x-ratelimit-reset-requests": "60ms"}
CASES: list[dict[str, Any]] = [
    {},
    {"keep_alive": False},  # Connection: close asked for
    {"version": HttpVersion10, "keep_alive": False},
    {"version": HttpVersion10, "keep_alive": True},  # Connection: keep-alive
    {"version": HttpVersion(1, 2)},
    {"kind": SSE, "headers": LIMITS, "body": b"data: {}\n\ndata: [DONE]\n\n"},
    {"kind": SSE, "headers": LIMITS, "version": HttpVersion10, "keep_alive": True},
    {"status": 429, "headers": {"retry-after": "3", **LIMITS}},
    {"status": 405, "headers": {"Allow": "POST"}, "rid": None},
    {"status": 599},  # no reason phrase
    {"body": b""},
    {"body": b"x" * 100_000},
    {"headers": {"x-tab": "a\tb", "x-utf8": "d\u00e9j\u00e0 \u2028 vu", "x-surrogate": "a\ud800b"}},
]
SLOW_CASES: list[dict[str, Any]] = [  # aiohttp's path, taken whole
    {"method": "HEAD"},
    {"method": "CONNECT"},
    {"status": 204, "body": b""},
    {"status": 304, "body": b""},
    {"headers": {"Content-Length": "3"}},
    {"headers": {"connection": "upgrade"}},
    {"headers": {"Date": "yesterday", "Server": "me"}},
    {"headers": {"X-Request-Id": "theirs"}},
    {"kind": SSE, "headers": {"Content-Type": "text/plain"}},
]


@pytest.mark.usefixtures("_one_date")
@pytest.mark.parametrize("case", CASES + SLOW_CASES, ids=[str(c) for c in CASES + SLOW_CASES])
async def test_reply_sends_what_web_response_sends(case: dict[str, Any]) -> None:
    (old, t_old, w_old), (new, t_new, w_new) = await _both(**case)
    assert len(t_new.writes) == 1  # status line, headers and body in one write
    assert (new._multidict is None) == (case in CASES)  # the block, or aiohttp's path
    assert _parts(b"".join(t_new.writes)) == _parts(b"".join(t_old.writes))
    for attr in ("prepared", "keep_alive", "body_length", "status", "reason", "_eof_sent", "_payload_writer",
                 "_req"):
        assert getattr(new, attr) == getattr(old, attr), attr
    assert w_new.output_size == w_old.output_size and w_new._eof


@pytest.mark.usefixtures("_one_date")
async def test_force_close_is_kept() -> None:
    out = []
    for resp in (_aiohttp(b"{}", JSON, 500, None, "req_1"), Reply(b"{}", JSON, status=500, request_id="req_1")):
        resp.force_close()
        req, transport, _ = _request()
        await _send(resp, req)
        out.append((resp.keep_alive, _parts(transport.writes[0])))
    assert out[0] == out[1] and out[1][0] is False and b"Connection: close" in out[1][1][1]


@pytest.mark.usefixtures("_one_date")
async def test_request_id_set_after_construction_as_the_middleware_does() -> None:
    old = _aiohttp(b"{}", JSON, 200, LIMITS, None)
    new = Reply(b"{}", JSON, headers=LIMITS)
    old.headers["x-request-id"] = "req_late"
    new.request_id = "req_late"
    sent = []
    for resp in (old, new):
        req, transport, _ = _request()
        await _send(resp, req)
        sent.append(_parts(transport.writes[0]))
    assert sent[0] == sent[1] and b"x-request-id: req_late" in sent[1][1]


@pytest.mark.usefixtures("_one_date")
async def test_headers_read_or_changed_take_aiohttps_path() -> None:
    new = Reply(b"{}", JSON, headers=LIMITS, request_id="req_1")
    assert new.headers["x-ratelimit-limit-requests"] == "1000" and new.headers["content-type"] == "application/json"
    new.headers["x-extra"] = "1"
    new.request_id = "req_2"  # (after the CIMultiDict was built: it goes into it)
    old = _aiohttp(b"{}", JSON, 200, {**LIMITS, "x-extra": "1"}, "req_2")
    sent = []
    for resp in (old, new):
        req, transport, _ = _request()
        await _send(resp, req)
        sent.append(_parts(b"".join(transport.writes)))
    assert sent[0] == sent[1] and b"x-extra: 1" in sent[1][1] and b"x-request-id: req_2" in sent[1][1]


@pytest.mark.usefixtures("_one_date")
async def test_on_response_prepare_handlers_still_run() -> None:
    app = web.Application()

    async def stamp(request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["x-stamped"] = "yes"

    app.on_response_prepare.append(stamp)
    app.freeze()
    sent = []
    for resp in (_aiohttp(b"{}", JSON, 200, None, "req_1"), Reply(b"{}", JSON, request_id="req_1")):
        req, transport, _ = _request(app=app)
        await _send(resp, req)
        sent.append(_parts(b"".join(transport.writes)))
    assert sent[0] == sent[1] and b"x-stamped: yes" in sent[1][1]
    # an app without handlers: the block, no hook
    bare = web.Application()
    bare.freeze()
    req, transport, _ = _request(app=bare)
    await _send(Reply(b"{}", JSON, request_id="req_1"), req)
    assert b"x-stamped" not in transport.writes[0]


@pytest.mark.parametrize("bad", ["1\r\nx-injected: 1", "1\nx", "1\rx", "a\x00b", "a\x7fb", "a\x1bb"])
async def test_control_characters_in_extra_headers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="Forbidden control character"):
        Reply(b"{}", JSON, headers={"x-ratelimit-remaining-requests": bad})
    with pytest.raises(ValueError, match="Forbidden control character"):
        Reply(b"{}", JSON, headers={f"x-{bad}": "1"})
    # as aiohttp's serialiser refuses them (there: at prepare())
    req, transport, _ = _request()
    with pytest.raises(ValueError, match="Forbidden control character"):
        await _aiohttp(b"{}", JSON, 200, {"x-ratelimit-remaining-requests": bad}, None).prepare(req)
    # and a request id (set after construction) at prepare(), before anything is written
    reply = Reply(b"{}", JSON)
    reply.request_id = "req_" + bad
    req, transport, _ = _request()
    with pytest.raises(ValueError, match="Forbidden control character"):
        await reply.prepare(req)
    assert transport.writes == []


async def test_non_text_header_values_are_refused() -> None:
    with pytest.raises(TypeError):
        Reply(b"{}", JSON, headers={"x-n": 1})


async def test_a_client_gone_before_the_write_is_a_connection_error_then_nothing_more() -> None:
    """As aiohttp: the write raises ConnectionResetError; finish_response's write_eof() then writes nothing."""
    req, transport, writer = _request()
    transport.closing = True
    reply = Reply(b"{}", JSON, request_id="req_1")
    with pytest.raises(ConnectionResetError):
        await reply.prepare(req)
    assert reply.prepared and not reply._eof_sent
    transport.closing = False
    assert await reply.prepare(req) is writer
    await reply.write_eof()
    assert transport.writes == [] and reply._eof_sent and reply._payload_writer is None


async def test_a_paused_transport_is_drained() -> None:
    req, transport, writer = _request()
    protocol = writer.protocol
    protocol._paused = True
    drained = asyncio.Event()

    async def drain_helper() -> None:
        drained.set()

    protocol._drain_helper = drain_helper  # type: ignore[method-assign]
    await _send(Reply(b"{}", JSON, request_id="req_1"), req)
    assert drained.is_set() and len(transport.writes) == 1


# ---- end to end: what the proxy sends ---------------------------------------------------------------------------

WHOLE_BODY = b"".join(
    [b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":[{"index":0,'
     b'"delta":{"role":"assistant","content":"hi"},"finish_reason":"stop"}]}\n\n',
     b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"up","choices":[],'
     b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n', b"data: [DONE]\n\n"])
JSON_BODY = orjson.dumps({"id": "c1", "object": "chat.completion", "created": 1, "model": "up",
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                       "finish_reason": "stop"}],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
_DATE = re.compile(r"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT")


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(SCENARIOS, "reply-json", _raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", JSON_BODY))
        mp.setitem(SCENARIOS, "reply-whole", _raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n",
                                                  WHOLE_BODY))
        up = RawUpstream()
        yield up
        up.close()


@pytest.fixture(scope="module")
def plain(upstream: RawUpstream) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(_config(upstream)), usage=MemoryUsageSink()) as server:
        yield server


@pytest.fixture(scope="module")
def limited(upstream: RawUpstream) -> Iterator[ProxyServer]:
    limits = "limits:\n  store: memory\n  rules:\n    - {name: rpm, per: user, requests_per_minute: 1000}\n"
    with ProxyServer(native_config(_config(upstream, limits)), usage=MemoryUsageSink()) as server:
        yield server


def _post(stream: bool, version: bytes = b"1.1", extra: bytes = b"") -> bytes:
    body = orjson.dumps({"model": "m", "stream": stream,
                         "messages": [{"role": "user", "content": "reply-whole" if stream else "reply-json"}]})
    return (b"POST /v1/chat/completions HTTP/" + version + b"\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body)


def _ask(px: ProxyServer, data: bytes, s: socket.socket | None = None) -> tuple[bytes, list[tuple[str, str]], bytes,
                                                                                bool]:
    """Status line, the headers as sent (names' case kept), body, and whether the proxy then closed."""
    own = s is None
    sock = connect(px.port) if s is None else s
    try:
        sock.sendall(data)
        reply = read_reply(sock, timeout=10, until_complete=True)
        head = reply.raw.partition(b"\r\n\r\n")[0].split(b"\r\n")
        headers = [(n.decode(), v.decode()) for n, _, v in (ln.partition(b": ") for ln in head[1:])]
        closed = reply.closed
        if not closed:
            sock.settimeout(0.3)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False
        return head[0], headers, reply.body, closed
    finally:
        if own:
            sock.close()


def _expected(kind: str, rid: str, body: bytes, limited: bool, date: str) -> list[tuple[str, str]]:
    """What the proxy sent before Reply (aiohttp's web.Response / a held-headers StreamResponse)."""
    fixed = ([("Content-Type", "application/json")] if kind == "json" else
             [("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no")])
    return sorted([*fixed, ("x-request-id", rid), ("Content-Length", str(len(body))), ("Date", date),
                   ("Server", SERVER_SOFTWARE)] + ([("x-ratelimit-limit-requests", "1000")] if limited else []))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "whole-stream"])
@pytest.mark.parametrize("with_limits", [False, True], ids=["", "limits"])
def test_the_exact_header_set(plain: ProxyServer, limited: ProxyServer, stream: bool, with_limits: bool) -> None:
    px = limited if with_limits else plain
    status, headers, body, closed = _ask(px, _post(stream))
    assert status == b"HTTP/1.1 200 OK" and not closed
    names = [n.lower() for n, _ in headers]
    assert len(names) == len(set(names)), names  # no header twice
    got = dict(headers)
    assert got["x-request-id"].startswith("req_") and _DATE.fullmatch(got["Date"])
    # the limits' other headers: their values move; their names are the limiter's
    rest = sorted(h for h in headers if not h[0].startswith("x-ratelimit-") or h[0] == "x-ratelimit-limit-requests")
    assert rest == _expected("stream" if stream else "json", got["x-request-id"], body, with_limits, got["Date"])
    if with_limits:
        assert {n for n in names if n.startswith("x-ratelimit-")} == {
            "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}
    if stream:
        assert b'"content":"hi"' in body and body.endswith(b"data: [DONE]\n\n")
    else:
        assert orjson.loads(body)["choices"][0]["message"]["content"] == "hi"
    assert _row(px, got["x-request-id"]).status == 200


@pytest.mark.parametrize("stream", [False, True], ids=["json", "whole-stream"])
def test_http10_keep_alive_as_before(plain: ProxyServer, stream: bool) -> None:
    # HTTP/1.0 without keep-alive: no Connection header, and the proxy closes.
    status, headers, _, closed = _ask(plain, _post(stream, b"1.0"))
    assert status == b"HTTP/1.0 200 OK" and closed and "connection" not in {n.lower() for n, _ in headers}
    # HTTP/1.0 asking for keep-alive: `Connection: keep-alive`, and the connection serves the next request.
    with connect(plain.port) as s:
        for _ in range(2):
            status, headers, _, closed = _ask(plain, _post(stream, b"1.0", b"Connection: keep-alive\r\n"), s)
            assert status == b"HTTP/1.0 200 OK" and not closed
            assert ("Connection", "keep-alive") in headers and "Content-Length" in dict(headers)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "whole-stream"])
def test_connection_close_asked_for(plain: ProxyServer, stream: bool) -> None:
    status, headers, _, closed = _ask(plain, _post(stream, extra=b"Connection: close\r\n"))
    assert status == b"HTTP/1.1 200 OK" and closed and ("Connection", "close") in headers


def test_an_error_envelope_keeps_its_headers(plain: ProxyServer) -> None:
    status, headers, body, closed = _ask(plain, b"GET /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\r\n")
    got = dict(headers)
    assert status.startswith(b"HTTP/1.1 40") and not closed
    assert got["Content-Type"] == "application/json" and got["x-request-id"].startswith("req_")
    assert got["Content-Length"] == str(len(body)) and orjson.loads(body)["error"]
    # a refused head: the envelope, then the connection closed (force_close)
    status, headers, body, closed = _ask(plain, b"GARBAGE\r\n\r\n")
    assert status == b"HTTP/1.1 400 Bad Request" and closed and ("Connection", "close") in headers
    assert orjson.loads(body)["error"]["code"] == "bad_request"


def test_a_json_reply_goes_out_in_one_write_after_its_row(plain: ProxyServer, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    sink = plain.services.usage
    assert isinstance(sink, MemoryUsageSink)
    writes: list[tuple[bytes, int]] = []
    original = StreamWriter._write

    def write(self: StreamWriter, chunk: bytes) -> None:
        writes.append((bytes(chunk), len(sink.events)))
        original(self, chunk)

    monkeypatch.setattr(StreamWriter, "_write", write)
    before = len(sink.events)
    status, _, body, _ = _ask(plain, _post(False))
    assert status == b"HTTP/1.1 200 OK"
    mine = [(data, rows) for data, rows in writes if data.startswith(b"HTTP/1.1 200")]
    assert len(mine) == 1
    data, rows = mine[0]
    assert data.endswith(b"\r\n\r\n" + body) and rows == before + 1  # one write, after the row
