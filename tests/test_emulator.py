"""Tests of the scriptable OpenAI-compatible emulator, driven through the official openai SDK."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from openai import AsyncOpenAI, OpenAI

from llm_proxy.emulator import EmulatorServer, EmulatorState, embedding_vector, start_emulator


@pytest_asyncio.fixture(scope="module")
async def server() -> AsyncIterator[EmulatorServer]:
    srv = await start_emulator()
    try:
        yield srv
    finally:
        await srv.close()


@pytest.fixture(autouse=True)
def _fresh_state(server: EmulatorServer) -> None:
    server.state.reset()


@pytest_asyncio.fixture
async def client(server: EmulatorServer) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
        yield c


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Http:
    """Raw HTTP to the emulator root (aiohttp client), for what the SDK does not expose."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def request(self, method: str, path: str, **kw: Any) -> Reply:
        async with self.session.request(method, path, **kw) as r:
            return Reply(r.status, r.headers, await r.read())

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> Reply:
        return await self.request("POST", path, **kw)


@pytest_asyncio.fixture
async def http(server: EmulatorServer) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(base_url=server.url, timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield Http(session)


def chat_messages(text: str = "hello there") -> list[Any]:
    return [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]


async def test_seed_script_order_like_llemulator(server: EmulatorServer, client: AsyncOpenAI, http: Http) -> None:
    r = await http.post(
        "/_emulator/script",
        json={
            "reset": True,
            "models": ["gpt-4o", "gpt-4", "gpt-3.5-turbo"],
            "responses": ["first reply", "second reply", "third reply"],
        },
    )
    assert r.status == 200
    assert r.json()["queued"] == 3
    models = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-4o", "gpt-4", "gpt-3.5-turbo"]
    got = []
    for model in ("gpt-4", "gpt-4o", "gpt-3.5-turbo"):
        resp = await client.chat.completions.create(model=model, messages=chat_messages())
        assert resp.model == model
        assert resp.id.startswith("chatcmpl-")
        assert resp.object == "chat.completion"
        assert resp.choices[0].finish_reason == "stop"
        assert resp.choices[0].message.role == "assistant"
        got.append(resp.choices[0].message.content)
    assert got == ["first reply", "second reply", "third reply"]
    # the queue is drained: back to the default echo reply
    resp = await client.chat.completions.create(model="gpt-4", messages=chat_messages("again"))
    assert resp.choices[0].message.content == "Echo: again"
    # gpt-4o-mini is no longer a scripted model
    with pytest.raises(openai.NotFoundError) as exc_info:
        await client.chat.completions.create(model="gpt-4o-mini", messages=chat_messages())
    assert exc_info.value.code == "model_not_found"


async def test_default_echo_with_sync_client(server: EmulatorServer) -> None:
    def call() -> Any:
        with OpenAI(base_url=server.base_url, api_key="sk-test", max_retries=0, timeout=10) as c:
            return c.chat.completions.create(
                model="gpt-4o",
                messages=[
                    {"role": "user", "content": "first question"},
                    {"role": "assistant", "content": "an answer"},
                    {"role": "user", "content": [{"type": "text", "text": "what is   up"}]},
                ],
            )

    resp = await asyncio.to_thread(call)
    assert resp.choices[0].message.content == "Echo: what is   up"
    assert resp.choices[0].message.tool_calls is None
    # prompt: 2 + 2 + 3 words; completion: "Echo: what is up" = 4 words
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (7, 4, 11)


async def test_stream_with_include_usage(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script({"responses": ["The quick  brown fox"]})
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=chat_messages("one two three"),
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    first, *middle, final, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in middle] == ["The", " quick", "  brown", " fox"]
    assert final.choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks[:-1])
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (5, 4)


