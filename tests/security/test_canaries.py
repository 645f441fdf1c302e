"""Canary credentials through every upstream failure shape: they reach no client response, log line or usage row.

Each provider type (openai, openai_compat with a credential-bearing configured header, azure, anthropic, gemini,
bedrock with a bearer key and with SigV4 and a session token) has its own canary key. A scripted fake of each
upstream fails in every way we know of, and in each it echoes every credential it received (and every header, so
a forwarded client token would come back too) in every place an upstream can put text: error message, type,
code, param (as sent, upper case, swapped case, percent-encoded, inside longer strings), non-JSON bodies, JSON cut
short, gzip bodies, bodies cut off on the wire, response headers (retry-after, content-encoding, others) and
mid-stream error events in each wire format (and stream events a translator cannot read). The client sends a
canary bearer token that must never reach an upstream. Checked: every client response (status line, headers,
body), every log line of the proxy (logging and the access log), every usage row (PostgreSQL and SQLite: every
column, the attempts list in `extra` included) and the usage journal on disk. A leak is any 16 characters of a
canary in a row, in any letter case, as sent or percent-encoded.
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import openai
import orjson
import pytest
from aiohttp import web

from llm_proxy.core.usage import UsageLedger
from llm_proxy.errors import ERROR_CODES, ERROR_TYPES
from llm_proxy.logs import AccessLog, JsonFormatter
from llm_proxy.store.db import create_engine
from llm_proxy.store.repos import UsageRepo

from ..helpers import LoopThread, ProxyServer, native_config
from ..providers.support import FakeUpstream, Received
from ..providers.test_bedrock import encode_events, encode_message
from ..store.conftest import db_url  # noqa: F401  (the PostgreSQL + SQLite fixture)
from ..store.dbutil import eventually

# Token-like keys pass the "plain token" check on their own, so only the credential check keeps them out of
# type/code; keys with / + = also have a percent-encoded form that differs.
KEYS = {
    "openai": "sk-proj-canary-OpenAI-k3y-0001-T3BlbkFJ-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "compat": "cmp-canary/Compat+k3y=0002/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "azure": "az-canary/Azure+k3y=0003/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
    "anthropic": "sk-ant-api03-canary-Anthr0pic-0004-9f8e7d6c5b4a39281706f5e4d3c2b1a0-AA",
    "gemini": "AIzaCanary-Gemini_k3y-0005-9f8e7d6c5b4a39281706",
    "bedrock": "br-canary/Bedrock+k3y=0006/9f8e7d6c5b4a39281706f5e4d3c2b1a0",
}
HEADER_TOKEN = "hdr-canary-GatewayToken-0007"  # a configured extra header of `compat`
CLIENT_TOKEN = "client-canary-Bearer-0008"
# Bedrock with SigV4: the secret key never leaves the proxy, the session token goes in x-amz-security-token.
AWS_SECRET = "aws-canary/Secret+Key=0009/9f8e7d6c5b4a39281706"
AWS_SESSION = "IQoJb3JpZ2luX2VjECanary/Session+Token=0010/9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CANARIES = [*KEYS.values(), HEADER_TOKEN, CLIENT_TOKEN, AWS_SECRET, AWS_SESSION]

FAKE_THREAD = "canary-fakes"


WINDOW = 16  # any 16 characters of a canary in a row count as a leak (a key cut short is still a leak)


def forms(secret: str) -> list[str]:
    """Every WINDOW-long piece of every spelling of a secret (compared case-insensitively)."""
    spellings = {secret.lower(), quote(secret, safe="").lower(), quote_plus(secret, safe="").lower()}
    return sorted({s[i : i + WINDOW] for s in spellings for i in range(len(s) - WINDOW + 1)})


FORMS = {c: forms(c) for c in CANARIES}


def leaks(text: str) -> list[str]:
    low = text.lower()
    return [c for c in CANARIES if any(f in low for f in FORMS[c])]


# ------------------------------------------------------------------------------------------------ the fake upstreams


def received_key(rec: Received) -> str:
    for h in ("x-amz-security-token", "authorization", "api-key", "x-api-key", "x-goog-api-key"):
        v = rec.headers.get(h)
        if v:
            return v.removeprefix("Bearer ")
    return "no-credential-received"


def echo(rec: Received) -> str:
    """Every credential the fake got, in the forms an upstream might write it, and every header it got."""
    key = received_key(rec)
    return (f"Incorrect API key provided: {key}. Also {key.upper()} / {key.swapcase()} / {quote(key, safe='')} "
            f"/ key={key}&x=1 / cut short: {key[: len(key) * 2 // 3]}... Headers: {json.dumps(rec.headers)}")


TRACEBACK = ('Traceback (most recent call last):\n  File "/srv/model-server/app/handlers.py", line 212, in generate\n'
             '    raise RuntimeError(msg)\nRuntimeError: CUDA error at /opt/runtime/kernels.cu:88 ')


@dataclass(frozen=True)
class Shape:
    name: str
    status: int = 200
    stream: bool = False  # the client asks for a stream
    kinds: tuple[str, ...] = ("openai", "azure", "anthropic", "gemini", "bedrock")


SHAPES = [
    Shape("fields", 400), Shape("fields", 404), Shape("fields", 429), Shape("fields", 500), Shape("fields", 503),
    Shape("fields", 401), Shape("fields", 400, stream=True), Shape("fields", 500, stream=True),
    Shape("internals", 500), Shape("internals", 502, stream=True),
    Shape("text", 500), Shape("text", 400, stream=True),
    Shape("truncated_json", 500), Shape("gzip", 429), Shape("gzip", 500, stream=True),
    Shape("cut_body", 500), Shape("error_with_200", 200), Shape("headers", 429), Shape("headers", 503, stream=True),
    Shape("bad_encoding", 400),
    Shape("stream_error", stream=True), Shape("stream_error_first", stream=True),
    Shape("stream_error_numeric", stream=True, kinds=("openai", "azure", "gemini")),
    Shape("stream_error_string", stream=True, kinds=("openai", "azure")),
    Shape("stream_error_raw", stream=True, kinds=("openai", "azure", "anthropic", "gemini")),
    Shape("stream_error_message", stream=True, kinds=("bedrock",)),
    Shape("stream_error_bad_index", stream=True, kinds=("anthropic", "bedrock")),  # int('<key>') in a translator
]


def error_body(kind: str, status: int, rec: Received) -> dict[str, Any]:
    """The upstream's native error body with the echo in every field it has."""
    key = received_key(rec)
    msg = echo(rec)
    if kind == "anthropic":
        return {"type": "error", "error": {"type": key, "message": msg}}
    if kind == "gemini":
        return {"error": {"code": status, "message": msg, "status": key,
                          "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": key,
                                       "metadata": {"key": key}}]}}
    if kind == "bedrock":
        return {"message": msg, "Message": msg, "__type": f"com.amazon#{key}"}
    return {"error": {"message": msg, "type": key, "code": key.swapcase(), "param": f"messages[0].{key}"}}


