"""The upstream hop end to end: the official openai SDK -> llm-proxy -> a raw HTTP/1.1 fake upstream on loopback.

The fake writes exact bytes (it can end a stream with `data: [DONE]` and hang up inside the chunked body, as
llama.cpp does, answer a stream request with JSON, send a gzip bomb...), chosen by the request's last user
message. What is checked is what the client sees and the usage row the proxy records.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Awaitable, Callable, Iterator

import openai
import orjson
import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.types import UsageEvent

from .helpers import LoopThread, ProxyServer, native_config

CAP = 1024 * 1024  # the provider's max_response_bytes in these tests

Writer = Callable[[asyncio.StreamWriter], Awaitable[bool]]  # False: close the connection afterwards


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(delta: dict[str, object], finish: str | None = None) -> bytes:
    payload = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(payload) + b"\n\n"


USAGE = b"data: " + orjson.dumps({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "up",
                                  "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2,
                                                           "total_tokens": 5}}) + b"\n\n"
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
HELLO = [_event({"role": "assistant", "content": "hel"}), _event({"content": "lo"})]


def _stream(events: list[bytes], end: bytes = b"0\r\n\r\n") -> Writer:
    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(SSE_HEAD + b"".join(_chunk(e) for e in events) + end)
        await w.drain()
        return bool(end)  # no end of the chunked body: hang up

    return write


def _raw(head: bytes, body: bytes, keep: bool = True) -> Writer:
    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(head + b"content-length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 256 * 1024):
            w.write(body[i : i + 256 * 1024])
            await w.drain()  # the proxy drops a body it will not take: this raises, and the connection ends
        return keep

    return write


async def _endless_event(w: asyncio.StreamWriter) -> bool:
    """An SSE event that never ends (no blank line), 1 MiB after 1 MiB, until the proxy hangs up."""
    w.write(SSE_HEAD + _chunk(b'data: {"choices": "'))
    piece = _chunk(b"x" * CAP)
    for _ in range(64):
        w.write(piece)
        await w.drain()
    return False


BIG_JSON = b'{"id":"x","object":"chat.completion","choices":[],"pad":"' + b"p" * (8 * CAP) + b'"}'
BOMB = gzip.compress(b'{"pad":"' + b"0" * (64 * CAP) + b'"}', compresslevel=9)

SCENARIOS: dict[str, Writer] = {
    # llama.cpp (interrupt_requests=true): the whole answer, [DONE], then a hang-up inside the chunked body.
    "done-then-drop": _stream([*HELLO, _event({}, "stop"), USAGE, b"data: [DONE]\n\n"], end=b""),
    # llama.cpp's answer to a streamed prompt over its context window: 200, nothing in it.
    "empty": _stream([]),
    # content, then the body ends properly but the answer did not: no finish_reason, no [DONE].
    "cut-short": _stream(HELLO),
    # a server that never sends [DONE] but finished its answer.
    "finished-no-done": _stream([*HELLO, _event({}, "stop")]),
    "json-error-200": _raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n",
                           b'{"error": {"message": "the prompt is too long for this model", "type": "server_error"}}'),
    "html-200": _raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\n", b"<html>Gateway login</html>"),
    "big": _raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", BIG_JSON),
    "bomb": _raw(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n", BOMB),
    "endless-event": _endless_event,
    # the whole answer in one content-length framed write, as nginx or a fast server sends it
    "whole": _raw(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n",
                  b"".join([*HELLO, _event({}, "stop"), USAGE, b"data: [DONE]\n\n"])),
}


class RawUpstream:
    """HTTP/1.1 on 127.0.0.1 in its own loop thread; each request is answered by SCENARIOS[last message]."""

    def __init__(self) -> None:
        self.lt = LoopThread("raw-upstream")
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server = self.lt.run(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
                              if k.strip().lower() == b"content-length")
                body = orjson.loads(await reader.readexactly(length))
                self.requests += 1
                if not await SCENARIOS[body["messages"][-1]["content"]](writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.server.close()
        self.lt.stop()


@pytest.fixture(scope="module")
def upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    yield up
    up.close()


def _config(upstream: RawUpstream, more: str = "") -> str:
    return f"""
