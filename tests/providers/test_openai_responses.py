"""The Responses pass-through decoder (providers/openai_responses.py): the public model in every Response snapshot,
the usage from the final one, an upstream error event rebuilt with the credentials scrubbed."""

from __future__ import annotations

import orjson

from llm_proxy.providers.openai_responses import ResponsesNativeDecoder, parse_response
from llm_proxy.types import Usage

KEY = "sk-upstream-0123456789abcdef"


def _sse(*events: dict) -> bytes:
    return b"".join(b"event: %s\ndata: %s\n\n" % (e["type"].encode(), orjson.dumps(e)) for e in events)


def _data(frames: list[bytes]) -> list[dict]:
    return [orjson.loads(f.split(b"data: ", 1)[1]) for f in frames]


USAGE = {"input_tokens": 9, "input_tokens_details": {"cached_tokens": 4}, "output_tokens": 2, "total_tokens": 11}


def test_stream_relayed_with_the_public_model_and_its_usage() -> None:
    d = ResponsesNativeDecoder("openai/gpt-4o", [KEY], "openai")
    blob = _sse({"type": "response.created", "sequence_number": 0, "response": {"model": "gpt-4o-2024", "usage": None}},
                {"type": "response.output_text.delta", "sequence_number": 1, "delta": "Hi"},
                {"type": "response.completed", "sequence_number": 2,
                 "response": {"model": "gpt-4o-2024", "usage": USAGE}})
    out = d.feed(blob[:37]) + d.feed(blob[37:])  # an event cut across reads
    events = _data(out)
    assert [e["type"] for e in events] == ["response.created", "response.output_text.delta", "response.completed"]
    assert {e["response"]["model"] for e in events if "response" in e} == {"openai/gpt-4o"}
    assert d.done is True and d.usage == Usage(9, 2, 11, 4) and d.error is None


def test_error_event_is_rebuilt_without_the_key() -> None:
    d = ResponsesNativeDecoder("m", [KEY], "openai")
    out = d.feed(_sse({"type": "error", "sequence_number": 3, "code": "server_error",
                       "message": f"boom with key {KEY}", "param": None}))
    (event,) = _data(out)
    assert KEY not in orjson.dumps(event).decode() and event["sequence_number"] == 3
    assert d.error is not None and d.done is True and KEY not in d.error.message
    # response.failed ends the stream as an error (the row's status), its message scrubbed too.
    failed = ResponsesNativeDecoder("m", [KEY], "openai")
    (event,) = _data(failed.feed(_sse({"type": "response.failed", "sequence_number": 5, "response": {
        "model": "x", "usage": USAGE, "error": {"code": "server_error", "message": f"bad {KEY}"}}})))
    assert failed.error is not None and failed.error.status == 502 and failed.done is True
    assert KEY not in event["response"]["error"]["message"] and failed.usage == Usage(9, 2, 11, 4)
    # A stream that ends before its final event was cut short.
    cut = ResponsesNativeDecoder("m", [], "openai")
    cut.feed(_sse({"type": "response.created", "sequence_number": 0, "response": {"model": "x"}}))
    assert cut.close() == [] and cut.done is False


def test_non_streamed_response() -> None:
    raw, usage = parse_response(orjson.dumps({"object": "response", "model": "gpt-4o-2024", "usage": USAGE}),
                                "openai/gpt-4o", "openai")
    assert orjson.loads(raw)["model"] == "openai/gpt-4o" and usage == Usage(9, 2, 11, 4)


def test_native_responses_by_default_only_on_openais_own_base_url() -> None:
    from llm_proxy.config import ProviderSettings
    from llm_proxy.providers.openai_compat import OpenAICompatProvider

    def native(**kw: object) -> bool:
        return OpenAICompatProvider(ProviderSettings.model_validate({"id": "p", "api_key": "k", **kw})).native

    assert native(type="openai", base_url="https://api.openai.com/v1")
    assert not native(type="openai", base_url="http://127.0.0.1:9/v1")  # a vLLM or a fake: chat only, translated
    assert native(type="openai", base_url="http://127.0.0.1:9/v1", native_client_api=True)
    assert not native(type="openai", base_url="https://api.openai.com/v1", native_client_api=False)
    assert not native(type="openai_compat", base_url="https://api.openai.com/v1")
