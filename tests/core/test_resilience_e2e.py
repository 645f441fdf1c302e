"""Retries, fallback, timeouts and cancellation through the real proxy, faults injected by the emulator.

Two providers (`pa`, `pb`) point at the one emulator; their deployments use different upstream model names
(gpt-4o, gpt-4o-mini), so the emulator's per-model queues script each deployment separately and its
recorded requests tell which deployment was called.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.types import UsageEvent

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config

MSG = [{"role": "user", "content": "hello"}]
A, B = "gpt-4o", "gpt-4o-mini"  # upstream names of deployment pa and pb


class RecordingSink(MemoryUsageSink):
    """The in-memory sink, plus a way for the test thread to wait for a row without polling."""

    def __init__(self) -> None:
        super().__init__()
        self.cond = threading.Condition()

    def record(self, event: UsageEvent) -> None:
        with self.cond:
            super().record(event)
            self.cond.notify_all()

    def wait(self, pred: Callable[[UsageEvent], bool], timeout: float = 5.0) -> UsageEvent:
        found: list[UsageEvent] = []

        def check() -> bool:
            found[:] = [e for e in self.events if pred(e)]
            return bool(found)

        with self.cond:
            assert self.cond.wait_for(check, timeout), "usage row not recorded"
        return found[-1]


Rig = tuple[ProxyServer, RecordingSink]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(base_url: str) -> str:
    fast = "{connect: 2, first_byte: 0.6, idle: 0.6, total: 5}"
    return f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 1}}
providers:
  - {{id: pa, type: openai_compat, base_url: "{base_url}", api_key: key-a, timeouts: {fast}}}
  - {{id: pb, type: openai_compat, base_url: "{base_url}", api_key: key-b, timeouts: {fast}}}
  - {{id: dead, type: openai_compat, base_url: "http://127.0.0.1:{_free_port()}/v1", api_key: key-d}}
models:
  - id: m/pair
    deployments: [{{provider: pa, upstream_model: {A}}}, {{provider: pb, upstream_model: {B}}}]
    retry: {{max_attempts: 3, base_delay: 0.05, max_delay: 0.2, deadline: 10}}
    circuit_breaker: {{failure_threshold: 100}}
  - id: m/solo
    provider: pa
    upstream_model: {A}
    retry: {{max_attempts: 3, base_delay: 0.05, max_delay: 0.2, deadline: 3}}
  - id: m/dead
    deployments: [{{provider: dead, upstream_model: {A}}}, {{provider: pb, upstream_model: {B}}}]
  - id: m/cb
    deployments: [{{provider: pa, upstream_model: {A}}}, {{provider: pb, upstream_model: {B}}}]
    circuit_breaker: {{failure_threshold: 2, cooldown: 30}}
  - id: m/trickle
    provider: pa
    upstream_model: {A}
    timeouts: {{idle: 0.3, total: 1.2}}
  - {{id: m/plain, provider: pa, upstream_model: {A}}}
auth: {{mode: none, allow_unauthenticated: true}}
"""


@pytest.fixture(scope="module")
def rig(emulator: Emulator) -> Iterator[Rig]:
    sink = RecordingSink()
    with ProxyServer(native_config(config(emulator.base_url)), usage=sink) as px:
        yield px, sink


@pytest.fixture(autouse=True)
def _fresh_health(rig: Rig) -> None:
    px, _ = rig

    def reset() -> None:
        for pool in px.services.router.pools.values():
            for d in pool.deployments:
                d.failures, d.open_until, d.probing, d.not_before = 0, 0.0, False, 0.0
                d.last_failure = float("-inf")

    px.lt.call(reset)


@dataclass
class Reply:
    status: int
    request_id: str
    seconds: float
    body: dict[str, Any] = field(default_factory=dict)
    text: str = ""  # streamed content
    done: bool = False  # the stream ended with [DONE]
    error: dict[str, Any] | None = None  # a streamed in-band error event
    headers: dict[str, str] = field(default_factory=dict)


