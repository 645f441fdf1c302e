"""Gemini translator against a loopback fake of generativelanguage (generateContent, SSE, batchEmbedContents)."""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from aiohttp import web
from google.genai import types as gtypes

from llm_proxy.config import ProviderSettings
from llm_proxy.errors import BadRequest, RateLimited, UpstreamError
from llm_proxy.providers import gemini as gem
from llm_proxy.providers.base import Target
from llm_proxy.providers.registry import build_provider
from llm_proxy.providers.sse import SSESplitter

from .schemas import (
    validate_gemini_embed_request,
    validate_gemini_request,
    validate_gemini_response,
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

KEY = "AIzaSyTEST-key-0123456789abcdef"
P = "gemini"


async def _handler(request: web.Request, rec: Received) -> web.StreamResponse:
    prefix = "/v1beta/models/"
    if not rec.path.startswith(prefix) or ":" not in rec.path:
        return json_response({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, 404)
    if "key" in rec.query:
        return json_response({"error": {"code": 400, "message": "key in query string", "status": "INVALID_ARGUMENT"}},
                             400)
    if rec.headers.get("x-goog-api-key") != KEY:
        return json_response(fixture_json(P, "error_400_key.json"), 400)
    model, method = rec.path[len(prefix) :].split(":", 1)
    body = rec.json()
    try:
        if method == "batchEmbedContents":
            validate_gemini_embed_request(body)
        else:
            validate_gemini_request(body)
    except Exception as exc:
        return json_response({"error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}}, 400)
    if model == "gemini-429":
        return json_response(fixture_json(P, "error_429.json"), 429)
    if model == "gemini-500":
        return json_response(fixture_json(P, "error_500.json"), 500)
    if method == "batchEmbedContents":
        assert all(r["model"] == "models/" + model for r in body["requests"])
        return json_response(fixture_bytes(P, "embed_response.json"))
    kind = "tools" if "tools" in model else "text"
    if method == "streamGenerateContent":
        if rec.query.get("alt") != "sse":
            return json_response({"error": {"code": 400, "message": "want alt=sse", "status": "INVALID_ARGUMENT"}},
                                 400)
        return await stream_response(request, fixture_bytes(P, f"stream_{kind}.sse"), "text/event-stream")
    assert method == "generateContent"
    return json_response(fixture_bytes(P, f"response_{kind}.json"))


fake = fake_upstream_fixture(_handler)


def _provider(fake: FakeUpstream, **kw: Any) -> Any:
    return build_provider(ProviderSettings(id="google", type="gemini", base_url=fake.url, api_key=KEY, **kw))


def _target(model: str) -> Target:
    return Target("google", model, "google/" + model.removeprefix("models/"))


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "x", "messages": [{"role": "user", "content": "Hi"}], **kw}


# -------------------------------------------------------------------------------------------------- golden


@pytest.mark.parametrize(("name", "model"), [("chat_request.json", "gemini-2.5-flash"),
                                             ("tools_request.json", "gemini-3-flash-preview")])
def test_request_golden_and_schema(name: str, model: str) -> None:
    fx = fixture_json(P, name)
    out = gem.translate_request(fx["openai"], model)
    assert out == fx["upstream"]
    validate_gemini_request(out)


def test_fixtures_match_published_types() -> None:
    validate_gemini_response(fixture_json(P, "response_text.json"))
    validate_gemini_response(fixture_json(P, "response_tools.json"))
    for name in ("stream_text.sse", "stream_tools.sse"):
        for _ev, payload in SSESplitter().feed(fixture_bytes(P, name)):
            validate_gemini_response(orjson.loads(payload))
    gtypes.EmbedContentResponse.model_validate(fixture_json(P, "embed_response.json"))


def test_no_signature_sentinel_for_older_models() -> None:
    fx = fixture_json(P, "tools_request.json")
    out = gem.translate_request(fx["openai"], "models/gemini-2.5-pro")
    parts = out["contents"][3]["parts"]
    assert "thoughtSignature" not in parts[1]
    assert out["contents"][1]["parts"][0]["thoughtSignature"] == "CvQBAY89a1+Sig=="  # a real one is always kept


def test_schema_conversion_is_accepted_by_the_sdk() -> None:
    schema = {
        "type": "object",
        "properties": {
            "node": {"$ref": "#/definitions/Node"},
            "mixed": {"type": ["integer", "string"]},
            "all": {"allOf": [{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                              {"properties": {"b": {"type": "boolean"}}}]},
            "const": {"const": "fixed"},
        },
        "definitions": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/definitions/Node"}}}},
    }
    out = gem.to_gemini_schema(schema)
    gtypes.Schema.model_validate(out)
    assert out["properties"]["mixed"] == {"anyOf": [{"type": "INTEGER"}, {"type": "STRING"}]}
    assert out["properties"]["all"]["required"] == ["a"] and set(out["properties"]["all"]["properties"]) == {"a", "b"}
    assert out["properties"]["const"] == {"type": "STRING", "enum": ["fixed"], "format": "enum"}
    depth, node = 0, out["properties"]["node"]
    while "properties" in node:  # a recursive $ref is cut off, not followed forever
        node, depth = node["properties"]["child"], depth + 1
    assert 0 < depth <= 40


def test_model_path() -> None:
    assert gem.model_path("gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert gem.model_path("models/gemini-2.5-flash") == "models/gemini-2.5-flash"
    assert gem.model_path("tunedModels/my-model-123") == "tunedModels/my-model-123"


def test_urls_and_key_header() -> None:
    p = build_provider(ProviderSettings(id="g", type="gemini", base_url="https://generativelanguage.googleapis.com",
                                        api_key=KEY))
    req = p.build_request("chat.completions", _chat(), _target("models/gemini-2.5-flash"), True)
    assert req.url == ("https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash"
                       ":streamGenerateContent?alt=sse")
    assert KEY not in req.url
    p2 = build_provider(ProviderSettings(id="g", type="gemini", base_url="https://example.test/v1", api_key=KEY))
    assert p2.build_request("chat.completions", _chat(), _target("g"), False).url == (
        "https://example.test/v1/models/g:generateContent")


def test_tool_result_needs_a_known_call() -> None:
    with pytest.raises(BadRequest):
        gem.translate_request({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, "m")


def test_missing_credentials() -> None:
    assert build_provider(ProviderSettings(id="g", type="gemini")).missing_credentials() == ["GEMINI_API_KEY"]


# -------------------------------------------------------------------------------------------------- over the wire


async def test_plain_chat_two_candidates(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "chat_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target("gemini-2.5-flash"))
    rec = fake.received[-1]
    assert rec.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert rec.json() == fx["upstream"]
    assert res.body is not None and res.body["id"] == "chatcmpl-mAitaLmkHPPlz7IPvtfUqQ4"
    assert strip_volatile(res.body) == {
        "object": "chat.completion",
        "model": "google/gemini-2.5-flash",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": '{"colours": ["red", "blue"]}'},
             "logprobs": None, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": '{"colours": ["green", "gold"]}'},
             "logprobs": None, "finish_reason": "length"},
        ],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 44, "total_tokens": 1244,
                  "prompt_tokens_details": {"cached_tokens": 1024}},
    }


async def test_models_prefix_is_not_doubled(fake: FakeUpstream) -> None:
    await call(_provider(fake), "chat.completions", _chat(), _target("models/gemini-2.5-flash"))
    assert fake.received[-1].path == "/v1beta/models/gemini-2.5-flash:generateContent"


async def test_streamed_answer(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("gemini-2.5-flash"), stream=True)
    acc = accumulate(res.chunks)
    assert acc["choices"][0] == {"role": "assistant", "content": "Hello, wörld!", "tool_calls": [],
                                 "finish_reason": "stop"}
    assert acc["usage"] == {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    assert res.chunks[-1]["choices"] == [] and res.chunks[0]["id"] == "chatcmpl-stream-text-1"
    res2 = await call(_provider(fake), "chat.completions", _chat(), _target("gemini-2.5-flash"), stream=True,
                      want_usage=False)
    assert all(c["choices"] for c in res2.chunks) and res2.usage is not None and res2.usage.total_tokens == 13


async def test_tool_call(fake: FakeUpstream) -> None:
    fx = fixture_json(P, "tools_request.json")
    res = await call(_provider(fake), "chat.completions", fx["openai"], _target("gemini-3-tools"))
    assert res.body is not None
    choice = res.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # the thought part is not shown
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo"})]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]
    assert calls[0]["extra_content"] == {"google": {"thought_signature": "CiQBcsjafGx0Vc1I5P1v"}}
    assert "extra_content" not in calls[1]

    # The client sends the calls back as the SDK would: the signature round-trips, ids are not invented upstream.
    follow = {"messages": [{"role": "user", "content": "Weather?"}, choice["message"],
                           {"role": "tool", "tool_call_id": calls[0]["id"], "content": "18C"},
                           {"role": "tool", "tool_call_id": calls[1]["id"], "content": "25C"}]}
    out = gem.translate_request(follow, "gemini-3-flash-preview")
    assert out["contents"][1]["parts"][0]["thoughtSignature"] == "CiQBcsjafGx0Vc1I5P1v"
    assert "id" not in out["contents"][1]["parts"][0]["functionCall"]
    assert [p["functionResponse"]["name"] for p in out["contents"][2]["parts"]] == ["get_weather", "get_weather"]


async def test_streamed_parallel_tool_calls(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("gemini-3-tools"), stream=True)
    acc = accumulate(res.chunks)
    calls = acc["choices"][0]["tool_calls"]
    assert acc["choices"][0]["content"] == "Checking both." and acc["choices"][0]["finish_reason"] == "tool_calls"
    assert [orjson.loads(c["arguments"]) for c in calls] == [{"city": "Paris"}, {"city": "Tokyo"}]
    deltas = [tc for ch in res.chunks for c in ch["choices"] for tc in c["delta"].get("tool_calls", [])]
    assert [d["index"] for d in deltas] == [0, 1]
    assert deltas[0]["extra_content"] == {"google": {"thought_signature": "CiQBcsjafGx0Vc1I5P1v"}}
    assert acc["usage"]["total_tokens"] == 110


async def test_429_keeps_retry_delay(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("gemini-429"))
    assert isinstance(res.error, RateLimited)
    assert res.error.status == 429 and res.error.headers["retry-after"] == "27"
    assert res.error.message.startswith("You exceeded your current quota")


async def test_500(fake: FakeUpstream) -> None:
    res = await call(_provider(fake), "chat.completions", _chat(), _target("gemini-500"))
    assert isinstance(res.error, UpstreamError)
    assert (res.error.status, res.error.type) == (500, "api_error")


async def test_invalid_key_is_an_upstream_auth_failure(fake: FakeUpstream) -> None:
    p = build_provider(ProviderSettings(id="g", type="gemini", base_url=fake.url, api_key="AIza-wrong-key"))
    res = await call(p, "chat.completions", _chat(), _target("gemini-2.5-flash"))
    assert res.error is not None and res.error.status == 502 and res.error.code == "upstream_auth_failed"


async def test_embeddings(fake: FakeUpstream) -> None:
    body = {"model": "e", "input": ["a", "b"], "dimensions": 3, "encoding_format": "base64"}
    res = await call(_provider(fake), "embeddings", body, _target("gemini-embedding-001"))
    rec = fake.received[-1]
    assert rec.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert rec.json()["requests"][1] == {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "b"}]},
                                         "outputDimensionality": 3}
    assert res.request.extra["encoding_format"] == "base64"
    assert res.body is not None and res.body["object"] == "list"
    assert [d["embedding"] for d in res.body["data"]] == [[0.25, -0.5, 0.125], [1.0, 0.0, -1.0]]
    from openai.types import CreateEmbeddingResponse

    CreateEmbeddingResponse.model_validate(res.body)


def test_embeddings_base64_encoding() -> None:
    from llm_proxy.providers.chat_common import embeddings_json

    data = orjson.loads(embeddings_json([[0.25, -0.5]], "m", "base64", None))
    raw = base64.b64decode(data["data"][0]["embedding"])
    assert struct.unpack("<2f", raw) == (0.25, -0.5)


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_decoder_is_split_independent(size: int) -> None:
    dec = gem.GeminiStreamDecoder("m", True, [KEY])
    frames: list[bytes] = []
    for piece in split_every(fixture_bytes(P, "stream_text.sse"), size):
        frames.extend(dec.feed(piece))
    frames.extend(dec.close())
    acc = accumulate(parse_frames(frames))
    assert acc["choices"][0]["content"] == "Hello, wörld!" and acc["usage"]["total_tokens"] == 13


def test_stream_error_payload() -> None:
    dec = gem.GeminiStreamDecoder("m", False, [KEY])
    err = {"error": {"code": 503, "message": f"overloaded {KEY}", "status": "UNAVAILABLE"}}
    frames = dec.feed(b"data: " + orjson.dumps(err) + b"\r\n\r\n")
    chunks = parse_frames(frames)
    assert chunks[0]["error"]["code"] == "service_unavailable" and KEY not in chunks[0]["error"]["message"]
    assert dec.error is not None and dec.error.status == 503


def test_blocked_prompt() -> None:
    out, _ = gem.translate_response({"promptFeedback": {"blockReason": "SAFETY"},
                                     "usageMetadata": {"promptTokenCount": 4}}, "m")
    assert orjson.loads(out)["choices"][0]["finish_reason"] == "content_filter"
