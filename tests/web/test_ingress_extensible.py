"""A new client API is an ingress module and nothing else: this test's made-up "echo chat" API, handed to
create_app, is served by the exchange over the emulator (streamed and not), with its own error envelope, its
own stream framing and terminator, and its own credentials header, while the OpenAI routes keep working."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from llm_proxy.errors import BadRequest, ProxyError, Unauthorized
from llm_proxy.ingress.base import Call
from llm_proxy.types import Principal, UsageEvent

from ..conftest import Emulator, basic_config
from ..core.test_resilience_e2e import RecordingSink
from ..helpers import ProxyServer, native_config
from .test_protocol import RecordingAuth

ECHO_KEY = "echo-secret-key"


class EchoFramer:
    """Neutral chunks -> `event: delta` / `event: tokens`; `event: end` ends it; `event: failure` in-band."""

    identity = False

    def __init__(self) -> None:
        self.frames = 0

    def feed(self, blob: bytes) -> bytes:
        out = []
        for event in blob.split(b"\n\n"):
            if not event.startswith(b"data: "):
                continue
            self.frames += 1
            chunk = orjson.loads(event[6:])
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    out.append(b"event: delta\ndata: " + orjson.dumps({"text": text}) + b"\n\n")
            usage = chunk.get("usage")
            if usage:
                out.append(b"event: tokens\ndata: " + orjson.dumps({"total": usage["total_tokens"]}) + b"\n\n")
        return b"".join(out)

    def end(self) -> bytes:
        return b"event: end\ndata: {}\n\n"

    def error(self, exc: ProxyError) -> bytes:
        return b"event: failure\ndata: " + _failure(exc) + b"\n\n"


def _failure(exc: ProxyError) -> bytes:
    return orjson.dumps({"failure": {"reason": exc.message, "kind": exc.code or exc.type}})


class EchoIngress:
    """POST /v1/echo-chat {"model": ..., "prompt": "...", "stream": bool} -> {"text": ..., "tokens": n}."""

    name = "test.echo"
    endpoint = "chat.completions"
    paths = ("/v1/echo-chat",)

    def credentials(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        key = headers.get("x-echo-key")
        return {"Authorization": f"Bearer {key}"} if key else {}

    def parse(self, body: dict[str, Any]) -> Call:
        prompt, model = body.get("prompt"), body.get("model")
        if not isinstance(prompt, str) or not isinstance(model, str):
            raise BadRequest("'model' and 'prompt' must be strings", code="bad_echo")
        stream = body.get("stream") is True
        neutral: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}]}
        if stream:
            neutral.update(stream=True, stream_options={"include_usage": True})
        return Call(model, "chat.completions", neutral, stream, stream, state=prompt)

    def render(self, call: Call, raw: bytes) -> bytes:
        data = orjson.loads(raw)
        return orjson.dumps({"text": data["choices"][0]["message"]["content"],
                             "tokens": data["usage"]["total_tokens"], "prompt": call.state})

    def framer(self, call: Call) -> EchoFramer:
        return EchoFramer()

    def error_body(self, exc: ProxyError) -> bytes:
        return _failure(exc)

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        return None


class KeyAuth(RecordingAuth):
    """Takes one bearer token: what the echo ingress makes of its x-echo-key header."""

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        await super().authenticate(headers, peer)
        if headers.get("Authorization") != f"Bearer {ECHO_KEY}":
            raise Unauthorized("Unknown key")
        return self.principal


@pytest.fixture()
def echo(emulator: Emulator) -> Iterator[tuple[ProxyServer, RecordingSink]]:
    sink = RecordingSink()
    auth = KeyAuth(Principal(subject="echo-user", auth_method="test"))
    with ProxyServer(native_config(basic_config(emulator.base_url)), usage=sink, authenticator=auth,
                     ingresses=(EchoIngress(),)) as px:
        yield px, sink


def _row(sink: RecordingSink, rid: str) -> UsageEvent:
    """The request's usage row (a stream's may come just after its last byte reached the client)."""
    return sink.wait(lambda e: e.request_id == rid)


async def _post(px: ProxyServer, body: Any, key: str | None = ECHO_KEY) -> tuple[int, str, bytes, str]:
    headers = {"x-echo-key": key} if key else {}
    async with aiohttp.ClientSession() as s, s.post(px.url + "/v1/echo-chat", json=body, headers=headers) as r:
        return r.status, r.headers.get("content-type", ""), await r.read(), r.headers["x-request-id"]


def _events(raw: bytes) -> list[tuple[str, Any]]:
    out = []
    for block in raw.split(b"\n\n"):
        if block:
            name, data = block.split(b"\n")
            out.append((name.removeprefix(b"event: ").decode(), orjson.loads(data.removeprefix(b"data: "))))
    return out


async def test_a_made_up_api_answers_in_its_own_shape(echo: tuple[ProxyServer, RecordingSink],
                                                      emulator: Emulator) -> None:
    px, sink = echo
    emulator.script({"responses": [{"content": "one two three", "usage": {"prompt_tokens": 4,
                                                                          "completion_tokens": 3}}]})
    status, ctype, raw, rid = await _post(px, {"model": "openai/gpt-4o", "prompt": "count"})
    assert status == 200 and ctype.startswith("application/json")
    assert orjson.loads(raw) == {"text": "one two three", "tokens": 7, "prompt": "count"}
    # The upstream got the neutral (OpenAI chat) body the ingress built.
    assert emulator.requests()[-1]["json"]["messages"] == [{"role": "user", "content": "count"}]
    row = _row(sink, rid)
    assert (row.status, row.endpoint, row.model, row.subject, row.total_tokens) == \
        (200, "chat.completions", "openai/gpt-4o", "echo-user", 7)
    assert row.client_api == EchoIngress.name == "test.echo"  # the row names the client API


async def test_a_made_up_api_streams_in_its_own_framing(echo: tuple[ProxyServer, RecordingSink],
                                                        emulator: Emulator) -> None:
    px, sink = echo
    emulator.script({"responses": [{"content": "alpha beta gamma delta", "chunks": 4,
                                    "usage": {"prompt_tokens": 5, "completion_tokens": 4}}]})
    status, ctype, raw, rid = await _post(px, {"model": "openai/gpt-4o", "prompt": "go", "stream": True})
    assert status == 200 and ctype.startswith("text/event-stream")
    events = _events(raw)
    assert b"[DONE]" not in raw and b"chat.completion.chunk" not in raw  # nothing of OpenAI's framing
    assert events[-1] == ("end", {})
    assert events[-2] == ("tokens", {"total": 9})
    deltas = [d["text"] for name, d in events if name == "delta"]
    assert len(deltas) > 1 and "".join(deltas) == "alpha beta gamma delta"
    row = _row(sink, rid)
    assert (row.status, row.streamed, row.total_tokens, row.error_type) == (200, True, 9, None)


async def test_errors_come_in_the_apis_envelope(echo: tuple[ProxyServer, RecordingSink],
                                               emulator: Emulator) -> None:
    px, sink = echo
    # Refused by the ingress's own validation.
    status, _, raw, rid = await _post(px, {"model": "openai/gpt-4o"})
    assert status == 400 and orjson.loads(raw) == {"failure": {"reason": "'model' and 'prompt' must be strings",
                                                               "kind": "bad_echo"}}
    row = _row(sink, rid)
    assert (row.status, row.error_type, row.model) == (400, "invalid_request_error", "openai/gpt-4o")
    # Refused by the core (no such model) and by the exchange (not JSON): same envelope, same statuses.
    status, _, raw, rid = await _post(px, {"model": "nope", "prompt": "x"})
    assert status == 404 and orjson.loads(raw)["failure"]["kind"] == "model_not_found"
    async with aiohttp.ClientSession() as s, s.post(px.url + "/v1/echo-chat", data=b"{nope",
                                                    headers={"x-echo-key": ECHO_KEY,
                                                             "content-type": "application/json"}) as r:
        assert r.status == 400 and orjson.loads(await r.read())["failure"]["kind"] == "invalid_json"
    # An upstream error, before anything was sent.
    emulator.script({"responses": [{"error": {"status": 429, "message": "slow down"}}]})
    status, _, raw, rid = await _post(px, {"model": "openai/gpt-4o", "prompt": "x"})
    assert status == 429 and "failure" in orjson.loads(raw) and b'"error"' not in raw
    # Its credentials header is what reaches the authenticator; without it, a 401 in its envelope.
    status, _, raw, rid = await _post(px, {"model": "openai/gpt-4o", "prompt": "x"}, key=None)
    assert status == 401 and orjson.loads(raw)["failure"]["kind"] == "invalid_token"
    row = _row(sink, rid)
    assert (row.status, row.endpoint) == (401, "chat.completions")


async def test_a_stream_cut_by_the_upstream_ends_with_the_apis_failure_event(
        echo: tuple[ProxyServer, RecordingSink], emulator: Emulator) -> None:
    px, sink = echo
    emulator.script({"responses": [{"content": "a b c d e f", "chunks": 6, "disconnect_after_chunks": 3}]})
    status, _, raw, rid = await _post(px, {"model": "openai/gpt-4o", "prompt": "go", "stream": True})
    assert status == 200
    events = _events(raw)
    assert events[0][0] == "delta" and events[-1][0] == "failure"
    assert events[-1][1]["failure"]["kind"] == "upstream_unreachable"  # (the core's error, in this API's shape)
    assert all(name != "end" for name, _ in events)
    row = _row(sink, rid)
    assert (row.status, row.error_type) == (502, "api_error")


def test_the_openai_apis_are_served_beside_it(echo: tuple[ProxyServer, RecordingSink]) -> None:
    px, sink = echo
    sdk = openai.OpenAI(base_url=px.base_url, api_key=ECHO_KEY, max_retries=0)
    reply = sdk.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert [c for c in sdk.chat.completions.create(model="openai/gpt-4o", stream=True,
                                                   messages=[{"role": "user", "content": "hi"}])]
    sink.wait(lambda e: e.streamed and e.status == 200)
    assert [(e.status, e.client_api) for e in sink.events] == [(200, "openai.chat"), (200, "openai.chat")]
    sdk.embeddings.create(model="openai/text-embedding-3-small", input="hi")
    sdk.completions.create(model="openai/gpt-4o", prompt="hi")
    sink.wait(lambda e: e.endpoint == "completions")
    assert [(e.endpoint, e.client_api) for e in list(sink.events)[2:]] == [
        ("embeddings", "openai.embeddings"), ("completions", "openai.completions")]
    with pytest.raises(openai.AuthenticationError) as info:  # OpenAI's envelope there, as always
        openai.OpenAI(base_url=px.base_url, api_key="wrong", max_retries=0).models.list()
    assert info.value.body is not None and "message" in info.value.body  # type: ignore[operator]