def call(px: ProxyServer, model: str, stream: bool = False) -> Reply:
    """One request as a plain HTTP client sees it: status, body or streamed events, and how long it took."""

    async def go() -> Reply:
        body = {"model": model, "messages": MSG, "stream": stream}
        t0 = time.monotonic()
        async with aiohttp.ClientSession() as c, c.post(px.base_url + "/chat/completions", json=body) as r:
            headers = {k.lower(): v for k, v in r.headers.items()}
            reply = Reply(r.status, headers["x-request-id"], 0.0, headers=headers)
            if not stream or r.status != 200:
                reply.body = await r.json()
            else:
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        reply.done = True
                        continue
                    event = orjson.loads(data)
                    if "error" in event:
                        reply.error = event["error"]
                    for ch in event.get("choices") or []:
                        reply.text += ch["delta"].get("content") or ""
            reply.seconds = time.monotonic() - t0
            return reply

    return asyncio.run(go())


def upstream_models(emulator: Emulator) -> list[str]:
    return [r["json"]["model"] for r in emulator.requests() if r["path"] == "/v1/chat/completions"]


def attempts(row: UsageEvent) -> list[tuple[str, int, str | None]]:
    return [(a["provider"], a["status"], a["error"]) for a in row.extra.get("attempts", [])]


def row_of(sink: RecordingSink, reply: Reply) -> UsageEvent:
    return sink.wait(lambda e: e.request_id == reply.request_id)


def err(status: int, **kw: Any) -> dict[str, Any]:
    return {"error": {"status": status, "message": f"upstream says {status}", **kw}}


# ---------------------------------------------------------------------------------------------- non-streamed


@pytest.mark.parametrize(
    ("fault", "first"),
    [
        (err(429, headers={"retry-after": "7"}), (429, "rate_limit_exceeded")),
        (err(500), (500, "server_error")),
        (err(503), (503, "server_error")),
        ({"truncate_body": True}, (502, "upstream_unreachable")),  # reset in the middle of the body
        (err(401), (502, "upstream_auth_failed")),  # this deployment's key is bad: the other one's is not
        ({"hang": True}, (504, "upstream_timeout")),  # first_byte 0.6 s
    ],
    ids=["429-retry-after", "500", "503", "reset-mid-body", "401", "hang"],
)
def test_fault_on_primary_is_answered_by_fallback(
    rig: Rig, emulator: Emulator, fault: dict[str, Any], first: tuple[int, str]
) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, **fault}]})
    r = call(px, "m/pair")
    assert r.status == 200 and r.body["choices"][0]["message"]["content"] == "Echo: hello"
    assert r.body["model"] == "m/pair"
    hang = "hang" in fault
    assert (0.55 < r.seconds < 1.5) if hang else r.seconds < 0.5  # a retry-after of 7 s is not waited for here
    row = row_of(sink, r)
    assert row.status == 200 and row.attempts == 2 and row.provider_id == "pb" and row.upstream_model == B
    assert attempts(row) == [("pa", *first), ("pb", 200, None)]
    assert upstream_models(emulator) == [A, B]
    if hang:
        emulator.wait_until(lambda: emulator.server.state.cancelled == 1)  # the hung request was dropped


def test_4xx_is_never_retried(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, **err(400, param="messages", code="bad_messages")}]})
    r = call(px, "m/pair")
    assert r.status == 400
    assert r.body == {"error": {"message": "upstream says 400", "type": "invalid_request_error",
                                "param": "messages", "code": "bad_messages"}}
    assert upstream_models(emulator) == [A]
    row = row_of(sink, r)
    # The attempts list keeps our closed set of codes (errors.ERROR_CODES), never the upstream's own string.
    assert row.attempts == 1 and attempts(row) == [("pa", 400, "invalid_request_error")]


def test_every_attempt_fails_client_gets_last_error(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, **err(503)}, {"model": B, **err(503)}, {"model": A, **err(500)}]})
    r = call(px, "m/pair")
    assert r.status == 500 and r.body["error"]["message"] == "upstream says 500"
    assert r.body["error"]["type"] == "server_error"
    assert r.seconds < 1.0  # one short backoff (<= 50 ms) before the third attempt
    assert upstream_models(emulator) == [A, B, A]
    row = row_of(sink, r)
    assert row.status == 500 and row.attempts == 3
    assert attempts(row) == [("pa", 503, "server_error"), ("pb", 503, "server_error"), ("pa", 500, "server_error")]
    assert all(a["ms"] >= 0 for a in row.extra["attempts"])