def _openai_chunk(text: str) -> bytes:
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up-model",
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def stream_body(kind: str, shape: str, rec: Received) -> tuple[bytes, bytes]:
    """A 200 stream in the upstream's wire format that fails with an error event: (what comes before the error,
    the error). With nothing before it (`stream_error_first`) the proxy can still answer with an HTTP error."""
    key = received_key(rec)
    msg = echo(rec)
    first = shape == "stream_error_first"
    if kind in ("openai", "azure"):
        if shape == "stream_error_numeric":  # vLLM: the HTTP status in `code`, its exception name in `type`
            err: Any = {"object": "error", "message": msg, "type": key, "param": key, "code": 500}
        elif shape == "stream_error_string":
            err = msg
        else:
            err = {"message": msg, "type": key, "code": key, "param": key}
        event = b"data: " + orjson.dumps({"error": err}) + b"\n\n"
        if shape == "stream_error_raw":  # not JSON at all
            event = b'data: {"error": "' + msg.encode() + b"\n\n"
        return (b"" if first else _openai_chunk("Hello")), event
    if kind == "anthropic":
        start = (b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1","usage":'
                 b'{"input_tokens":3,"output_tokens":0}}}\n\n'
                 b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
                 b'"delta":{"type":"text_delta","text":"Hello"}}\n\n')
        payload = orjson.dumps({"type": "error", "error": {"type": key, "message": msg}})
        if shape == "stream_error_bad_index":
            bad = {"type": "content_block_start", "index": key, "content_block": {"type": "tool_use", "id": "t",
                                                                                 "name": "f", "input": {}}}
            return start, b"event: content_block_start\ndata: " + orjson.dumps(bad) + b"\n\n"
        if shape == "stream_error_raw":
            payload = b'{"type": "error", "error": {"message": "' + msg.encode()
        return (b"" if first else start), b"event: error\ndata: " + payload + b"\n\n"
    if kind == "gemini":
        start = b'data: {"candidates":[{"content":{"parts":[{"text":"Hello"}],"role":"model"},"index":0}]}\n\n'
        code: Any = 500 if shape == "stream_error_numeric" else key
        payload = orjson.dumps({"error": {"code": code, "message": msg, "status": key}})
        if shape == "stream_error_raw":
            payload = b'{"error": {"message": "' + msg.encode()
        return (b"" if first else start), b"data: " + payload + b"\n\n"
    # bedrock: an exception message, or a message of type error
    head = b"" if first else encode_events([
        {"event": "messageStart", "payload": {"role": "assistant"}},
        {"event": "contentBlockDelta", "payload": {"contentBlockIndex": 0, "delta": {"text": "Hello"}}}])
    if shape == "stream_error_bad_index":
        return head, encode_events([{"event": "contentBlockStart", "payload": {
            "contentBlockIndex": key, "start": {"toolUse": {"toolUseId": "t", "name": "f"}}}}])
    if shape == "stream_error_message":
        return head, encode_message({":message-type": "error", ":error-code": key, ":error-message": msg}, b"")
    return head, encode_message({":exception-type": key, ":content-type": "application/json",
                                 ":message-type": "exception"}, orjson.dumps({"message": msg}))


