"""The Messages API translators: request -> neutral chat body, chat.completion -> message, chunk stream ->
Anthropic events, errors in Anthropic's envelope; validated against the anthropic SDK's own types."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from llm_proxy.errors import (
    BadRequest,
    Forbidden,
    ModelNotFound,
    PayloadTooLarge,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from llm_proxy.ingress import anthropic_messages as am
from llm_proxy.providers.chat_common import ChunkWriter, choice_json, completion_json, tool_call_json
from llm_proxy.types import Usage

from . import sdk

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
PNG = "iVBORw0KGgo="


def chat(body: dict[str, Any], sdk_params: bool = True) -> dict[str, Any]:
    """to_chat, checking that the request is one the anthropic SDK sends (unless `sdk_params` is off: its current
    types dropped temperature / top_p / top_k, which older SDKs and raw clients still send), that it is left as it
    was, and that the neutral body is a valid chat/completions body."""
    if sdk_params:
        sdk.messages_request(body)
    before = copy.deepcopy(body)
    out = am.to_chat(body)
    assert body == before
    sdk.chat_request(out)
    return out


def test_system_text_and_sampling() -> None:
    out = chat({"model": "claude", "max_tokens": 100, "system": "Be terse.", "temperature": 0.3, "top_p": 0.8,
                "top_k": 5, "stop_sequences": ["END"], "metadata": {"user_id": "u1"},
                "messages": [{"role": "user", "content": "Hi"}]}, sdk_params=False)
    assert out == {"model": "claude", "messages": [{"role": "system", "content": "Be terse."},
                                                   {"role": "user", "content": "Hi"}],
                   "max_completion_tokens": 100, "stop": ["END"], "temperature": 0.3, "top_p": 0.8, "user": "u1"}


def test_system_blocks_images_documents() -> None:
    out = chat({"model": "c", "max_tokens": 10,
                "system": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
                "messages": [{"role": "user", "content": [
                    {"type": "text", "text": "Look"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}},
                    {"type": "document", "title": "a.pdf",
                     "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="}},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
                ]}]})
    assert out["messages"] == [
        {"role": "system", "content": "One.\n\nTwo."},
        {"role": "user", "content": [
            {"type": "text", "text": "Look"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
            {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
            {"type": "text", "text": "notes"},
        ]},
    ]


def test_tool_use_and_tool_results() -> None:
    out = chat({
        "model": "c", "max_tokens": 10,
        "tools": [{"name": "weather", "description": "Weather of a city", "input_schema": WEATHER}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Weather in Oslo and Rome?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": True,
                 "content": [{"type": "text", "text": "no data"},
                             {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
                {"type": "text", "text": "And Paris?"},
            ]},
        ],
    })
    assert out["tools"] == [{"type": "function", "function": {
        "name": "weather", "parameters": WEATHER, "description": "Weather of a city"}}]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False
    assert out["messages"][1:] == [
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "toolu_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
            {"type": "text", "text": "And Paris?"},
        ]},
    ]


@pytest.mark.parametrize(("choice", "expected"), [
    ({"type": "auto"}, "auto"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "weather"}, {"type": "function", "function": {"name": "weather"}}),
])
def test_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    out = chat({"model": "c", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                "tools": [{"name": "weather", "input_schema": WEATHER}], "tool_choice": choice})
    assert out["tool_choice"] == expected and "parallel_tool_calls" not in out


def test_stream_asks_for_usage() -> None:
    out = chat({"model": "c", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "x"}]})
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "c", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "c", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ({"model": "c", "max_tokens": 5, "messages": []}, "messages"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "messages[0].content[0].type"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
      "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "temperature": 1.5},
     "temperature"),
    ({"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]}, "messages[0].content[0].tool_use_id"),
])
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        am.to_chat(body)
    assert e.value.param == param


def test_count_request_needs_no_max_tokens() -> None:
    body = {"model": "c", "system": "S", "messages": [{"role": "user", "content": "Hello"}],
            "tools": [{"name": "weather", "input_schema": WEATHER}]}
    out = am.count_request(body)
    assert out["messages"] == [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello"}]
    assert out["tools"][0]["function"]["name"] == "weather"
    from anthropic.types import MessageTokensCount

    assert sdk.strict(MessageTokensCount, orjson.loads(am.count_json(12))).input_tokens == 12


# --------------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------------


def _req() -> am.MessagesRequest:
    return am.parse({"model": "anthropic/claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]})[1]


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"),
                                              ("tool_calls", "tool_use"), ("content_filter", "refusal")])
def test_reply(finish: str, stop: str) -> None:
    req = _req()
    calls = [tool_call_json("call_1", "weather", '{"city":"Oslo"}')] if finish == "tool_calls" else []
    raw = completion_json("c", "anthropic/claude", [choice_json(0, "Hi", calls, finish)],
                          Usage(10, 4, 14, cached_tokens=6))
    msg = sdk.message(orjson.loads(am.render(req, raw)))
    assert msg.id == req.id and msg.id.startswith("msg_") and msg.model == "anthropic/claude"
    assert msg.stop_reason == stop and msg.content[0].type == "text" and msg.content[0].text == "Hi"
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens, msg.usage.output_tokens) == (4, 6, 4)
    if calls:
        assert msg.content[1].type == "tool_use" and msg.content[1].id == "call_1"
        assert msg.content[1].input == {"city": "Oslo"}


def test_reply_without_text_or_usage() -> None:
    raw = completion_json("c", "m", [choice_json(0, None, [tool_call_json("t", "f", "")], "tool_calls")], None)
    msg = sdk.message(orjson.loads(am.render(_req(), raw)))
    assert [b.type for b in msg.content] == ["tool_use"] and msg.content[0].input == {}
    assert msg.usage.input_tokens == 0 and msg.usage.output_tokens == 0


@pytest.mark.parametrize(("exc", "kind"), [
    (BadRequest("bad"), "invalid_request_error"), (Unauthorized("who"), "authentication_error"),
    (Forbidden("no"), "permission_error"), (ModelNotFound("none"), "not_found_error"),
    (RateLimited("slow"), "rate_limit_error"), (UpstreamTimeout("late"), "timeout_error"),
    (UpstreamUnreachable("down"), "api_error"), (ServiceUnavailable("busy", code="overloaded"), "overloaded_error"),
    (ProxyError("oops"), "api_error"), (PayloadTooLarge("big"), "request_too_large"),
])
def test_errors_in_anthropic_shape(exc: ProxyError, kind: str) -> None:
    data = orjson.loads(am.error_body(exc))
    assert data == {"type": "error", "error": {"type": kind, "message": exc.message}}
    if kind != "request_too_large":  # in Anthropic's documented list, not in the SDK's ErrorResponse union
        from anthropic.types import ErrorResponse

        sdk.strict(ErrorResponse, data)


# --------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------


def _stream(frames: list[bytes]) -> tuple[list[Any], bytes]:
    framer = am.MessagesFramer(_req())
    out = b"".join(framer.feed(f) for f in frames) + framer.end()
    return sdk.messages_events(out), out


def test_text_stream() -> None:
    w = ChunkWriter("m")
    events, _ = _stream([w.role(), w.text("Hel"), w.text("lo"), w.finish("stop"), w.usage(Usage(9, 2, 11))])
    assert [e.type for e in events] == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert events[0].message.id.startswith("msg_") and events[0].message.content == []
    assert [e.delta.text for e in events if e.type == "content_block_delta"] == ["Hel", "lo"]
    assert events[5].delta.stop_reason == "end_turn"
    assert events[5].usage.output_tokens == 2 and events[5].usage.input_tokens == 9


def test_tool_use_stream_and_the_sdk_accumulator() -> None:
    """anthropic's own accumulator (what messages.stream runs) builds the final message from the events."""
    from anthropic.lib.streaming._messages import accumulate_event
    from anthropic.types import RawMessageStreamEvent
    from pydantic import TypeAdapter

    w = ChunkWriter("m")
    events, blob = _stream([w.text("Let me look."), w.tool_start(0, "call_a", "weather"), w.tool_args(0, '{"ci'),
                            w.tool_args(0, 'ty":"Oslo"}'), w.tool_start(1, "call_b", "weather", "{}"),
                            w.finish("tool_calls"), w.usage(Usage(20, 10, 30))])
    assert [(e.type, getattr(e, "index", None)) for e in events] == [
        ("message_start", None), ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("content_block_start", 2), ("content_block_delta", 2),
        ("content_block_stop", 2), ("message_delta", None), ("message_stop", None)]
    assert events[4].content_block.id == "call_a" and events[4].content_block.name == "weather"
    assert events[5].delta.type == "input_json_delta"
    adapter: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)
    snapshot = None
    bufs: dict[int, bytes] = {}
    for _, data in sdk.sse(blob):
        snapshot = accumulate_event(event=adapter.validate_python(data), current_snapshot=snapshot, json_bufs=bufs)
    assert snapshot is not None and snapshot.stop_reason == "tool_use"
    assert [b.type for b in snapshot.content] == ["text", "tool_use", "tool_use"]
    assert snapshot.content[1].input == {"city": "Oslo"} and snapshot.content[2].input == {}
    assert snapshot.usage.output_tokens == 10 and snapshot.usage.input_tokens == 20