providers:
  - {{id: raw, type: openai, base_url: "http://127.0.0.1:{upstream.port}/v1", api_key: k, max_response_bytes: {CAP}}}
models:
  - {{id: m, provider: raw, upstream_model: up}}
auth: {{mode: none, allow_unauthenticated: true}}
""" + more


@pytest.fixture(scope="module")
def px(upstream: RawUpstream) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(_config(upstream)), usage=MemoryUsageSink()) as server:
        yield server


def _client(px: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key="x", max_retries=0, timeout=20)


def _msg(scenario: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": scenario}]


def _row(px: ProxyServer, request_id: str | None) -> UsageEvent:
    """The usage row of one request (recorded as the request ends, just after the client has its answer)."""
    assert request_id
    sink = px.services.usage
    assert isinstance(sink, MemoryUsageSink)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for ev in list(sink.events):
            if ev.request_id == request_id:
                return ev
        time.sleep(0.01)
    raise AssertionError(f"no usage row for {request_id}")


def test_done_then_hang_up_ends_the_stream_cleanly(px: ProxyServer) -> None:
    """19.1: the upstream's [DONE] ends the stream; its hang-up right after is not an error (20 at once)."""

    async def one(c: openai.AsyncOpenAI) -> tuple[str, str | None]:
        stream = await c.chat.completions.create(model="m", messages=_msg("done-then-drop"), stream=True)  # type: ignore[arg-type]
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        return text, stream.response.headers.get("x-request-id")

    async def many() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=px.base_url, api_key="x", max_retries=0, timeout=20) as c:
            return await asyncio.gather(*(one(c) for _ in range(20)))

    for text, rid in asyncio.run(many()):
        assert text == "hello"
        row = _row(px, rid)
        assert (row.status, row.error_type, row.total_tokens) == (200, None, 5)


def test_an_empty_stream_is_an_error_not_an_empty_answer(px: ProxyServer) -> None:
    """19.1: 200 with nothing in it (no content, no [DONE]): a 502 the SDK raises, and a 502 row."""
    with pytest.raises(openai.APIStatusError) as info:
        list(_client(px).chat.completions.create(model="m", messages=_msg("empty"), stream=True))  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_stream_empty"  # type: ignore[index]
    assert _row(px, info.value.request_id).status == 502


def test_a_stream_cut_short_after_content_is_an_error_in_band(px: ProxyServer) -> None:
    """No [DONE] and no finish_reason: what came is relayed, then an in-band error; the row says 502."""
    got: list[str] = []
    stream = _client(px).chat.completions.create(model="m", messages=_msg("cut-short"), stream=True)  # type: ignore[arg-type]
    with pytest.raises(openai.APIError, match="before the answer was complete"):
        for ch in stream:
            got.append(ch.choices[0].delta.content or "")
    assert "".join(got) == "hello"
    row = _row(px, stream.response.headers.get("x-request-id"))
    assert (row.status, row.error_type) == (502, "api_error")


def test_a_finished_answer_without_done_is_a_success(px: ProxyServer) -> None:
    stream = _client(px).chat.completions.create(model="m", messages=_msg("finished-no-done"), stream=True)  # type: ignore[arg-type]
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "hello"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert _row(px, stream.response.headers.get("x-request-id")).status == 200


@pytest.mark.parametrize(
    ("scenario", "says"),
    [
        ("json-error-200", "the prompt is too long for this model"),
        ("html-200", "'text/html' instead of an event stream"),
    ],
)
def test_a_200_that_is_not_a_stream_is_a_502(px: ProxyServer, scenario: str, says: str) -> None:
    """18.8: a JSON (error) object or an HTML page sent with 200 to a stream request is no empty success."""
    with pytest.raises(openai.APIStatusError) as info:
        list(_client(px).chat.completions.create(model="m", messages=_msg(scenario), stream=True))  # type: ignore[arg-type]
    assert info.value.status_code == 502 and says in info.value.message
    assert _row(px, info.value.request_id).status == 502