# Set by the client once it has the stream's first event, so that the upstream's error comes after the proxy
# has started relaying (mid-stream) rather than before (then the proxy can still answer with an HTTP error).
GATE = threading.Event()


STREAM_TYPES = {"openai": "text/event-stream", "azure": "text/event-stream", "anthropic": "text/event-stream",
                "gemini": "text/event-stream", "bedrock": "application/vnd.amazon.eventstream"}


def shape_of(rec: Received) -> tuple[str, int]:
    marker = rec.body.split(b"shape=", 1)[1].split(b";", 1)[0].decode()
    name, status = marker.split(":")
    return name, int(status)


def handler_for(kind: str) -> Any:
    async def handle(request: web.Request, rec: Received) -> web.StreamResponse:
        name, status = shape_of(rec)
        key = received_key(rec)
        if name.startswith("stream_error"):
            head, error = stream_body(kind, name, rec)
            resp = web.StreamResponse(status=200, headers={"content-type": STREAM_TYPES[kind]})
            await resp.prepare(request)
            if head:
                await resp.write(head)
                await asyncio.to_thread(GATE.wait, 20)
                GATE.clear()
            await resp.write(error)
            await resp.write_eof()
            return resp
        body = orjson.dumps(error_body(kind, status, rec))
        headers = {"content-type": "application/json", "x-request-id": key, "x-echo": echo(rec)[:200]}
        if kind == "bedrock":
            headers["x-amzn-ErrorType"] = f"{key}:http://internal.amazon.com/coral/"
        if name == "internals":
            err = error_body(kind, status, rec)
            text = TRACEBACK + echo(rec)
            if kind == "bedrock":
                err["message"] = err["Message"] = text
            else:
                err["error"]["message"] = text
            body = orjson.dumps(err)
        elif name == "text":
            headers["content-type"] = "text/html"
            body = f"<html><body><h1>{status}</h1><pre>{TRACEBACK}{echo(rec)}</pre></body></html>".encode()
        elif name == "truncated_json":
            body = body[: len(body) * 2 // 3]
        elif name == "gzip":
            headers["content-encoding"] = "gzip"
            body = gzip.compress(body)
        elif name == "headers":
            headers.update({"retry-after": key, "retry-after-ms": quote(key, safe=""),
                            "www-authenticate": f'Bearer realm="{key}"', "set-cookie": f"s={key}"})
        elif name == "bad_encoding":
            headers["content-encoding"] = key
        elif name == "cut_body":
            resp = web.StreamResponse(status=status, headers={"content-type": "application/json"})
            resp.content_length = len(body) + 4096
            await resp.prepare(request)
            await resp.write(body[: len(body) - 10])
            assert request.transport is not None
            request.transport.close()  # the body stops short of its Content-Length
            return resp
        return web.Response(status=status, body=body, headers=headers)

    return handle


# --------------------------------------------------------------------------------------------------------- the proxy

MODELS = {"openai": "openai", "compat": "openai", "azure": "azure", "anthropic": "anthropic", "gemini": "gemini",
          "bedrock": "bedrock", "sigv4": "bedrock"}  # provider id -> the fake (wire format) it talks to


def config(urls: dict[str, str], db: str, spool: Path) -> str:
    return f"""
providers:
  - {{id: openai, type: openai, base_url: "{urls['openai']}/v1", api_key: "{KEYS['openai']}"}}
  - {{id: compat, type: openai_compat, base_url: "{urls['openai']}/v1", api_key: "{KEYS['compat']}",
      headers: {{X-Gateway-Token: "{HEADER_TOKEN}"}}}}
  - {{id: azure, type: azure, base_url: "{urls['azure']}", api_key: "{KEYS['azure']}"}}
  - {{id: anthropic, type: anthropic, base_url: "{urls['anthropic']}", api_key: "{KEYS['anthropic']}"}}
  - {{id: gemini, type: gemini, base_url: "{urls['gemini']}", api_key: "{KEYS['gemini']}"}}
  - {{id: bedrock, type: bedrock, base_url: "{urls['bedrock']}", region: us-east-1, api_key: "{KEYS['bedrock']}"}}
  - {{id: sigv4, type: bedrock, base_url: "{urls['bedrock']}", region: us-east-1,
      aws_access_key_id: AKIACANARYACCESSKEY, aws_secret_access_key: "{AWS_SECRET}",
      aws_session_token: "{AWS_SESSION}"}}
models:
  - {{id: openai/m, provider: openai, upstream_model: up-model}}
  - {{id: compat/m, provider: compat, upstream_model: up-model}}
  - {{id: azure/m, provider: azure, upstream_model: up-deployment}}
  - {{id: anthropic/m, provider: anthropic, upstream_model: claude-up}}
  - {{id: gemini/m, provider: gemini, upstream_model: gemini-up}}
  - {{id: bedrock/m, provider: bedrock, upstream_model: "anthropic.claude-up-v1:0"}}
  - {{id: sigv4/m, provider: sigv4, upstream_model: "anthropic.claude-up-v1:0"}}
  - id: retried/m
    deployments:
      - {{provider: openai, upstream_model: up-model}}
      - {{provider: compat, upstream_model: up-model}}
    retry: {{max_attempts: 3, base_delay: 0.01, max_delay: 0.02}}
    circuit_breaker: {{failure_threshold: 100000}}
auth: {{mode: none, allow_unauthenticated: true}}
server: {{drain_delay_seconds: 0}}
database: {{url: "{db}"}}
usage: {{spool_dir: "{spool}", flush_interval_seconds: 0.05}}
"""


class Capture(logging.Handler):
    """Every log record of the proxy's thread, formatted as the proxy would write it (traceback included)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        if record.threadName == FAKE_THREAD:  # the fakes' own logs are theirs, not the proxy's
            return
        line = self.format(record)
        with self._lock:
            self.lines.append(line)


@dataclass
class Env:
    proxy: ProxyServer
    fakes: dict[str, FakeUpstream]
    capture: Capture
    access_path: Path
    spool: Path
    db: str
    seen: list[tuple[str, int, dict[str, str], bytes]] = field(default_factory=list)  # rid, status, headers, body


@pytest.fixture(scope="module")
def env(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:  # noqa: F811
    lt = LoopThread(FAKE_THREAD)
    fakes: dict[str, FakeUpstream] = {}
    capture = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    tmp = tmp_path_factory.mktemp("canaries")
    access_path = tmp / "access.log"
    fd = os.open(access_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for kind in ("openai", "azure", "anthropic", "gemini", "bedrock"):
            fakes[kind] = lt.run(FakeUpstream(handler_for(kind)).start())
        loaded = native_config(config({k: f.url for k, f in fakes.items()}, db_url, tmp / "spool"))
        with ProxyServer(loaded, usage=UsageLedger.from_config(loaded)) as px:
            px.services.access_log = AccessLog(fd=fd)
            yield Env(px, fakes, capture, access_path, tmp / "spool", db_url)
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        os.close(fd)
        for f in fakes.values():
            lt.run(f.close())
        lt.stop()


def post(px: ProxyServer, model: str, shape: Shape) -> tuple[int, dict[str, str], bytes]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": f"shape={shape.name}:"
                                                                                    f"{shape.status};"}]}
    if shape.stream:
        body["stream"] = True
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", orjson.dumps(body),
                     {"content-type": "application/json", "authorization": f"Bearer {CLIENT_TOKEN}",
                      "x-api-key": CLIENT_TOKEN})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        body = b""
        if resp.status == 200 and shape.stream:
            while b"\n\n" not in body and (piece := resp.read1(65536)):
                body += piece
            GATE.set()  # the first event is here: now the upstream may fail
        return resp.status, headers, body + resp.read()
    finally:
        conn.close()


def cases() -> list[tuple[str, Shape]]:
    return [(pid, s) for s in SHAPES for pid, kind in MODELS.items() if kind in s.kinds]


def _events(body: bytes) -> list[Any]:
    return [orjson.loads(line[6:]) for line in body.split(b"\n") if line.startswith(b"data: {")]


@pytest.mark.parametrize(("provider", "shape"), cases(),
                         ids=[f"{p}-{s.name}-{s.status}{'-stream' if s.stream else ''}" for p, s in cases()])
def test_no_canary_in_the_response(env: Env, provider: str, shape: Shape) -> None:
    status, headers, body = post(env.proxy, f"{provider}/m", shape)
    env.seen.append((headers.get("x-request-id", ""), status, headers, body))
    wire = f"{status} {json.dumps(headers)} ".encode() + body
    assert not leaks(wire.decode("utf-8", "replace")), wire
    assert "x-request-id" in headers and "Traceback" not in body.decode("utf-8", "replace")
    if shape.name == "stream_error_first":  # nothing had reached the client: a real HTTP error instead
        assert status >= 400
    if status != 200:  # an HTTP error: OpenAI's envelope, the status kept (ours for credential problems)
        err = orjson.loads(body)["error"]
        assert set(err) == {"message", "type", "param", "code"}
        if shape.name == "fields" and shape.status == 401:
            assert (status, err["code"]) == (502, "upstream_auth_failed")
        elif shape.name in ("fields", "internals", "text", "gzip", "headers", "truncated_json"):
            assert status == shape.status
        if shape.name == "error_with_200" and provider in ("openai", "compat", "azure"):
            assert status == 502
        if shape.name == "internals":
            assert err["message"] == (f"Upstream provider '{provider}' failed with an internal error "
                                      f"(HTTP {status})")
        return
    if not shape.stream:
        return  # an error body with HTTP 200 that the translator read as an (empty) answer
    events = _events(body)
    if shape.name == "stream_error_raw":
        return  # an unreadable event: dropped or reported, never relayed (checked above)
    assert events and "error" in events[-1], body  # a stream that failed ends with our error event
    err = events[-1]["error"]
    assert set(err) == {"message", "type", "param", "code"}


def test_retried_attempts_leak_nothing(env: Env) -> None:
    for shape in (Shape("fields", 503), Shape("headers", 429), Shape("internals", 500),
                  Shape("stream_error_first", 502, stream=True)):
        before = len(env.fakes["openai"].received)
        status, headers, body = post(env.proxy, "retried/m", shape)
        env.seen.append((headers["x-request-id"], status, headers, body))
        assert status == shape.status and not leaks(f"{headers} {body!r}")
        assert len(env.fakes["openai"].received) - before >= 2  # both deployments were tried


def test_a_translator_that_fails_on_an_error_body_leaks_nothing(env: Env) -> None:
    provider = env.proxy.services.router.providers["openai"]

    def broken(status: int, headers: Any, raw: bytes) -> Any:
        raise ValueError(f"invalid literal for int() with base 10: {raw[:400]!r}")  # quotes what the upstream sent

    provider.parse_error = broken  # type: ignore[method-assign]
    try:
        status, headers, body = post(env.proxy, "openai/m", Shape("fields", 400))
    finally:
        del provider.parse_error  # type: ignore[attr-defined]
    env.seen.append((headers["x-request-id"], status, headers, body))
    assert status == 502 and orjson.loads(body)["error"]["code"] == "bad_upstream_response"
    assert not leaks(f"{headers} {body!r}")



def test_what_the_openai_sdk_raises_holds_no_canary(env: Env) -> None:
    client = openai.OpenAI(base_url=env.proxy.base_url, api_key=CLIENT_TOKEN, max_retries=0, timeout=20)
    seen: list[str] = []
    for provider in MODELS:
        with pytest.raises(openai.APIStatusError) as ei:
            client.chat.completions.create(model=f"{provider}/m", messages=[{"role": "user", "content":
                                                                           "shape=fields:429;"}])
        seen.append(f"{ei.value} {ei.value.body} {dict(ei.value.response.headers)}")
        chunks = client.chat.completions.create(model=f"{provider}/m", stream=True, messages=[
            {"role": "user", "content": "shape=stream_error:200;"}])
        with pytest.raises(openai.APIError) as ej:
            for _chunk in chunks:
                GATE.set()  # the first chunk is here: now the upstream fails mid-stream
        seen.append(f"{ej.value} {ej.value.body}")
    client.close()
    assert not [s for s in seen if leaks(s)]

def test_the_client_token_never_reaches_an_upstream(env: Env) -> None:
    got = [r for f in env.fakes.values() for r in f.received]
    assert len(got) >= len(cases())
    for rec in got:
        assert not [c for c in leaks(json.dumps(rec.headers) + rec.body.decode()) if c == CLIENT_TOKEN]


def test_no_canary_in_any_log_line(env: Env) -> None:
    env.proxy.lt.call(lambda: env.proxy.services.access_log.flush())  # type: ignore[union-attr]
    access = env.access_path.read_text().splitlines()
    assert len(access) >= len(env.seen)
    lines = env.capture.lines + access
    assert not [line for line in lines if leaks(line)]
    for line in access:
        rec = json.loads(line)
        assert rec["error_type"] is None or rec["error_type"] in ERROR_TYPES, rec
    # What a 5xx said about its internals went to the log (scrubbed), not to the client.
    withheld = [json.loads(x) for x in env.capture.lines if "withheld" in x]
    assert any("handlers.py" in w.get("upstream_message", "") and "[redacted]" in w["upstream_message"]
               for w in withheld)


async def test_no_canary_in_any_usage_row(env: Env) -> None:
    repo = UsageRepo(create_engine(env.db))
    try:
        ids = [rid for rid, *_ in env.seen]
        assert len(ids) >= len(cases())

        async def all_written() -> bool:
            return set(ids) <= set(await repo.event_ids())

        await eventually(all_written, 30)
        for rid, status, _headers, body in env.seen:
            row = await repo.get_event(rid)
            assert row is not None
            dumped = orjson.dumps({str(k): v for k, v in row.items()}, default=str).decode()
            assert not leaks(dumped), dumped
            events = _events(body) if status == 200 else []
            if events and "error" in events[-1]:  # a stream that ended in an error event is recorded as failed
                assert row["status"] >= 400 and row["error_type"] in ERROR_TYPES, row
            elif row["status"] == 200:  # a stream whose unreadable error event was dropped
                assert status == 200 and row["error_type"] is None
            else:
                assert row["error_type"] in ERROR_TYPES, row
                assert row["status"] == status or status == 200
            extra = row["extra"] if isinstance(row["extra"], dict) else orjson.loads(row["extra"] or "{}")
            for attempt in extra.get("attempts") or []:
                assert attempt["error"] is None or attempt["error"] in ERROR_CODES | ERROR_TYPES, attempt
    finally:
        await repo.close()
    journal = b"".join(p.read_bytes() for p in env.spool.rglob("*") if p.is_file())
    assert not leaks(journal.decode("utf-8", "replace"))

