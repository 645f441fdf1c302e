"""The OpenAI stream decoder's fast path on OpenAI's own shape (stream_options.include_usage: every chunk ends
with `"usage":null`, then the usage chunk, then [DONE]): what the client gets is what the slow path gives."""

from __future__ import annotations

import orjson
import pytest

from llm_proxy.providers.openai_compat import OpenAIStreamDecoder


def _chunk(content: str | None, finish: str | None = None, model: str = "gpt-up-2024") -> bytes:
    return b"data: " + orjson.dumps({
        "id": "c1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": {"content": content} if content else {}, "finish_reason": finish}],
        "usage": None,
    }) + b"\n\n"


USAGE_CHUNK = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-up-2024","choices":[],'
               b'"usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, '
               b'"prompt_tokens_details": {"cached_tokens": 1}}}\n\n')  # spaced: its bytes are kept
DONE = b"data: [DONE]\n\n"
BODY = _chunk("Hel") + _chunk("lo") + _chunk(None, "stop") + USAGE_CHUNK + DONE


def _events(frames: list[bytes]) -> list[dict[str, object]]:
    raw = b"".join(frames)
    assert raw.endswith(b"\n\n") and b"\r" not in raw
    return [orjson.loads(e[6:]) for e in raw[:-2].split(b"\n\n")]


def _expected(want_usage: bool) -> list[dict[str, object]]:
    events = [orjson.loads(e[6:]) for e in BODY[:-2].split(b"\n\n")[:-1]]  # without [DONE]
    for e in events:
        e["model"] = "public"
    return events if want_usage else events[:-1]


@pytest.mark.parametrize("want_usage", [True, False])
def test_a_whole_stream_in_one_read_fast_chunks_then_the_usage_chunk(want_usage: bool) -> None:
    d = OpenAIStreamDecoder("public", want_usage)
    frames = d.feed(BODY)
    assert len(frames) == (2 if want_usage else 1)  # the chunks in one replace; the usage chunk on its own
    assert _events(frames) == _expected(want_usage)
    assert d.done and d.usage is not None and (d.usage.total_tokens, d.usage.cached_tokens) == (7, 1)
    if want_usage:  # relayed in the upstream's own bytes, only `model` rewritten
        assert frames[1] == USAGE_CHUNK.replace(b'"model":"gpt-up-2024"', b'"model":"public"')
    assert d.close() == []


@pytest.mark.parametrize("step", [1, 5, 64, 200])
def test_any_split_of_the_reads_gives_the_same_events(step: int) -> None:
    d = OpenAIStreamDecoder("public", True)
    frames: list[bytes] = []
    for i in range(0, len(BODY), step):
        frames.extend(d.feed(BODY[i : i + step]))
        if d.done:
            break
    frames.extend(d.close())
    assert _events(frames) == _expected(True) and d.done and d.usage is not None


def test_the_usage_chunk_and_done_in_a_read_of_their_own() -> None:
    d = OpenAIStreamDecoder("public", True)
    first = d.feed(_chunk("Hi") + _chunk(None, "stop"))
    last = d.feed(USAGE_CHUNK + DONE)
    assert _events(first + last) == [
        {**orjson.loads(_chunk("Hi")[6:]), "model": "public"},
        {**orjson.loads(_chunk(None, "stop")[6:]), "model": "public"},
        {**orjson.loads(USAGE_CHUNK[6:]), "model": "public"},
    ]
    assert d.done and d.usage is not None and d.usage.total_tokens == 7