@pytest.mark.parametrize("scenario", ["big", "bomb"])
def test_oversized_and_inflating_bodies_are_refused(px: ProxyServer, scenario: str) -> None:
    """18.5: an 8 MiB body, and 64 MiB inflated from ~64 KiB of gzip, over a 1 MiB cap: 502, nothing relayed."""
    with pytest.raises(openai.APIStatusError) as info:
        _client(px).chat.completions.create(model="m", messages=_msg(scenario))  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_response_too_large"  # type: ignore[index]
    assert _row(px, info.value.request_id).status == 502


def test_an_event_that_never_ends_is_refused(px: ProxyServer) -> None:
    """18.5: a stream that never sends its blank line does not grow the proxy's memory past the event cap."""
    with pytest.raises(openai.APIStatusError) as info:
        list(_client(px).chat.completions.create(model="m", messages=_msg("endless-event"), stream=True))  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert info.value.body["code"] == "upstream_response_too_large"  # type: ignore[index]


@pytest.mark.parametrize(
    ("endpoint", "extra", "param", "code"),
    [
        ("chat", {"n": 1_000_000_000}, "n", "integer_above_max_value"),
        ("chat", {"n": 0}, "n", "integer_below_min_value"),
        ("chat", {"max_tokens": -1}, "max_tokens", "integer_below_min_value"),
        ("chat", {"max_completion_tokens": 0}, "max_completion_tokens", "integer_below_min_value"),
        ("chat", {"max_tokens": 10**12}, "max_tokens", "integer_above_max_value"),
        ("chat", {"max_tokens": "100"}, "max_tokens", "invalid_type"),
        ("chat", {"n": True}, "n", "invalid_type"),
        ("chat", {"top_logprobs": 1000}, "top_logprobs", "integer_above_max_value"),
        ("completions", {"best_of": 10**6}, "best_of", "integer_above_max_value"),
        ("completions", {"max_tokens": -5}, "max_tokens", "integer_below_min_value"),
        ("completions", {"logprobs": 99}, "logprobs", "integer_above_max_value"),
    ],
)
def test_costly_parameters_out_of_range_are_400_before_the_upstream(
    px: ProxyServer, upstream: RawUpstream, endpoint: str, extra: dict[str, object], param: str, code: str
) -> None:
    """18.10: n in the billions, negative max_tokens...: OpenAI's 400 envelope with `param`; nothing sent upstream."""
    before = upstream.requests
    c = _client(px)
    with pytest.raises(openai.BadRequestError) as info:
        if endpoint == "chat":
            c.chat.completions.create(model="m", messages=_msg("big"), extra_body=extra)  # type: ignore[arg-type]
        else:
            c.completions.create(model="m", prompt="hi", extra_body=extra)
    err = info.value.body
    assert isinstance(err, dict) and (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert info.value.response.headers.get("x-request-id")
    assert upstream.requests == before


def test_parameters_in_range_pass(px: ProxyServer) -> None:
    """The bounds refuse nothing a client means."""
    stream = _client(px).chat.completions.create(
        model="m", messages=_msg("finished-no-done"), stream=True, n=1, max_tokens=4096,  # type: ignore[arg-type]
        max_completion_tokens=1, top_logprobs=20, logprobs=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "hello"


@pytest.mark.parametrize("scenario", ["whole", "done-then-drop"])
def test_a_stream_read_whole_goes_out_in_one_write_after_its_row(
    px: ProxyServer, scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The headers, the frames and [DONE] in one socket write, as one content-length framed response (the whole
    answer is in hand: no chunk framing); the usage row is recorded before that write (a kill -9 after the client
    has its end must not lose it)."""
    from aiohttp import http_writer

    sink = px.services.usage
    assert isinstance(sink, MemoryUsageSink)
    writes: list[tuple[bytes, int]] = []  # what was written, and how many rows the sink had then
    plain, lines = http_writer.StreamWriter._write, http_writer.StreamWriter._writelines

    def write(self: http_writer.StreamWriter, chunk: bytes) -> None:
        writes.append((bytes(chunk), len(sink.events)))
        plain(self, chunk)

    def writelines(self: http_writer.StreamWriter, chunks: list[bytes]) -> None:
        writes.append((b"".join(chunks), len(sink.events)))
        lines(self, chunks)

    monkeypatch.setattr(http_writer.StreamWriter, "_write", write)
    monkeypatch.setattr(http_writer.StreamWriter, "_writelines", writelines)
    before = len(sink.events)
    raw = _client(px).chat.completions.with_raw_response.create(
        model="m", messages=_msg(scenario), stream=True, stream_options={"include_usage": True}  # type: ignore[arg-type]
    )
    rid = raw.headers.get("x-request-id")
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "hello"
    row = _row(px, rid)
    assert (row.status, row.total_tokens) == (200, 5)
    mine = [(data, rows) for data, rows in writes if b"data: " in data or data.startswith(b"HTTP/1.1 200")]
    assert len(mine) == 1, [d[:40] for d, _ in mine]
    data, rows = mine[0]
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"\r\ncontent-type: text/event-stream" in head
    assert b"transfer-encoding" not in head.lower() and b"\r\ncontent-length: %d" % len(body) in head.lower()
    assert body == b"".join([*HELLO, _event({}, "stop"), USAGE, b"data: [DONE]\n\n"]).replace(b'"model":"up"',
                                                                                                b'"model":"m"')
    assert rows == before + 1  # the row was in the sink when the write went out


@pytest.fixture(scope="module")
def px_limited(upstream: RawUpstream) -> Iterator[ProxyServer]:
    limits = "limits:\n  store: memory\n  rules:\n    - {name: rpm, per: user, requests_per_minute: 1000}\n"
    with ProxyServer(native_config(_config(upstream, limits)), usage=MemoryUsageSink()) as server:
        yield server


def _plain_response(head: bytes, body: bytes) -> None:
    """A whole answer sent as one plain response: content-length framed, no chunk framing."""
    assert b"transfer-encoding" not in head.lower()
    assert b"\r\ncontent-length: %d\r\n" % len(body) in head.lower() + b"\r\n"


def test_a_whole_stream_sent_as_one_response_keeps_its_headers_and_another_api_framing(
    px_limited: ProxyServer,
) -> None:
    """The whole answer in hand (one content-length framed response): the limits' headers and the request id are
    on it, its body is every event; an ingress with its own framing (Anthropic Messages) frames it whole too, and
    each usage row is the answer's."""
    import http.client

    def post(path: str, body: dict[str, object]) -> tuple[bytes, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", px_limited.port, timeout=20)
        try:
            conn.request("POST", path, orjson.dumps(body), {"content-type": "application/json",
                                                            "anthropic-version": "2023-06-01"})
            resp = conn.getresponse()
            assert resp.status == 200
            head = b"".join(b"%s: %s\r\n" % (k.lower().encode(), v.encode()) for k, v in resp.getheaders())
            return head, resp.read()
        finally:
            conn.close()

    head, body = post("/v1/chat/completions", {"model": "m", "messages": _msg("whole"), "stream": True,
                                               "stream_options": {"include_usage": True}})
    _plain_response(head, body)
    assert b"x-ratelimit-limit-requests: 1000\r\n" in head and b"x-ratelimit-remaining-requests: " in head
    assert b"content-type: text/event-stream" in head and b"x-request-id: req_" in head
    assert body == b"".join([*HELLO, _event({}, "stop"), USAGE, b"data: [DONE]\n\n"]).replace(b'"model":"up"',
                                                                                            b'"model":"m"')
    rid = next(ln[14:] for ln in head.split(b"\r\n") if ln.startswith(b"x-request-id: ")).decode()
    row = _row(px_limited, rid)
    assert (row.status, row.total_tokens, row.streamed, row.client_api) == (200, 5, True, "openai.chat")

    head, body = post("/v1/messages", {"model": "m", "max_tokens": 20, "messages": _msg("whole"), "stream": True})
    _plain_response(head, body)
    assert b"x-ratelimit-limit-requests: 1000\r\n" in head and b"content-type: text/event-stream" in head
    events = [orjson.loads(ln[6:]) for ln in body.split(b"\n") if ln.startswith(b"data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == "hello" and body.endswith(b"\n\n")
    rid = next(ln[14:] for ln in head.split(b"\r\n") if ln.startswith(b"x-request-id: ")).decode()
    row = _row(px_limited, rid)
    assert (row.status, row.total_tokens, row.client_api) == (200, 5, "anthropic.messages")
