"""The client connection on raw sockets: parser rejections in the envelope, timeouts, header and connection caps."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from llm_proxy.errors import Unauthorized
from llm_proxy.types import ANONYMOUS, Principal

from ..conftest import Emulator, basic_config
from ..helpers import ProxyServer, native_config
from .rawhttp import Reply, connect, exchange, read_reply, wait_closed

CANARY = "canary-7f3a9c1e5b2d"
FAST = ("server: {header_timeout_seconds: 0.5, body_timeout_seconds: 0.5, keepalive_timeout_seconds: 1.0,"
        " max_connections: 8}")


@pytest.fixture(scope="module")
def fast(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(basic_config(emulator.base_url, FAST))) as px:
        yield px


@pytest.fixture(scope="module")
def default(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(basic_config(emulator.base_url))) as px:
        yield px


def envelope(reply: Reply, status: int, code: str | None) -> dict[str, Any]:
    assert reply.status == status, reply.raw[:300]
    assert reply.status_line.startswith(b"HTTP/1.1 "), reply.status_line
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["x-request-id"].startswith("req_")
    err: dict[str, Any] = json.loads(reply.body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


def no_canary(reply: Reply, caplog: pytest.LogCaptureFixture, canary: str = CANARY) -> None:
    assert canary.encode() not in reply.raw
    for rec in caplog.records:
        assert canary not in json.dumps(rec.__dict__, default=str), rec.getMessage()
        assert rec.exc_info is None, rec.getMessage()  # no traceback for a client's bad bytes


# ---- what the parser refuses -----------------------------------------------------------------------


def test_bad_header_byte_with_a_bearer_token_is_not_echoed_or_logged(
    default: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {CANARY}\x01{CANARY}\r\n\r\n"
    reply = exchange(default.port, head.encode())
    envelope(reply, 400, "bad_request")
    no_canary(reply, caplog)
    refused = [r for r in caplog.records if r.getMessage() == "request refused by the HTTP layer"]
    assert len(refused) <= 1
    assert reply.closed


def test_parser_rejections_log_at_most_one_line_a_second(
    default: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    for _ in range(30):
        reply = exchange(default.port, b"GET / HTTP/1.1\r\nHost: localhost\r\nBad\x7fName: v\r\n\r\n")
        envelope(reply, 400, "bad_request")
    elapsed = time.monotonic() - started
    refused = [r for r in caplog.records if r.getMessage() == "request refused by the HTTP layer"]
    assert len(refused) <= int(elapsed) + 2
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")]


@pytest.mark.parametrize(
    ("line", "status", "code"),
    [
        (f"GET /{CANARY} HTTP/2.0", 505, "http_version_not_supported"),
        (f"GET /{CANARY} HTTP/0.9", 505, "http_version_not_supported"),
        (f"GET /{CANARY}", 505, "http_version_not_supported"),  # an HTTP/0.9 simple request
        (f"GET /{CANARY} HTTP/1.1 extra", 400, "bad_request"),
        (f"\x16\x03\x01{CANARY}", 400, "bad_request"),  # TLS on the plain port
        (f"GET /{'a' * 9000}{CANARY} HTTP/1.1", 414, "uri_too_long"),
    ],
)
def test_odd_request_lines_get_the_envelope_and_no_echo(
    default: ProxyServer, caplog: pytest.LogCaptureFixture, line: str, status: int, code: str
) -> None:
    reply = exchange(default.port, f"{line}\r\nHost: localhost\r\n\r\n".encode())
    envelope(reply, status, code)
    no_canary(reply, caplog)


def test_one_oversized_header_is_431_and_not_echoed(default: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    head = f"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nX-Big: {CANARY}{'v' * 17000}\r\n\r\n"
    reply = exchange(default.port, head.encode())
    envelope(reply, 431, "request_header_fields_too_large")
    no_canary(reply, caplog)


def test_headers_over_the_total_are_431_even_before_the_head_ends(default: ProxyServer) -> None:
    with connect(default.port) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
        line = b"X-Filler-%d: " + b"v" * 8000 + b"\r\n"
        try:
            for i in range(16):  # 128 KB of headers, 8 KB each (under the per-header limit); never finished
                s.sendall(line % i)
        except OSError:  # the proxy may close while we are still sending
            pass
        reply = read_reply(s)
    envelope(reply, 431, "request_header_fields_too_large")


def test_too_many_headers_is_431(default: ProxyServer) -> None:
    many = b"".join(b"X-%d: v\r\n" % i for i in range(200))
    head = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n" + many + b"\r\n"
    envelope(exchange(default.port, head), 431, "request_header_fields_too_large")


class RecordingAuth:
    """Records the Authorization header length each request reached auth with."""

    def __init__(self, principal: Principal = ANONYMOUS) -> None:
        self.seen: list[int] = []
        self.principal = principal

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        value = headers.get("Authorization")
        if value is None:
            raise Unauthorized("Missing bearer token")
        self.seen.append(len(value))
        return self.principal

    def health(self) -> dict[str, Any]:
        return {"ok": True, "mode": "none"}


def test_a_big_authorization_reaches_auth_within_its_own_limit(emulator: Emulator) -> None:
    auth = RecordingAuth()
    with ProxyServer(native_config(basic_config(emulator.base_url)), authenticator=auth) as px:
        token = "Bearer " + "t" * (30 * 1024)  # over the 16 KiB per-header limit, under Authorization's 32 KiB
        head = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: {token}\r\n\r\n".encode()
        reply = exchange(px.port, head, close_after=True)
        assert reply.status == 200, reply.raw[:300]
        assert auth.seen == [len(token)]
        over = f"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {'t' * (33 * 1024)}\r\n\r\n"
        envelope(exchange(px.port, over.encode()), 431, "request_header_fields_too_large")
        assert auth.seen == [len(token)]


def test_unfinished_heads_cannot_grow_memory_without_bound(default: ProxyServer) -> None:
    """40 clients each send 1 MiB of headers and never finish: each is cut at max_header_bytes (64 KiB).

    Before the cap, aiohttp kept up to 128 headers x 128 KiB per unfinished request (10 such requests took a
    worker from 55 to 360 MB); here the process grows by a few MB at most."""

    def rss() -> int:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    socks = []
    line = b"X-Filler: " + b"v" * 8000 + b"\r\n"
    try:
        for _ in range(40):
            s = connect(default.port)
            socks.append(s)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
            try:
                for _ in range(128):
                    s.sendall(line)
            except OSError:
                pass
        grown = rss() - before
        for s in socks:
            assert read_reply(s).status == 431
    finally:
        for s in socks:
            s.close()
    assert grown < 30 * 1024 * 1024, grown


def test_big_bodies_in_one_read_are_not_mistaken_for_big_heads(default: ProxyServer) -> None:
    body = json.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x" * 300_000}]}).encode()
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    assert exchange(default.port, head + body).status == 200


def test_pipelined_requests_are_answered_in_order(default: ProxyServer) -> None:
    one = b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with connect(default.port) as s:
        s.sendall(one + one + b"GET /v1/version HTTP/2.0\r\nHost: localhost\r\n\r\n")
        raw = read_reply(s).raw
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", raw) == [b"200", b"200", b"505"]


# ---- time limits ------------------------------------------------------------------------------------


def test_slowloris_head_is_cut_at_the_header_timeout(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        started = time.monotonic()
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n")
        s.settimeout(0.1)
        closed = False
        while not closed and time.monotonic() - started < 5:
            try:
                s.sendall(b"X-Slow: 1\r\n")  # one header line every 100 ms, never the end of the head
                while s.recv(65536):  # the 408 (if it is read before the reset)
                    pass
                closed = True
            except TimeoutError:
                continue
            except OSError:
                closed = True
        elapsed = time.monotonic() - started
    assert closed and elapsed < 2.5, elapsed  # header_timeout 0.5 s; aiohttp's keep-alive was 3,630 s


def test_an_unfinished_head_gets_408_at_the_header_timeout(fast: ProxyServer, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    with connect(fast.port) as s:
        started = time.monotonic()
        s.sendall(f"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {CANARY}\r\n".encode())
        reply = read_reply(s, timeout=5)
    assert time.monotonic() - started < 2.5
    envelope(reply, 408, "request_timeout")
    assert reply.closed
    no_canary(reply, caplog)


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        started = time.monotonic()
        assert wait_closed(s, 5) == b""  # closed quietly: nothing was asked
        assert time.monotonic() - started < 2.5


def test_slow_body_is_cut_at_the_body_timeout(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        started = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        reply = read_reply(s, timeout=5)
        elapsed = time.monotonic() - started
        assert wait_closed(s, 5) == b""
    envelope(reply, 408, "request_timeout")
    assert elapsed < 2.5, elapsed


def test_the_header_timeout_also_applies_to_the_next_request_on_a_connection(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_reply(s, until_complete=True).status == 200
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: local")  # and never the rest
        started = time.monotonic()
        reply = read_reply(s, timeout=5)
    envelope(reply, 408, "request_timeout")
    assert time.monotonic() - started < 2.5


def test_a_body_that_keeps_coming_within_the_timeout_is_served(fast: ProxyServer) -> None:
    body = b'{"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    with connect(fast.port) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode())
        for i in range(0, len(body), 30):
            time.sleep(0.1)  # the slow (but not too slow) client under test: 3 pieces within 0.5 s
            s.sendall(body[i:i + 30])
        assert read_reply(s, until_complete=True).status == 200


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert read_reply(s, until_complete=True).status == 200
        served = time.monotonic()
        assert wait_closed(s, 5) == b""
        idle = time.monotonic() - served
    assert 0.8 < idle < 3, idle


def test_keepalive_connection_serves_requests_one_after_another(fast: ProxyServer) -> None:
    with connect(fast.port) as s:
        for _ in range(3):
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_reply(s, until_complete=True).status == 200


# ---- a request with a body, then the same connection ----------------------------------------------
# aiohttp's StreamReader calls the protocol's resume_reading() after each read of a body, which feeds the
# protocol an empty read: that must not start the next head's header timeout while the connection is only
# answering (or idle, kept alive).

_CHAT = b'{"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'


def _post_chat(s: Any) -> Reply:
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(_CHAT)}\r\n\r\n".encode() + _CHAT)
    return read_reply(s, until_complete=True)


def test_an_answer_slower_than_the_header_timeout_keeps_its_connection(fast: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "slow", "delay_ms": 900}, {"content": "next"}]})
    with connect(fast.port) as s:
        first = _post_chat(s)
        assert first.status == 200, first.raw[:300]
        assert not first.closed
        second = _post_chat(s)  # the same connection: no 408 queued while the first was answered
        assert second.status == 200, second.raw[:300]
        assert json.loads(second.body)["choices"][0]["message"]["content"] == "next"


def test_idle_after_a_request_with_a_body_lasts_the_keepalive_timeout(fast: ProxyServer, emulator: Emulator) -> None:
    with connect(fast.port) as s:
        assert _post_chat(s).status == 200
        served = time.monotonic()
        assert wait_closed(s, 5) == b""
        idle = time.monotonic() - served
    assert 0.8 < idle < 3, idle  # keepalive_timeout (1.0 s), not header_timeout (0.5 s)


# ---- connection cap --------------------------------------------------------------------------------


def test_connections_over_the_cap_are_refused_and_the_proxy_stays_healthy(emulator: Emulator) -> None:
    with ProxyServer(native_config(basic_config(emulator.base_url, FAST))) as px:  # its own: no leftovers
        _fill_the_cap(px)


def _fill_the_cap(fast: ProxyServer) -> None:
    held = []
    try:
        for _ in range(8):  # max_connections 8: fill it with live keep-alive connections
            s = connect(fast.port)
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_reply(s, until_complete=True).status == 200
            held.append(s)
        with connect(fast.port) as extra:
            try:
                extra.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            except OSError:
                pass
            reply = read_reply(extra, timeout=5)
            assert reply.status in (503, 0), reply.raw[:200]  # 503 in the envelope, or closed before it was read
            if reply.status == 503:
                envelope(reply, 503, "too_many_connections")
        for s in held:  # the connections inside the cap still work
            s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_reply(s, until_complete=True).status == 200
        held.pop().close()
        deadline = time.monotonic() + 5
        while True:  # once one has gone, a new connection is served again
            reply = exchange(fast.port, b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            if reply.status == 200 or time.monotonic() > deadline:
                break
        assert reply.status == 200
    finally:
        for s in held:
            s.close()


def test_max_connections_counts_closed_connections_out(fast: ProxyServer) -> None:
    for _ in range(30):  # many more than the cap, one after the other
        reply = exchange(fast.port, b"GET /v1/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert reply.status == 200



def test_an_error_escaping_the_middleware_is_a_500_envelope(emulator: Emulator) -> None:
    from llm_proxy.core.usage_memory import MemoryUsageSink

    class Broken(MemoryUsageSink):
        def record(self, event: Any) -> None:
            raise RuntimeError("ledger bug")  # raised in the middleware's finally: aiohttp's handle_error(500)

    with ProxyServer(native_config(basic_config(emulator.base_url)), usage=Broken()) as px:
        body = b'{"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
        reply = exchange(px.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Type: application/json\r\n" + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    err = envelope(reply, 500, None)
    assert err["message"] == f"Internal server error (request id {reply.headers['x-request-id']})"
