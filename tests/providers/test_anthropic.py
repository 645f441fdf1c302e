"""Anthropic Messages translator against a loopback fake of the Messages API (JSON and SSE)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from aiohttp import web

from llm_proxy.config import ProviderSettings
from llm_proxy.errors import BadRequest, RateLimited, UpstreamError
from llm_proxy.providers import anthropic as anth
from llm_proxy.providers.base import Target
from llm_proxy.providers.registry import build_provider
from llm_proxy.providers.sse import SSESplitter

from .schemas import (
    validate_anthropic_error,
    validate_anthropic_event,
    validate_anthropic_request,
    validate_anthropic_response,
)
from .support import (
    FakeUpstream,
    Received,
    accumulate,
    call,
    fake_upstream_fixture,
    fixture_bytes,
    fixture_json,
    json_response,
    parse_frames,
    split_every,
    stream_response,
    strip_volatile,
)

KEY = "sk-ant-api03-test-key-0123456789"
P = "anthropic"

_BY_MODEL = {
    "claude-text": ("response_text.json", "stream_text.sse"),
    "claude-tools": ("response_tools.json", "stream_tools.sse"),
    "claude-stream-error": (None, "stream_error.sse"),
}


async def _handler(request: web.Request, rec: Received) -> web.StreamResponse:
    if rec.path != "/v1/messages" or rec.method != "POST":
        return json_response({"type": "error", "error": {"type": "not_found_error", "message": "no route"}}, 404)
    if rec.headers.get("x-api-key") != KEY or rec.headers.get("anthropic-version") != "2023-06-01":
        return json_response({"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid x-api-key"}}, 401)
    body = rec.json()
    try:
        validate_anthropic_request(body)
    except Exception as exc:  # the fake rejects what the real API would reject
        return json_response({"type": "error", "error": {"type": "invalid_request_error", "message": str(exc)}}, 400)
    model = body["model"]
    if model == "claude-429":
        return json_response(fixture_json(P, "error_429.json"), 429, {"retry-after": "17"})
    if model == "claude-500":
        return json_response(fixture_json(P, "error_500.json"), 500)
    if model == "claude-529":
        return json_response(fixture_json(P, "error_529.json"), 529, {"retry-after": "3"})
    if model == "claude-echo-key":
        return json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                         "message": f"bad key {KEY} given"}}, 400)
    resp_file, stream_file = _BY_MODEL[model]
    if body.get("stream"):
        return await stream_response(request, fixture_bytes(P, stream_file), "text/event-stream")
    return json_response(fixture_bytes(P, resp_file))


fake = fake_upstream_fixture(_handler)


def _provider(fake: FakeUpstream, **kw: Any) -> Any:
    return build_provider(ProviderSettings(id="claude", type="anthropic", base_url=fake.url, api_key=KEY, **kw))


def _target(model: str) -> Target:
    return Target("claude", model, "claude/" + model)


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": "Hi"}], **kw}


# -------------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize("name", ["chat_request.json", "tools_request.json"])
def test_request_golden_and_schema(name: str) -> None:
    fx = fixture_json(P, name)
    out = anth.translate_request(fx["openai"], "claude-sonnet-4-5", 4096)
    assert out == fx["upstream"]
    validate_anthropic_request(out)
    validate_anthropic_request({**out, "stream": True})


def test_fixtures_match_published_types() -> None:
    validate_anthropic_response(fixture_json(P, "response_text.json"))
    validate_anthropic_response(fixture_json(P, "response_tools.json"))
    for name in ("error_400.json", "error_429.json", "error_500.json", "error_529.json"):
        validate_anthropic_error(fixture_json(P, name))
    for name in ("stream_text.sse", "stream_tools.sse", "stream_error.sse"):
        for _ev, payload in SSESplitter().feed(fixture_bytes(P, name)):
            validate_anthropic_event(orjson.loads(payload))


def test_sampling_params_are_opt_in() -> None:
    body = _chat(temperature=1.7, top_p=0.5)
    assert "temperature" not in anth.translate_request(body, "m", 10)
    out = anth.translate_request(body, "m", 10, sampling=True)
    assert out["temperature"] == 1.0 and out["top_p"] == 0.5


def test_tool_choice_mapping() -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    cases = {"auto": {"type": "auto"}, "none": {"type": "none"}, "required": {"type": "any"}}
    for choice, expected in cases.items():
        assert anth.translate_request(_chat(tools=tools, tool_choice=choice), "m", 10)["tool_choice"] == expected
    specific = {"type": "function", "function": {"name": "f"}}
    assert anth.translate_request(_chat(tools=tools, tool_choice=specific), "m", 10)["tool_choice"] == {
        "type": "tool", "name": "f"}
    assert "tool_choice" not in anth.translate_request(_chat(tools=tools), "m", 10)


def test_bad_input_is_a_bad_request() -> None:
    with pytest.raises(BadRequest):
        anth.translate_request(_chat(n=2), "m", 10)
    bad_args = {"role": "assistant", "tool_calls": [{"id": "t", "type": "function",
                                                     "function": {"name": "f", "arguments": "{nope"}}]}
    with pytest.raises(BadRequest) as ei:
        anth.translate_request({"messages": [{"role": "user", "content": "a"}, bad_args]}, "m", 10)
    assert ei.value.param == "messages[1].tool_calls[0].function.arguments"
    bmp = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA=="}}]}
    with pytest.raises(BadRequest):
        anth.translate_request({"messages": [bmp]}, "m", 10)


def test_usage_counts_cache_tokens() -> None:
    u = anth.usage_from({"input_tokens": 12, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 2048,
                         "output_tokens": 6})
    assert u is not None
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens) == (2160, 6, 2166, 2048)


def test_missing_credentials() -> None:
    p = build_provider(ProviderSettings(id="c", type="anthropic"))
    assert p.missing_credentials() == ["ANTHROPIC_API_KEY"]


# -------------------------------------------------------------------------------------------------- over the wire


async def test_plain_chat(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "chat_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target("claude-text"))
    assert fake.received[-1].json()["model"] == "claude-text"
    assert res.body is not None
    assert res.body["id"] == "chatcmpl-msg_01XFDUDYJgAACzvnptvVoYEL"
    assert strip_volatile(res.body) == {
        "object": "chat.completion",
        "model": "claude/claude-text",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2160, "completion_tokens": 6, "total_tokens": 2166,
                  "prompt_tokens_details": {"cached_tokens": 2048}},
    }
    assert res.usage is not None and res.usage.total_tokens == 2166


async def test_streamed_answer(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(stream=True), _target("claude-text"), stream=True)
    assert fake.received[-1].json()["stream"] is True
    assert fake.received[-1].headers["accept"] == "text/event-stream"
    acc = accumulate(res.chunks)
    assert acc["choices"][0] == {"role": "assistant", "content": "Hello, wörld!", "tool_calls": [],
                                 "finish_reason": "stop"}
    assert res.chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert res.chunks[-1]["choices"] == []
    assert acc["usage"] == {"prompt_tokens": 35, "completion_tokens": 15, "total_tokens": 50,
                            "prompt_tokens_details": {"cached_tokens": 10}}
    assert all(c["id"] == "chatcmpl-msg_01StreamText" and c["model"] == "claude/claude-text" for c in res.chunks)


async def test_streamed_answer_without_usage_chunk(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(stream=True), _target("claude-text"), stream=True,
                     want_usage=False)
    assert all(c["choices"] for c in res.chunks)
    assert accumulate(res.chunks)["usage"] is None
    assert res.usage is not None and res.usage.completion_tokens == 15  # still recorded


async def test_tool_call(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "tools_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target("claude-tools"))
    assert res.body is not None
    choice = res.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "I'll check both cities."
    assert choice["message"]["tool_calls"] == [
        {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "toolu_01T1x1fJ34qAmk2tNTrN7Up7", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Tokyo"}'}},
    ]
    assert res.body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_streamed_parallel_tool_calls(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "tools_request.json")
    res = await call(_provider(fake), "chat.completions", {**fx["openai"], "stream": True},
                     _target("claude-tools"), stream=True)
    acc = accumulate(res.chunks)
    assert acc["choices"][0]["content"] == "Checking both."
    assert acc["choices"][0]["finish_reason"] == "tool_calls"
    calls = acc["choices"][0]["tool_calls"]
    assert [(c["id"], c["name"]) for c in calls] == [("toolu_01P", "get_weather"), ("toolu_01T", "get_weather")]
    assert [orjson.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    # The first delta of each call carries id, type and name; the later ones only argument fragments.
    starts = [tc for ch in res.chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls", []) if "id" in tc]
    assert starts == [
        {"index": 0, "id": "toolu_01P", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 1, "id": "toolu_01T", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    ]
    assert acc["usage"]["completion_tokens"] == 89


async def test_429_keeps_retry_after(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("claude-429"))
    assert isinstance(res.error, RateLimited)
    assert res.error.status == 429 and res.error.headers["retry-after"] == "17"
    assert res.error.type == "rate_limit_error"
    assert "rate limit" in res.error.message


async def test_500_and_529(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("claude-500"))
    assert isinstance(res.error, UpstreamError)
    assert (res.error.status, res.error.type) == (500, "api_error")
    res = await call(_provider(fake), "chat.completions", _chat(), _target("claude-529"))
    assert res.error is not None
    assert (res.error.status, res.error.type, res.error.code) == (503, "api_error", "overloaded")
    assert res.error.headers == {"retry-after": "3"}


async def test_upstream_auth_failure_is_a_502_for_the_client(fake: FakeUpstream) -> None:
    p = build_provider(ProviderSettings(id="claude", type="anthropic", base_url=fake.url, api_key="wrong"))
    res = await call(p, "chat.completions", _chat(), _target("claude-text"))
    assert res.error is not None and res.error.status == 502 and res.error.code == "upstream_auth_failed"


async def test_key_never_in_error_message(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("claude-echo-key"))
    assert res.error is not None and KEY not in res.error.message and "[redacted]" in res.error.message


async def test_stream_error_event(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(stream=True), _target("claude-stream-error"),
                     stream=True)
    assert res.chunks[-1]["error"]["type"] == "api_error"
    assert res.chunks[-1]["error"]["message"] == "Overloaded"
    assert res.decoder.error is not None and res.decoder.error.status == 503


@pytest.mark.parametrize("size", [1, 3, 64, 100000])
def test_decoder_is_split_independent(size: int) -> None:
    raw = fixture_bytes(P, "stream_tools.sse").replace(b"\n", b"\r\n")
    dec = anth.AnthropicStreamDecoder("m", True)
    frames: list[bytes] = []
    for piece in split_every(raw, size):
        frames.extend(dec.feed(piece))
    frames.extend(dec.close())
    acc = accumulate(parse_frames(frames))
    assert [c["arguments"] for c in acc["choices"][0]["tool_calls"]] == ['{"city": "Paris"}', '{"city": "Tokyo"}']
    assert acc["usage"]["total_tokens"] == 472 + 89


def test_truncated_stream_reports_usage_so_far() -> None:
    raw = fixture_bytes(P, "stream_text.sse")
    cut = raw[: raw.index(b"event: message_delta")]
    dec = anth.AnthropicStreamDecoder("m", True)
    frames = dec.feed(cut) + dec.close()
    chunks = parse_frames(frames)
    assert all(c["choices"] and c["choices"][0]["finish_reason"] is None for c in chunks)
    assert dec.usage is not None and dec.usage.prompt_tokens == 35


def test_structured_output_and_effort() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"],
              "additionalProperties": False}
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    out = anth.translate_request(_chat(response_format=rf, reasoning_effort="minimal"), "m", 10)
    assert out["output_config"] == {"format": {"type": "json_schema", "schema": schema}, "effort": "low"}
    validate_anthropic_request(out)
    assert "output_config" not in anth.translate_request(_chat(response_format={"type": "json_object"}), "m", 10)


def test_documents_and_rich_tool_results_match_schema() -> None:
    body = {"messages": [
        {"role": "user", "content": [
            {"type": "file", "file": {"filename": "r.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQ="}},
            {"type": "file", "file": {"file_data": "data:text/plain;base64,aGVsbG8="}},
        ]},
        {"role": "assistant", "tool_calls": [{"id": "t1", "type": "function",
                                              "function": {"name": "shot", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "t1", "content": [
            {"type": "text", "text": "screenshot:"},
            {"type": "image_url", "image_url": {"url": "data:image/webp;base64,UklGRg=="}},
        ]},
    ]}
    out = anth.translate_request(body, "m", 10)
    validate_anthropic_request(out)
    assert out["messages"][0]["content"][1]["source"] == {"type": "text", "media_type": "text/plain", "data": "hello"}
    assert out["messages"][2]["content"][0]["content"][1]["type"] == "image"