def test_usage_in_every_chunk_is_not_taken_for_null_usage() -> None:
    # vLLM's continuous_usage_stats: a usage object in each chunk. The decoder learnt a null-usage upstream from
    # another stream (the provider's cache); these chunks do not end so, so they leave the fast path.
    cache: dict[str, tuple[bytes, bytes, bool]] = {}
    d = OpenAIStreamDecoder("public", False, learned=cache, upstream_model="gpt-up")
    d.feed(_chunk("a") + _chunk(None, "stop") + USAGE_CHUNK + DONE)
    assert cache["gpt-up"][2] is True
    with_usage = _chunk("x").replace(b'"usage":null', b'"usage":{"prompt_tokens":1,"completion_tokens":1,'
                                     b'"total_tokens":2}')
    d = OpenAIStreamDecoder("public", False, learned=cache, upstream_model="gpt-up")
    frames = d.feed(with_usage + _chunk("y") + DONE)
    events = _events(frames)
    assert [e["model"] for e in events] == ["public", "public"]
    assert "usage" not in events[0]  # the client did not ask for usage: taken out, as before
    assert d.usage is not None and d.usage.total_tokens == 2


def test_what_a_stream_learns_serves_the_next_one_and_a_changed_model_is_learnt_again() -> None:
    cache: dict[str, tuple[bytes, bytes, bool]] = {}
    d = OpenAIStreamDecoder("public", True, learned=cache, upstream_model="gpt-up")
    d.feed(BODY)
    assert cache == {"gpt-up": (b'"model":"gpt-up-2024"', b'data: {"id', True)}
    d = OpenAIStreamDecoder("public", True, learned=cache, upstream_model="gpt-up")
    assert _events(d.feed(BODY)) == _expected(True)
    # The same name now answers with another model version: every chunk is still rewritten.
    body = BODY.replace(b"gpt-up-2024", b"gpt-up-2025")
    d = OpenAIStreamDecoder("public", True, learned=cache, upstream_model="gpt-up")
    frames = d.feed(body)
    assert b"gpt-up-2025" not in b"".join(frames) and len(_events(frames)) == 4
    assert cache["gpt-up"][0] == b'"model":"gpt-up-2025"'


def test_an_error_event_among_null_usage_chunks_is_rebuilt() -> None:
    d = OpenAIStreamDecoder("public", False, ["sk-secret"], "up")
    error = b'data: {"error":{"message":"bad sk-secret","type":"x","code":"c"},"usage":null}\n\n'
    frames = d.feed(_chunk("a") + error + _chunk("b"))
    raw = b"".join(frames)
    assert b"sk-secret" not in raw and d.error is not None
    assert [e.get("model") for e in _events(frames)] == ["public", None, "public"]


# The usage chunk and [DONE] at the end of a read take a fast path of their own (_usage_fast): what it relays
# must be what the slow path (the splitter and _frames, event by event) relays.

def _slow(body: bytes, want_usage: bool) -> tuple[bytes, object]:
    """What the client gets, and the usage read, when every event goes through the splitter and _frames."""
    d = OpenAIStreamDecoder("public", want_usage)
    frames = d._frames(d._split.feed(body))
    frames.extend(d.close())
    return b"".join(frames), d.usage


@pytest.mark.parametrize("want_usage", [True, False])
def test_a_usage_chunk_with_choices_keeps_them_and_hides_the_usage_only_if_not_asked(want_usage: bool) -> None:
    usage = USAGE_CHUNK.replace(b'"choices":[]', b'"choices":[{"index":0,"delta":{"content":"!"},'
                                b'"finish_reason":null}]')
    body = _chunk("Hel") + _chunk(None, "stop") + usage + DONE
    d = OpenAIStreamDecoder("public", want_usage)
    frames = d.feed(body)
    assert (b"".join(frames), d.usage) == _slow(body, want_usage)
    events = _events(frames)
    assert events[-1]["choices"] and ("usage" in events[-1]) is want_usage and events[-1]["model"] == "public"
    assert d.done and d.usage is not None and d.usage.total_tokens == 7