def test_stream_error_is_anthropic_error_event() -> None:
    w = ChunkWriter("m")
    framer = am.MessagesFramer(_req())
    out = framer.feed(w.text("Hi")) + framer.error(ServiceUnavailable("busy", code="overloaded"))
    assert framer.end() == b""
    events = sdk.messages_events(out)
    assert events[-1].type == "error" and events[-1].error.type == "overloaded_error"
    assert events[-1].error.message == "busy"


def test_a_lone_text_after_tool_results_is_plain_content() -> None:
    out = chat({"model": "c", "max_tokens": 5, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}, {"type": "text", "text": "Go"}]},
    ]})
    assert out["messages"][1:] == [{"role": "tool", "tool_call_id": "t1", "content": ""},
                                   {"role": "user", "content": "Go"}]


def test_x_api_key_is_offered_as_a_bearer_token() -> None:
    seen = am.credentials({"x-api-key": " llmp_abc ", "anthropic-version": "2023-06-01"})
    assert seen["Authorization"] == "Bearer llmp_abc" and seen["authorization"] == "Bearer llmp_abc"
    assert seen["anthropic-version"] == "2023-06-01" and set(seen) == {"Authorization", "x-api-key",
                                                                         "anthropic-version"}
    both = {"Authorization": "Bearer tok", "x-api-key": "other"}
    assert am.credentials(both)["Authorization"] == "Bearer tok"
    assert "Authorization" not in am.credentials({"x-api-key": "  "})


