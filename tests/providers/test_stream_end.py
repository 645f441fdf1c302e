"""Stream decoders' end of stream: [DONE], a body that ends without it, events that never end."""

from __future__ import annotations

import orjson
import pytest

from llm_proxy.errors import ProxyError
from llm_proxy.providers.anthropic import AnthropicStreamDecoder
from llm_proxy.providers.bedrock import BedrockStreamDecoder
from llm_proxy.providers.gemini import GeminiStreamDecoder
from llm_proxy.providers.openai_compat import OpenAIStreamDecoder
from llm_proxy.providers.sse import MAX_EVENT_BYTES, SSESplitter

from .support import fixture_bytes, fixture_json, split_every
from .test_bedrock import encode_events


def _ev(content: str | None = None, finish: str | None = None, *, spaced: bool = False) -> bytes:
    payload = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
               "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}]}
    if spaced:  # json.dumps' default separators, as some Python servers send
        raw = orjson.dumps(payload).replace(b'":', b'": ').replace(b',"', b', "')
    else:
        raw = orjson.dumps(payload)
    return b"data: " + raw + b"\n\n"


USAGE = (b'data: {"id":"c","model":"up","choices":[],'
         b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\n')


def test_plain_reads_still_take_the_one_replace_fast_path() -> None:
    d = OpenAIStreamDecoder("public", False)
    out = d.feed(_ev("a") + _ev("b") + _ev("c"))
    assert len(out) == 1 and out[0].count(b'"model":"public"') == 3 and not d.done  # one frame: the fast path


@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_done_ends_the_stream_and_nothing_after_it_is_relayed(step: int) -> None:
    d = OpenAIStreamDecoder("public", True)
    raw = _ev("hi") + _ev(None, "stop") + USAGE + b"data: [DONE]\n\n" + _ev("after the end")
    frames: list[bytes] = []
    for piece in split_every(raw, step):
        frames.extend(d.feed(piece))
        if d.done:
            break
    frames.extend(d.close())
    assert d.done and d.usage is not None and d.usage.total_tokens == 3
    assert b"after the end" not in b"".join(frames) and b"[DONE]" not in b"".join(frames)
    assert b"".join(frames).count(b"data: ") == 3


@pytest.mark.parametrize(
    ("raw", "done"),
    [
        (_ev("hi") + _ev(None, "stop"), True),  # finished, no [DONE] (servers that omit it)
        (_ev("hi") + _ev(None, "length", spaced=True), True),
        (_ev("hi") + _ev(None, "stop") + USAGE, True),  # the usage chunk comes after the finish_reason
        (_ev("hi") + _ev("there"), False),  # cut short
        (_ev("hi") + b'data: {"choices":[{"finish_reason":"st', False),
    ],
)
def test_a_body_that_ends_without_done_is_done_only_if_the_answer_finished(raw: bytes, done: bool) -> None:
    d = OpenAIStreamDecoder("public", False)
    d.feed(raw)
    d.close()
    assert d.done is done


def test_an_event_that_never_ends_is_refused() -> None:
    d = OpenAIStreamDecoder("public", False)
    piece = b"x" * (1024 * 1024)
    with pytest.raises(ProxyError) as info:
        d.feed(b'data: {"a":"')
        for _ in range(MAX_EVENT_BYTES // len(piece) + 1):
            d.feed(piece)
    assert info.value.status == 502 and info.value.code == "upstream_response_too_large"

    s = SSESplitter()  # the other decoders' splitter, likewise
    with pytest.raises(ProxyError):
        s.feed(b"event: x\n\n" + b"data: " + b"y" * (MAX_EVENT_BYTES + 1))


# ---- the other decoders: done at close() if their answer ended ---------------------------------------------

def _anthropic(raw: bytes) -> AnthropicStreamDecoder:
    d = AnthropicStreamDecoder("public", True)
    d.feed(raw)
    d.close()
    return d


def _gemini(raw: bytes) -> GeminiStreamDecoder:
    d = GeminiStreamDecoder("public", True, [], "g")
    d.feed(raw)
    d.close()
    return d


def _bedrock(events: list[dict[str, object]]) -> BedrockStreamDecoder:
    d = BedrockStreamDecoder("public", True, [])
    d.feed(encode_events(events))
    d.close()
    return d


def test_anthropic_gemini_and_bedrock_streams_cut_before_their_end_are_not_done() -> None:
    a = fixture_bytes("anthropic", "stream_text.sse")
    assert _anthropic(a).done is True
    assert _anthropic(a[: a.index(b"event: message_delta")]).done is False  # no stop_reason came
    assert _anthropic(fixture_bytes("anthropic", "stream_error.sse")).done is True  # the upstream's error, relayed

    g = fixture_bytes("gemini", "stream_text.sse")
    assert _gemini(g).done is True
    assert _gemini(g[: g.rindex(b"data: ")]).done is False  # the event with the finishReason is missing

    b = fixture_json("bedrock", "stream_text.json")
    assert _bedrock(b).done is True
    assert _bedrock([e for e in b if e["event"] not in ("messageStop", "metadata")]).done is False