@pytest.mark.parametrize("want_usage", [True, False])
def test_an_error_event_where_the_usage_chunk_would_be_is_rebuilt(want_usage: bool) -> None:
    error = (b'data: {"id":"c1","model":"gpt-up-2024","error":{"message":"bad sk-secret","type":"x"},'
             b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n')
    d = OpenAIStreamDecoder("public", want_usage, ["sk-secret"], "up")
    raw = b"".join(d.feed(_chunk("a") + _chunk(None, "stop") + error + DONE))
    assert b"sk-secret" not in raw and b"gpt-up-2024" not in raw and d.error is not None


@pytest.mark.parametrize(
    "usage",
    [
        USAGE_CHUNK.replace(b"\n\n", b"\r\n\r\n"),  # CRLF
        USAGE_CHUNK.replace(b"}}\n\n", b"}}\r\n\n"),  # a CR the JSON would take for white space
        USAGE_CHUNK.replace(b'"choices":[],', b'"choices":[],\n'),  # the usage on a line (a field) of its own
        USAGE_CHUNK.replace(b"data: ", b"note: "),  # not a data line
        USAGE_CHUNK.replace(b'"choices":[],', b'"choices":[],\ndata: "x":1,'),  # two data lines: one payload
        b": keep-alive\n" + USAGE_CHUNK,  # a comment line in the event
        USAGE_CHUNK.replace(b'"model":"gpt-up-2024"', b'"model" : "gpt-up-2024"'),  # not the learnt bytes
        USAGE_CHUNK.replace(b'"created":1,', b'"created":1,"meta":{"model":"gpt-up-2024"},'),  # nested first
        USAGE_CHUNK.replace(b'"id":"c1"', b'"model":"alias","id":"c1"'),  # another `model` key first
        USAGE_CHUNK.replace(b'"model":"gpt-up-2024"', b'"model":"gpt-up-2024\\"x"'),  # an escape in the name
        USAGE_CHUNK.replace(b'"model":"gpt-up-2024"', b'"model":"gpt-up-2025"'),  # another model
        USAGE_CHUNK.replace(b"}}\n\n", b"}\n\n"),  # not JSON
    ],
)
@pytest.mark.parametrize("want_usage", [True, False])
def test_a_usage_chunk_off_the_plain_shape_is_relayed_as_the_slow_path_relays_it(usage: bytes, want_usage: bool
                                                                               ) -> None:
    body = _chunk("Hel") + _chunk(None, "stop") + usage + DONE
    d = OpenAIStreamDecoder("public", want_usage)
    frames = d.feed(body)
    frames.extend(d.close())
    assert (b"".join(frames), d.usage) == _slow(body, want_usage)
    assert d.done


@pytest.mark.parametrize("want_usage", [True, False])
def test_the_usage_chunk_rewritten_in_place_is_the_model_rewritten_and_nothing_else(want_usage: bool) -> None:
    # A model name with an escape, learnt from the chunks: the usage chunk's bytes are the upstream's but for it.
    model = 'gpt-"up"\\2024'
    usage = USAGE_CHUNK.replace(b'"model":"gpt-up-2024"', b'"model":' + orjson.dumps(model))
    body = _chunk("Hel", model=model) + _chunk(None, "stop", model=model) + usage + DONE
    d = OpenAIStreamDecoder('pub"lic', want_usage)
    frames = d.feed(body)
    assert d.done and d.close() == []
    raw = b"".join(frames)
    assert b"gpt-" not in raw and raw.count(b'"model":"pub\\"lic"') == (3 if want_usage else 2)
    if want_usage:
        assert frames[-1] == usage.replace(b'"model":' + orjson.dumps(model), b'"model":"pub\\"lic"')
    else:
        assert b'"usage":{' not in raw


def test_a_usage_chunk_split_across_reads_is_read_once_whole() -> None:
    at = len(BODY) - len(DONE) - len(USAGE_CHUNK) // 2
    d = OpenAIStreamDecoder("public", True)
    frames = d.feed(BODY[:at]) + d.feed(BODY[at:])
    assert _events(frames) == _expected(True) and d.done and d.usage is not None and d.usage.total_tokens == 7


@pytest.mark.parametrize("brk", [b"\n", b"\r"])  # (a lone CR ends an SSE line too)
@pytest.mark.parametrize("want_usage", [True, False])
def test_a_chunk_broken_over_two_lines_among_plain_chunks_is_relayed_as_the_slow_path_relays_it(
        want_usage: bool, brk: bytes) -> None:
    broken = _chunk("b").replace(b'"created":1,', b'"created":1,' + brk)
    body = _chunk("a") + broken + _chunk(None, "stop") + USAGE_CHUNK + DONE
    d = OpenAIStreamDecoder("public", want_usage)
    frames = d.feed(body)
    assert (b"".join(frames), d.usage) == _slow(body, want_usage)


def test_two_usage_chunks_at_the_end_of_a_read_are_both_hidden_when_not_asked() -> None:
    with_usage = _chunk("x").replace(b'"usage":null', b'"usage":{"prompt_tokens":1,"completion_tokens":1,'
                                     b'"total_tokens":2}')
    body = _chunk("a") + with_usage + USAGE_CHUNK + DONE
    cache: dict[str, tuple[bytes, bytes, bool]] = {}
    OpenAIStreamDecoder("public", False, learned=cache, upstream_model="up").feed(BODY)  # learnt: null-usage
    d = OpenAIStreamDecoder("public", False, learned=cache, upstream_model="up")
    frames = d.feed(body)
    assert (b"".join(frames), d.usage) == _slow(body, False)
    assert b'"usage":{' not in b"".join(frames) and d.usage is not None and d.usage.total_tokens == 7


# Per-stream work the provider saves: the public model's bytes cached, the secrets read only for an error event.

def test_provider_decoder_scrubs_the_key_current_when_the_error_event_comes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from llm_proxy.config import ProviderSettings
    from llm_proxy.providers.base import Target
    from llm_proxy.providers.openai_compat import OpenAICompatProvider

    key_file = tmp_path / "key"
    key_file.write_text("sk-old-secret-key")
    provider = OpenAICompatProvider(ProviderSettings(id="up", type="openai", base_url="http://x/v1",
                                                     api_key_file=str(key_file)))
    provider.key.recheck_seconds = 0.0
    target = Target("up", "gpt-up-2024", "public")
    first = provider.stream_decoder("chat.completions", target, True)
    second = provider.stream_decoder("chat.completions", target, True)
    assert first._to is second._to  # the public model's bytes made once per provider
    key_file.write_text("sk-new-secret-key-rotated")
    import os
    os.utime(key_file, (1, 1))  # a distinct mtime, whatever the clock's resolution
    error = b'data: {"error":{"message":"bad sk-new-secret-key-rotated","type":"x","code":"c"}}\n\n'
    raw = b"".join(first.feed(_chunk("a") + error))
    assert b"sk-new-secret-key-rotated" not in raw and first.error is not None
    assert b"".join(second.feed(BODY)) == b"".join(OpenAIStreamDecoder("public", True).feed(BODY))


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": 1}},
    {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": {"cached_tokens": None}},
    {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7, "prompt_tokens_details": None},
    {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 0},
    {"prompt_tokens": 5, "completion_tokens": 2},
    {"prompt_tokens": True, "completion_tokens": 2, "total_tokens": 3},
    {"prompt_tokens": 5.0, "completion_tokens": "2", "total_tokens": 7},
    {"prompt_tokens": None, "completion_tokens": 2, "total_tokens": 2, "prompt_tokens_details": {}},
])
def test_usage_from_openai_fast_path_matches_the_general_one(usage: dict[str, object]) -> None:
    from llm_proxy.types import Usage

    def general(data: dict[str, object]) -> Usage:
        prompt = int(data.get("prompt_tokens") or 0)  # type: ignore[call-overload]
        completion = int(data.get("completion_tokens") or 0)  # type: ignore[call-overload]
        total = int(data.get("total_tokens") or (prompt + completion))  # type: ignore[call-overload]
        details = data.get("prompt_tokens_details")
        cached = int(details["cached_tokens"]) if isinstance(details, dict) and details.get(
            "cached_tokens") is not None else None
        return Usage(prompt, completion, total, cached)

    got = Usage.from_openai(usage)
    assert got == general(usage)
    assert got is not None and all(type(v) is int for v in (got.prompt_tokens, got.completion_tokens,
                                                             got.total_tokens))