# --------------------------------------------------------------------------------------------------
# stop_sequence: an Anthropic upstream says which sequence ended the answer; it comes back through the neutral form
# --------------------------------------------------------------------------------------------------

STOP_BODY = {"model": "anthropic/claude", "max_tokens": 10, "stop_sequences": ["END", "###"],
             "messages": [{"role": "user", "content": "x"}]}
UPSTREAM_MESSAGE = {"id": "msg_up", "type": "message", "role": "assistant", "model": "claude",
                    "content": [{"type": "text", "text": "Hi"}], "stop_reason": "stop_sequence",
                    "stop_sequence": "###", "usage": {"input_tokens": 5, "output_tokens": 1}}


def test_stop_sequence_of_an_anthropic_upstream_reply() -> None:
    from llm_proxy.providers.anthropic import translate_response

    _, req = am.parse(STOP_BODY)
    raw, _ = translate_response(UPSTREAM_MESSAGE, "anthropic/claude")
    msg = sdk.message(orjson.loads(am.render(req, raw)))
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", "###")
    # An upstream that does not say which (OpenAI): a natural end, as before.
    plain = completion_json("c", "m", [choice_json(0, "Hi", [], "stop")], Usage(1, 1, 2))
    msg = sdk.message(orjson.loads(am.render(req, plain)))
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)
    # vLLM's stop_reason naming a sequence the request did not give (a token id, an EOS string): not one of its own.
    other = orjson.loads(plain)
    other["choices"][0]["stop_reason"] = "</s>"
    msg = sdk.message(orjson.loads(am.render(req, orjson.dumps(other))))
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)


def test_stop_sequence_of_an_anthropic_upstream_stream() -> None:
    from llm_proxy.providers.anthropic import AnthropicStreamDecoder

    upstream = b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in [
        {"type": "message_start", "message": {**UPSTREAM_MESSAGE, "content": [], "stop_reason": None,
                                              "stop_sequence": None}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hi"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "stop_sequence", "stop_sequence": "END"},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ])
    decoder = AnthropicStreamDecoder("anthropic/claude", True)
    neutral = decoder.feed(upstream) + decoder.close()
    _, req = am.parse({**STOP_BODY, "stream": True})
    framer = am.MessagesFramer(req)
    events = sdk.messages_events(b"".join(framer.feed(f) for f in neutral) + framer.end())
    delta = next(e for e in events if e.type == "message_delta")
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", "END")


def test_more_stop_sequences_than_the_neutral_form_takes_are_a_400() -> None:
    with pytest.raises(BadRequest) as e:
        am.to_chat({**STOP_BODY, "stop_sequences": ["a", "b", "c", "d", "e"]})
    assert e.value.param == "stop_sequences" and "at most 4" in e.value.message
    assert chat({**STOP_BODY, "stop_sequences": ["a", "b", "c", "d"]})["stop"] == ["a", "b", "c", "d"]
