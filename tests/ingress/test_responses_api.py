"""The Responses API translators: request -> neutral chat body, chat.completion -> Response, chunk stream ->
Responses events; every produced object and event validated against the openai SDK's own types."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import orjson
import pytest

from llm_proxy.errors import BadRequest, NotFound, ProxyError, RateLimited
from llm_proxy.ingress import responses_api as ra
from llm_proxy.ingress.base import Scope
from llm_proxy.providers.chat_common import ChunkWriter, choice_json, completion_json, tool_call_json
from llm_proxy.types import Principal, Usage

from . import sdk

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(body: dict[str, Any]) -> dict[str, Any]:
    """to_chat, checking on the way that the request is one the SDK sends, that it is left as it was and that
    what comes out is a valid chat/completions body."""
    sdk.responses_request(body)
    before = copy.deepcopy(body)
    out = ra.to_chat(body)
    assert body == before
    sdk.chat_request(out)
    return out


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


def test_string_input_and_instructions() -> None:
    out = chat({"model": "m", "input": "Hi", "instructions": "Be terse.", "temperature": 0.2, "top_p": 0.9,
                "max_output_tokens": 50})
    assert out == {"model": "m", "messages": [{"role": "system", "content": "Be terse."},
                                              {"role": "user", "content": "Hi"}],
                   "max_completion_tokens": 50, "temperature": 0.2, "top_p": 0.9}


def test_items_with_images_tool_calls_and_outputs() -> None:
    body = {
        "model": "m",
        "input": [
            {"role": "developer", "content": "Use tools."},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "Weather here?"},
                {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"},
            ]},
            {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed", "content": [
                {"type": "output_text", "text": "Checking.", "annotations": []}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city":"Oslo"}'},
            {"type": "function_call", "call_id": "call_2", "name": "weather", "arguments": '{"city":"Rome"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "cold"},
            {"type": "function_call_output", "call_id": "call_2",
             "output": [{"type": "input_text", "text": "warm"}]},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"role": "user", "content": "Thanks"},
        ],
    }
    assert chat(body)["messages"] == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "auto"}},
        ]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Rome"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
        {"role": "tool", "tool_call_id": "call_2", "content": "warm"},
        {"role": "user", "content": "Thanks"},
    ]


def test_function_call_without_assistant_text_is_its_own_turn() -> None:
    out = chat({"model": "m", "input": [
        {"role": "user", "content": "Go"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "ok"},
    ]})
    assert out["messages"][1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_tools_tool_choice_and_text_format() -> None:
    body = {
        "model": "m", "input": "x", "parallel_tool_calls": False,
        "tools": [{"type": "function", "name": "weather", "description": "Weather of a city", "parameters": WEATHER,
                   "strict": True}],
        "tool_choice": {"type": "function", "name": "weather"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": WEATHER, "strict": True}},
        "reasoning": {"effort": "low"},
        "user": "u1",
    }
    out = chat(body)
    assert out["tools"] == [{"type": "function", "function": {
        "name": "weather", "description": "Weather of a city", "parameters": WEATHER, "strict": True}}]
    assert out["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert out["parallel_tool_calls"] is False
    assert out["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "answer", "schema": WEATHER, "strict": True}}
    assert out["reasoning_effort"] == "low"
    assert out["user"] == "u1"
    assert chat({"model": "m", "input": "x", "text": {"format": {"type": "json_object"}}})["response_format"] == {
        "type": "json_object"}
    assert "response_format" not in chat({"model": "m", "input": "x", "text": {"format": {"type": "text"}}})
    for choice in ("auto", "none", "required"):
        assert chat({**body, "tool_choice": choice})["tool_choice"] == choice


def test_stream_always_asks_for_usage_and_store_is_off_by_default() -> None:
    out = chat({"model": "m", "input": "x", "stream": True})
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert "store" not in out
    _, req = ra.parse({"model": "m", "input": "x"})
    assert req.store is False
    _, req = ra.parse({"model": "m", "input": "x", "store": True})
    assert req.store is True


@pytest.mark.parametrize("tool", [
    {"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs"]},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "mcp", "server_label": "x", "server_url": "https://mcp.example.com"},
])
def test_builtin_tools_are_refused_by_name(tool: dict[str, Any]) -> None:
    with pytest.raises(BadRequest) as e:
        ra.to_chat({"model": "m", "input": "x", "tools": [tool]})
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    assert f"'{tool['type']}'" in e.value.message and e.value.param == "tools[0].type"


def test_previous_response_id_without_stored_responses_is_a_clear_400() -> None:
    with pytest.raises(BadRequest) as e:
        ra.to_chat({"model": "m", "input": "more", "previous_response_id": "resp_123"})
    assert e.value.param == "previous_response_id" and e.value.type == "invalid_request_error"
    assert "input" in e.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "m"}, "input"),
    ({"input": "x"}, "model"),
    ({"model": "m", "input": 3}, "input"),
    ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"model": "m", "input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"model": "m", "input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
     "input[0].content[0]"),
    ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"model": "m", "input": "x", "max_output_tokens": True}, "max_output_tokens"),
    ({"model": "m", "input": "x", "temperature": 3}, "temperature"),
    ({"model": "m", "input": "x", "background": True}, "background"),
    ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({"model": "m", "input": "x", "tool_choice": "required"}, "tool_choice"),
])
def test_invalid_requests_name_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as e:
        ra.to_chat(body)
    assert e.value.param == param


class Store:
    """StoredResponses over a dict: (response id, subject) -> the stored completion, as the ledger gives it back."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}

    async def stored_response(self, response_id: str, subject: str) -> dict[str, Any] | None:
        return self.rows.get((response_id, subject))