def test_retry_after_honoured_on_the_only_deployment(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, **err(429, headers={"retry-after": "1"})}]})
    r = call(px, "m/solo")
    assert r.status == 200
    assert 0.95 < r.seconds < 2.0
    assert attempts(row_of(sink, r)) == [("pa", 429, "rate_limit_exceeded"), ("pa", 200, None)]


def test_retry_after_beyond_deadline_is_passed_to_client(
    rig: Rig, emulator: Emulator
) -> None:
    px, _ = rig
    emulator.script({"responses": [{"model": A, **err(429, headers={"retry-after": "30"})}]})
    r = call(px, "m/solo")
    assert r.seconds < 0.5  # deadline 3 s: no point waiting 30
    assert r.status == 429 and r.headers["retry-after"] == "30"
    assert r.body["error"]["message"] == "upstream says 429" and r.body["error"]["code"] == "rate_limit_exceeded"
    assert upstream_models(emulator) == [A]


def test_single_deployment_retries_5xx_with_backoff(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, **err(502)}, {"model": A, **err(503)}]})
    r = call(px, "m/solo")
    assert r.status == 200 and r.seconds > 0.05  # backoffs: 25-50 ms, then 50-100 ms
    assert [s for _, s, _ in attempts(row_of(sink, r))] == [502, 503, 200]


def test_connect_error_falls_back(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    r = call(px, "m/dead")
    assert r.status == 200 and r.seconds < 1.0
    assert attempts(row_of(sink, r)) == [("dead", 502, "upstream_unreachable"), ("pb", 200, None)]


def test_without_retry_block_each_deployment_once(rig: Rig, emulator: Emulator) -> None:
    px, _ = rig
    emulator.script({"responses": [{"model": A, **err(500)}, {"model": B, **err(500)}]})
    r = call(px, "m/cb")
    assert r.status == 500
    assert upstream_models(emulator) == [A, B]


# ---------------------------------------------------------------------------------------------- streams


def test_stream_reset_before_first_byte_is_retried(rig: Rig, emulator: Emulator) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, "content": "never seen", "disconnect_after_chunks": 0},
                                   {"model": B, "content": "from the fallback"}]})
    r = call(px, "m/pair", stream=True)
    assert r.status == 200 and r.text == "from the fallback" and r.done and r.error is None
    row = row_of(sink, r)
    assert attempts(row) == [("pa", 502, "upstream_unreachable"), ("pb", 200, None)]
    assert row.completion_tokens == 3  # usage of the attempt that answered


def test_stream_hang_before_first_byte_times_out_and_is_retried(
    rig: Rig, emulator: Emulator
) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, "hang": True}]})
    r = call(px, "m/pair", stream=True)
    assert r.status == 200 and r.text == "Echo: hello" and r.done
    assert 0.55 < r.seconds < 1.5
    assert attempts(row_of(sink, r)) == [("pa", 504, "upstream_timeout"), ("pb", 200, None)]
    emulator.wait_until(lambda: emulator.server.state.cancelled == 1)


def test_stream_cut_after_first_frames_is_not_retried(
    rig: Rig, emulator: Emulator
) -> None:
    px, sink = rig
    emulator.script({"responses": [{"model": A, "content": "one two three four five", "disconnect_after_chunks": 3}]})
    r = call(px, "m/pair", stream=True)
    assert r.status == 200 and r.text == "one two" and not r.done  # what had been relayed, then the error
    assert r.error is not None and r.error["code"] == "upstream_unreachable" and r.error["type"] == "api_error"
    assert upstream_models(emulator) == [A]
    row = row_of(sink, r)
    assert row.status == 502 and row.error_type == "api_error" and row.attempts == 1


def test_slow_trickle_within_idle_completes(rig: Rig, emulator: Emulator) -> None:
    px, _ = rig
    # 8 events 100 ms apart: 0.7 s in all, more than idle (0.3 s) but every gap is below it
    emulator.script({"responses": [{"model": A, "content": "a b c d", "chunks": 4, "chunk_delay_ms": 100}]})
    r = call(px, "m/trickle", stream=True)
    assert r.status == 200 and r.text == "a b c d" and r.done and r.error is None
    assert 0.6 < r.seconds < 1.15