async def test_stream_raw_sse_and_chunks(server: EmulatorServer, http: Http) -> None:
    server.state.script({"responses": [{"content": "abcdefghij", "chunks": 3}]})
    body = {"model": "gpt-4o", "messages": chat_messages(), "stream": True}
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    lines = [line for line in r.body.decode().split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    events = [orjson.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("usage" not in e for e in events)  # no include_usage: no usage key at all
    assert [e["choices"][0]["delta"].get("content") for e in events[1:4]] == ["abc", "def", "ghij"]
    assert events[-1]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


async def test_stream_events_are_flushed_and_disconnect_is_counted(server: EmulatorServer, http: Http) -> None:
    state = server.state
    state.script({"responses": [{"content": "never finished", "chunk_delay_ms": 60_000}]})
    body = {"model": "gpt-4o", "messages": chat_messages(), "stream": True}
    async with http.session.post("/v1/chat/completions", json=body) as r:
        first = (await r.content.readline()).decode()
        assert orjson.loads(first.removeprefix("data: "))["choices"][0]["delta"]["role"] == "assistant"
        assert state.in_flight == 1
    # leaving the block closes the connection mid-stream
    await state.wait_until(lambda: state.cancelled == 1 and state.in_flight == 0)


async def test_hang_until_client_gives_up(server: EmulatorServer, client: AsyncOpenAI) -> None:
    state = server.state
    state.script({"responses": [{"hang": True}]})
    task = asyncio.create_task(client.chat.completions.create(model="gpt-4o", messages=chat_messages()))
    await state.wait_until(lambda: state.in_flight == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await state.wait_until(lambda: state.cancelled == 1 and state.in_flight == 0)
    assert (await client.chat.completions.create(model="gpt-4o", messages=chat_messages("x"))).choices[
        0
    ].message.content == "Echo: x"


async def test_streamed_parallel_tool_calls(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script(
        {
            "responses": [
                {
                    "tool_calls": [
                        {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}, "id": "call_a"},
                        {"name": "get_time", "arguments": '{"timezone": "Europe/Paris"}'},
                    ]
                }
            ]
        }
    )
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=chat_messages("weather and time?"), stream=True
    )
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    heads = 0
    async for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                heads += 1
                assert delta.type == "function"
                assert delta.function is not None and delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            elif delta.function is not None and delta.function.arguments:
                calls[delta.index]["arguments"] += delta.function.arguments
    assert heads == 2
    assert finish == "tool_calls"
    assert calls[0] == {
        "id": "call_a",
        "name": "get_weather",
        "arguments": '{"city":"Paris","unit":"celsius"}',
    }
    assert calls[1]["name"] == "get_time"
    assert calls[1]["id"].startswith("call_")
    assert orjson.loads(calls[1]["arguments"]) == {"timezone": "Europe/Paris"}

    # the same script without streaming
    server.state.script({"responses": [{"tool_calls": [{"name": "f", "arguments": "{}"}], "content": None}]})
    resp = await client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    msg = resp.choices[0].message
    assert resp.choices[0].finish_reason == "tool_calls"
    assert msg.content is None
    assert msg.tool_calls is not None and msg.tool_calls[0].function.name == "f"  # type: ignore[union-attr]


async def test_error_item_429(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script(
        {
            "responses": [
                {
                    "error": {
                        "status": 429,
                        "message": "Slow down",
                        "type": "requests",
                        "code": "rate_limit_exceeded",
                        "headers": {"retry-after": "1"},
                    }
                },
                "after the error",
            ]
        }
    )
    with pytest.raises(openai.RateLimitError) as exc_info:
        await client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    err = exc_info.value
    assert err.status_code == 429
    assert err.response.headers["retry-after"] == "1"
    assert err.code == "rate_limit_exceeded"
    assert err.body == {"message": "Slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    resp = await client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    assert resp.choices[0].message.content == "after the error"


async def test_api_key_enforced() -> None:
    srv = await start_emulator(api_key="sk-emu")
    try:
        async with aiohttp.ClientSession(base_url=srv.url) as session:
            http = Http(session)
            for method, path in [("GET", "/health"), ("POST", "/_emulator/script"), ("GET", "/nope")]:
                r = await http.request(method, path, json={})
                assert r.status == 401
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            r = await http.post(
                "/_emulator/script",
                json={"responses": ["authorized"]},
                headers={"Authorization": "Bearer sk-emu"},
            )
            assert r.status == 200
        async with AsyncOpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model="gpt-4o", messages=chat_messages())
        async with AsyncOpenAI(base_url=srv.base_url, api_key="sk-emu", max_retries=0) as good:
            resp = await good.chat.completions.create(model="gpt-4o", messages=chat_messages())
            assert resp.choices[0].message.content == "authorized"
    finally:
        await srv.close()


async def test_embeddings(server: EmulatorServer, client: AsyncOpenAI) -> None:
    resp = await client.embeddings.create(model="text-embedding-3-small", input="hello world", encoding_format="float")
    assert resp.object == "list"
    assert resp.model == "text-embedding-3-small"
    vec = resp.data[0].embedding
    assert len(vec) == 8
    assert abs(sum(v * v for v in vec) - 1.0) < 1e-9
    assert resp.usage.prompt_tokens == 2
    again = await client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "other text here"], dimensions=16, encoding_format="float"
    )
    assert [d.index for d in again.data] == [0, 1]
    assert all(len(d.embedding) == 16 for d in again.data)
    assert again.data[0].embedding == embedding_vector("hello world", 16)
    assert again.data[0].embedding != again.data[1].embedding
    assert again.usage.prompt_tokens == 5
    # base64 is little-endian float32, as OpenAI's
    b64 = await client.embeddings.create(model="text-embedding-3-small", input="hello world", encoding_format="base64")
    raw = b64.data[0].embedding
    decoded = struct.unpack("<8f", base64.b64decode(raw)) if isinstance(raw, str) else raw
    assert [round(v, 5) for v in decoded] == [round(v, 5) for v in vec]


async def test_embeddings_only_consume_fault_items(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script({"responses": [{"error": {"status": 503, "message": "overloaded"}}, "chat reply"]})
    with pytest.raises(openai.InternalServerError) as exc_info:
        await client.embeddings.create(model="text-embedding-3-small", input="x")
    assert exc_info.value.status_code == 503
    # a reply item is left for the chat request it was meant for
    await client.embeddings.create(model="text-embedding-3-small", input="x")
    resp = await client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    assert resp.choices[0].message.content == "chat reply"


async def test_legacy_completions(server: EmulatorServer, client: AsyncOpenAI) -> None:
    resp = await client.completions.create(model="gpt-4o-mini", prompt="say this")
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text == "Echo: say this"
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None and resp.usage.prompt_tokens == 2 and resp.usage.completion_tokens == 3

    server.state.script({"responses": [{"content": "one two three", "finish_reason": "length"}]})
    stream = await client.completions.create(
        model="gpt-4o-mini", prompt=["a b", "c"], stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "one two three"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3


async def test_requests_recorded(server: EmulatorServer, client: AsyncOpenAI, http: Http) -> None:
    await client.chat.completions.create(model="gpt-4o", messages=chat_messages("recorded?"), temperature=0.5)
    r = await http.post("/v1/chat/completions", data=b"{not json", headers={"content-type": "application/json"})
    assert r.status == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    recorded = server.state.requests
    assert len(recorded) == 2
    first = recorded[0]
    assert first["method"] == "POST"
    assert first["path"] == "/v1/chat/completions"
    assert first["headers"]["authorization"] == "Bearer sk-test"
    assert first["json"]["temperature"] == 0.5
    assert first["json"]["messages"][-1]["content"] == "recorded?"
    assert recorded[1]["json"] is None
    listed = (await http.get("/_emulator/requests")).json()
    assert listed == orjson.loads(orjson.dumps(recorded))
    stats = (await http.get("/_emulator/stats")).json()
    assert stats["requests"] == 2 and stats["in_flight"] == 0 and stats["cancelled"] == 0
    # "reset": true forgets them, /_emulator/reset restores everything
    server.state.script({"reset": True, "models": ["m1"]})
    assert server.state.requests == []
    assert (await http.post("/_emulator/reset")).json() == {"status": "ok"}
    assert server.state.models == ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]


async def test_per_model_queues(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script(
        {
            "responses": [
                "global 1",
                {"model": "gpt-4o-mini", "content": "mini 1"},
                {"model": "gpt-4o-mini", "content": "mini 2"},
                "global 2",
            ]
        }
    )

    async def ask(model: str) -> str | None:
        resp = await client.chat.completions.create(model=model, messages=chat_messages())
        return resp.choices[0].message.content

    assert await ask("gpt-4o-mini") == "mini 1"
    assert await ask("gpt-4o") == "global 1"
    assert await ask("gpt-4o-mini") == "mini 2"
    assert await ask("gpt-4o-mini") == "global 2"
    assert await ask("gpt-4o") == "Echo: hello there"


async def test_disconnect_after_chunks(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script({"responses": [{"content": "one two three four five", "disconnect_after_chunks": 3}]})
    stream = await client.chat.completions.create(model="gpt-4o", messages=chat_messages(), stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "one two"
    assert server.state.cancelled == 0  # the emulator cut it, not the client


async def test_truncate_body(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script({"responses": [{"content": "cut short", "truncate_body": True}]})
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="gpt-4o", messages=chat_messages())


async def test_usage_override_delay_and_finish_reason(server: EmulatorServer, client: AsyncOpenAI) -> None:
    server.state.script(
        {
            "responses": [
                {"content": "partial", "finish_reason": "length", "usage": {"prompt_tokens": 100}, "delay_ms": 5}
            ]
        }
    )
    resp = await client.chat.completions.create(model="gpt-4o", messages=chat_messages())
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (100, 1, 101)


async def test_models_health_and_errors(server: EmulatorServer, client: AsyncOpenAI, http: Http) -> None:
    model = await client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "emulator")
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("nope")
    assert (await http.get("/health")).json() == {"status": "ok"}
    r = await http.get("/v1/unknown")
    assert r.status == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = await http.post("/v1/chat/completions", json={"messages": []})
    assert r.status == 400 and r.json()["error"]["param"] == "model"
    # invalid scripts are rejected as a whole and change nothing
    r = await http.post("/_emulator/script", json={"reset": True, "responses": ["ok", {"contnet": "typo"}]})
    assert r.status == 400
    assert "contnet" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="status"):
        EmulatorState().script({"responses": [{"error": {"status": 200}}]})