ALICE, BOB = Principal("alice"), Principal("bob")


def test_a_stored_response_continues_the_conversation() -> None:
    store, kept = Store(), []
    scope = Scope(ALICE, store, kept.append)
    body = asyncio.run(ra.prepare({"model": "m", "instructions": "Be brief.", "input": "What is 2+2?",
                                   "store": True}, scope))
    _, req = ra.parse(body)
    ra.render(req, completion_json("c1", "m", [choice_json(0, "4", [
        tool_call_json("call_9", "calc", '{"x":1}')], "tool_calls")], Usage(5, 1, 6)))
    stored = ra.capture(req)
    assert stored is not None and stored["response"]["id"] == req.id
    assert not kept  # a non-streamed reply is kept through capture (the exchange's), not Scope.keep
    # The instructions are the request's own: a later request gives its own (as OpenAI does).
    assert stored["input_messages"] == [{"type": "message", "role": "user", "content": "What is 2+2?"}]
    store.rows[req.id, "alice"] = orjson.loads(orjson.dumps(stored))  # as the ledger gives it back
    follow = {"model": "m", "instructions": "Be kind.", "previous_response_id": req.id, "input": [
        {"type": "function_call_output", "call_id": "call_9", "output": "4"}]}
    prepared = asyncio.run(ra.prepare(follow, scope))
    out = chat(prepared)
    assert out["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4", "tool_calls": [
            {"id": "call_9", "type": "function", "function": {"name": "calc", "arguments": '{"x":1}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "4"},
    ]
    # The output items go back without this proxy's item ids (an upstream never saw them).
    assert all("id" not in item for item in prepared["input"])
    _, req2 = ra.parse(prepared)
    resp = sdk.response(orjson.loads(ra.render(req2, completion_json("c2", "m", [choice_json(0, "ok", [], "stop")],
                                                                     Usage(9, 1, 10)))))
    assert resp.previous_response_id == req.id
    # Not stored (no `store: true`): nothing captured, and the request was left as it came.
    assert ra.capture(req2) is None and follow["input"][0]["type"] == "function_call_output"
    assert ra.capture(ra.parse({"model": "m", "input": "x"})[1]) is None


def test_previous_response_of_another_caller_or_unknown_is_a_404() -> None:
    store = Store()
    store.rows["resp_a", "alice"] = {"input_messages": [], "response": {"output": []}}
    for who, rid in ((BOB, "resp_a"), (ALICE, "resp_b")):
        with pytest.raises(NotFound) as e:
            asyncio.run(ra.prepare({"model": "m", "input": "x", "previous_response_id": rid},
                                   Scope(who, store, None)))
        assert (e.value.status, e.value.code, e.value.param) == (404, "previous_response_not_found",
                                                                 "previous_response_id")
        assert rid in e.value.message
    # With nothing kept (usage.store_completions off) it is the 400 that says so, store: true or not.
    with pytest.raises(BadRequest) as b:
        asyncio.run(ra.prepare({"model": "m", "input": "x", "previous_response_id": "resp_a", "store": True},
                               Scope(ALICE, None, None)))
    assert b.value.status == 400 and "store_completions" in b.value.message


def test_a_streamed_response_is_kept_with_its_final_event() -> None:
    kept: list[dict[str, Any]] = []
    body = asyncio.run(ra.prepare({"model": "m", "input": "Hi", "store": True, "stream": True},
                                  Scope(ALICE, Store(), kept.append)))
    _, req = ra.parse(body)
    framer = ra.ResponsesFramer(req)
    w = ChunkWriter("m")
    framer.feed(w.role() + w.text("Hel") + w.text("lo") + w.finish("stop"))
    assert not kept
    out = framer.feed(w.usage(Usage(3, 2, 5)))
    assert b"response.completed" in out and len(kept) == 1
    assert kept[0]["response"]["id"] == req.id and kept[0]["response"]["output"][0]["content"][0]["text"] == "Hello"
    assert kept[0]["input_messages"] == [{"type": "message", "role": "user", "content": "Hi"}]


# --------------------------------------------------------------------------------------------------
# Replies
# --------------------------------------------------------------------------------------------------


def _req(**body: Any) -> ra.ResponsesRequest:
    return ra.parse({"model": "openai/gpt-4o", "input": "x", **body})[1]


def test_reply_with_text() -> None:
    req = _req(instructions="Be brief.", temperature=0.5, metadata={"k": "v"})
    raw = completion_json("c1", "openai/gpt-4o", [choice_json(0, "Hello!", [], "stop")],
                          Usage(10, 3, 13, cached_tokens=4))
    resp = sdk.response(orjson.loads(ra.render(req, raw)))
    assert resp.id == req.id and resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.model == "openai/gpt-4o"
    assert resp.output_text == "Hello!"
    assert resp.output[0].type == "message" and resp.output[0].id.startswith("msg_")
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (10, 3, 13)
    assert resp.usage.input_tokens_details.cached_tokens == 4
    assert resp.instructions == "Be brief." and resp.temperature == 0.5 and resp.metadata == {"k": "v"}


def test_reply_with_tool_calls() -> None:
    req = _req(tools=[{"type": "function", "name": "weather", "parameters": WEATHER, "strict": True}])
    raw = completion_json("c1", "m", [choice_json(0, None, [
        tool_call_json("call_a", "weather", '{"city":"Oslo"}'),
        tool_call_json("call_b", "weather", '{"city":"Rome"}')], "tool_calls")], Usage(10, 8, 18))
    resp = sdk.response(orjson.loads(ra.render(req, raw)))
    assert [(o.type, o.call_id, o.name, o.arguments) for o in resp.output] == [
        ("function_call", "call_a", "weather", '{"city":"Oslo"}'),
        ("function_call", "call_b", "weather", '{"city":"Rome"}')]
    assert all(o.id.startswith("fc_") and o.status == "completed" for o in resp.output)
    assert resp.tools[0].name == "weather"


def test_reply_cut_by_max_tokens_is_incomplete() -> None:
    raw = completion_json("c1", "m", [choice_json(0, "Once upon", [], "length")], Usage(3, 2, 5))
    resp = sdk.response(orjson.loads(ra.render(_req(max_output_tokens=2), raw)))
    assert resp.status == "incomplete" and resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.output[0].status == "incomplete"


def test_reply_without_usage_has_none_and_a_bad_body_is_a_502() -> None:
    raw = completion_json("c1", "m", [choice_json(0, "x", [], "stop")], None)
    assert sdk.response(orjson.loads(ra.render(_req(), raw))).usage is None
    with pytest.raises(ProxyError) as e:
        ra.render(_req(), b'{"object": "list"}')
    assert e.value.status == 502


# --------------------------------------------------------------------------------------------------
# Streams
# --------------------------------------------------------------------------------------------------


def _stream(frames: list[bytes], req: ra.ResponsesRequest | None = None, split: bool = False) -> list[Any]:
    framer = ra.ResponsesFramer(req or _req(stream=True))
    out = b""
    for f in frames:
        if split:  # an event cut across reads
            out += framer.feed(f[:7]) + framer.feed(f[7:])
        else:
            out += framer.feed(f)
    out += framer.end()
    return sdk.responses_events(out)


def test_text_stream_has_the_documented_sequence() -> None:
    w = ChunkWriter("m")
    events = _stream([w.role(), w.text("Hel"), w.text("lo"), w.finish("stop"), w.usage(Usage(7, 2, 9))], split=True)
    assert [e.type for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == ["Hel", "lo"]
    assert events[6].text == "Hello" and events[7].part.text == "Hello"
    done = events[-1].response
    assert done.status == "completed" and done.output_text == "Hello"
    assert done.usage.input_tokens == 7 and done.usage.output_tokens == 2 and done.usage.total_tokens == 9
    assert events[0].response.status == "in_progress" and events[0].response.id == done.id
    assert done.output[0].id == events[2].item.id


def test_tool_call_stream() -> None:
    w = ChunkWriter("m")
    frames = [w.role(), w.text("Let me look."), w.tool_start(0, "call_a", "weather"),
              w.tool_args(0, '{"city":'), w.tool_args(0, '"Oslo"}'), w.tool_start(1, "call_b", "weather", "{}"),
              w.finish("tool_calls"), w.usage(Usage(20, 10, 30))]
    events = _stream(frames)
    types = [e.type for e in events]
    assert types == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.delta", "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    calls = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_a", "weather", '{"city":"Oslo"}', "completed"), ("call_b", "weather", "{}", "completed")]
    final = events[-1].response
    assert [o.type for o in final.output] == ["message", "function_call", "function_call"]
    assert final.output[1].arguments == '{"city":"Oslo"}'


def test_length_stream_ends_incomplete_and_end_without_usage_still_closes() -> None:
    w = ChunkWriter("m")
    events = _stream([w.text("Once"), w.finish("length")])
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert events[-1].response.usage is None


def test_error_mid_stream_is_an_error_event_then_response_failed() -> None:
    w = ChunkWriter("m")
    framer = ra.ResponsesFramer(_req(stream=True))
    out = framer.feed(w.text("Hi")) + framer.error(RateLimited("Too many requests"))
    assert framer.end() == b"" and framer.error(RateLimited("again")) == b""
    events = sdk.responses_events(out)
    assert [e.type for e in events][-2:] == ["error", "response.failed"]
    assert events[-2].message == "Too many requests" and events[-2].code == "rate_limit_exceeded"
    failed = events[-1].response
    assert failed.status == "failed" and failed.error.code == "rate_limit_exceeded"
    assert failed.output[0].status == "incomplete"


def test_the_sdk_stream_accumulator_takes_the_events() -> None:
    """openai's own ResponseStreamState (what client.responses.stream runs) accepts the sequence and builds the
    final response from it."""
    from openai import omit
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    w = ChunkWriter("m")
    framer = ra.ResponsesFramer(_req(stream=True))
    blob = b"".join(framer.feed(f) for f in [
        w.text("Sure."), w.tool_start(0, "call_a", "weather", '{"city":"Oslo"}'), w.finish("tool_calls"),
        w.usage(Usage(1, 2, 3))]) + framer.end()
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    for _, data in sdk.sse(blob):
        state.handle_event(adapter.validate_python(data))
    final = state._completed_response
    assert final is not None and final.output_text == "Sure."
    assert final.output[1].type == "function_call" and final.output[1].arguments == '{"city":"Oslo"}'
    assert framer.response is not None and framer.response["id"] == final.id