def test_total_timeout_bounds_a_stream(rig: Rig, emulator: Emulator) -> None:
    px, _ = rig
    emulator.script({"responses": [{"model": A, "content": " ".join(["w"] * 30), "chunk_delay_ms": 100}]})
    r = call(px, "m/trickle", stream=True)
    assert r.status == 200 and not r.done and r.error is not None and r.error["code"] == "upstream_timeout"
    assert 0 < len(r.text) < 59
    assert 1.15 < r.seconds < 1.8  # total 1.2 s
    emulator.wait_until(lambda: emulator.server.state.cancelled == 1)


def test_idle_gap_mid_stream_ends_it(rig: Rig, emulator: Emulator) -> None:
    px, _ = rig
    emulator.script({"responses": [{"model": A, "content": "a b c", "chunk_delay_ms": 600}]})
    r = call(px, "m/trickle", stream=True)
    assert r.status == 200 and not r.done and r.error is not None and r.error["code"] == "upstream_timeout"
    assert "without data" in r.error["message"]
    assert 0.25 < r.seconds < 0.7  # the first event came at once, the next did not within idle (0.3 s)


# ---------------------------------------------------------------------------------------------- circuit breaker


def test_failing_deployment_leaves_rotation_then_probe_brings_it_back(
    rig: Rig, emulator: Emulator
) -> None:
    px, sink = rig
    pool = px.services.router.pools["m/cb"]
    emulator.script({"responses": [{"model": A, **err(500)}, {"model": A, **err(500)}]})
    assert call(px, "m/cb").status == 200
    assert call(px, "m/cb").status == 200
    assert upstream_models(emulator) == [A, B, A, B]
    assert px.lt.call(lambda: pool.deployments[0].state(px.lt.loop.time())) == "open"
    r = call(px, "m/cb")
    assert r.status == 200 and upstream_models(emulator)[4:] == [B]  # out of rotation: not even tried
    assert row_of(sink, r).extra.get("attempts") is None  # one clean attempt: the row's own columns say it all

    def end_cooldown() -> None:
        pool.deployments[0].open_until = px.lt.loop.time()

    px.lt.call(end_cooldown)
    r = call(px, "m/cb")  # the single probe, which succeeds
    assert r.status == 200 and upstream_models(emulator)[5:] == [A]
    assert px.lt.call(lambda: pool.deployments[0].state(px.lt.loop.time())) == "closed"


def test_all_deployments_cooling_down_still_serves(rig: Rig, emulator: Emulator) -> None:
    px, _ = rig
    pool = px.services.router.pools["m/cb"]

    def open_both() -> None:
        now = px.lt.loop.time()
        pool.deployments[1].failed(now - 2)  # failed less recently than A
        pool.deployments[0].failed(now - 1)
        for d in pool.deployments:
            d.open_until = now + 60

    px.lt.call(open_both)
    r = call(px, "m/cb")
    assert r.status == 200 and upstream_models(emulator) == [B]
    assert px.lt.call(lambda: pool.deployments[1].state(px.lt.loop.time())) == "closed"  # it answered


# ---------------------------------------------------------------------------------------------- client disconnect


def _raw_request(port: int, body: dict[str, Any]) -> socket.socket:
    payload = orjson.dumps(body)
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    return s


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_client_disconnect_cancels_upstream_at_once(
    rig: Rig, emulator: Emulator, stream: bool
) -> None:
    px, sink = rig
    if stream:
        emulator.script({"responses": [{"model": A, "content": " ".join(["w"] * 100), "chunk_delay_ms": 100}]})
    else:
        emulator.script({"responses": [{"model": A, "hang": True}]})
    s = _raw_request(px.port, {"model": "m/plain", "messages": MSG, "stream": stream})
    if stream:
        got = b""
        while b"data: " not in got:  # the first event reached the client
            got += s.recv(65536)
    else:
        emulator.wait_until(lambda: emulator.server.state.in_flight == 1)
    closed_wall, closed = time.time(), time.monotonic()
    s.close()
    emulator.wait_until(lambda: emulator.server.state.cancelled == 1)
    upstream_gone = time.monotonic() - closed
    row = sink.wait(lambda e: e.model == "m/plain" and e.status == 499)
    assert row.error_type == "client_disconnected" and row.streamed is stream
    proxy_side = row.ended_at - closed_wall
    assert proxy_side < 0.1, proxy_side  # the proxy dropped the upstream request within 100 ms
    assert upstream_gone < 0.15, upstream_gone  # ...and the emulator noticed (it polls every 50 ms at worst)
