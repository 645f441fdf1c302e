"""End-to-end parity: the official openai SDK -> llm-proxy -> each provider's own wire protocol, on loopback.

One small script (reply text, tool calls, token counts) is rendered by a fake of every upstream in its native
format: OpenAI and Azure chat completions (JSON / SSE), Anthropic Messages (JSON / SSE), Gemini generateContent
(JSON / streamGenerateContent?alt=sse) and Bedrock Converse (JSON / AWS event-stream, SigV4 verified). The client
asks the same questions through the proxy with `model="<provider_id>/<model>"`; every test compares what the SDK
got with one expected value computed from the script, so the providers' answers are identical to each other
(apart from ids, timestamps and system fingerprints).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import openai
import orjson
import pytest
from aiohttp import web
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from ..helpers import LoopThread, ProxyServer, native_config
from .schemas import (
    check_bedrock_event,
    check_bedrock_response,
    validate_anthropic_error,
    validate_anthropic_event,
    validate_anthropic_request,
    validate_anthropic_response,
    validate_bedrock_request,
    validate_gemini_request,
    validate_gemini_response,
)
from .support import FakeUpstream, Received, json_response, stream_response
from .test_bedrock import ACCESS_KEY, REGION, SECRET_KEY, encode_events, verify_sigv4

# ------------------------------------------------------------------------------------------------------ the script


@dataclass(frozen=True)
class Reply:
    pieces: tuple[str, ...] = ()  # the text, in the pieces it is streamed in
    calls: tuple[tuple[str, dict[str, Any]], ...] = ()  # (function name, arguments)
    prompt: int = 0  # prompt tokens in all, cache reads included
    cached: int = 0  # of those, read from the prompt cache
    completion: int = 0

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def finish(self) -> str:
        return "tool_calls" if self.calls else "stop"


@dataclass(frozen=True)
class Failure:
    status: int
    message: str


HELLO = "Say hello to everyone."
WEATHER = "What's the weather in Zürich?"
BOTH = "Weather in Paris, and the time in Tokyo?"
BUSY = "Are you busy?"
BROKEN = "Please fall over."
RETRY_AFTER = "7"

SCRIPT: dict[str, Reply | Failure] = {
    HELLO: Reply(pieces=("Hello", ", every", "one — grüße", " ✓"), prompt=31, cached=16, completion=9),
    WEATHER: Reply(calls=(("get_weather", {"city": "Zürich", "days": 3, "units": {"temp": "C"}}),),
                   prompt=118, cached=64, completion=27),
    BOTH: Reply(pieces=("Checking", " both."),
                calls=(("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Asia/Tokyo", "format": "24h"})),
                prompt=125, cached=96, completion=41),
    BUSY: Failure(429, "Rate limit reached for requests. Please try again in 7s."),
    BROKEN: Failure(500, "The server had an error while processing your request."),
}

TOOLS: list[Any] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Weather forecast for a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "days": {"type": "integer"},
            "units": {"type": "object", "properties": {"temp": {"type": "string", "enum": ["C", "F"]}}}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}, "format": {"type": "string"}},
                       "required": ["tz"]}}},
]


def _args_json(args: dict[str, Any]) -> str:
    return json.dumps(args, ensure_ascii=False)


def _halves(s: str) -> list[str]:
    return [s[: len(s) // 2], s[len(s) // 2 :]]


def _rid() -> str:
    return uuid.uuid4().hex[:20]


# ------------------------------------------------------------------------------------------------- wire renderers
# Pure functions: script entry -> the upstream's native body or events (checked against the published schemas
# in test_fakes_speak_the_native_formats).

AZURE_FILTER = {name: {"filtered": False, "severity": "safe"} for name in ("hate", "self_harm", "sexual", "violence")}


def openai_completion(r: Reply, model: str, azure: bool) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": r.text or None, "refusal": None}
    if r.calls:
        message["tool_calls"] = [{"id": f"call_{_rid()}", "type": "function",
                                  "function": {"name": n, "arguments": _args_json(a)}} for n, a in r.calls]
    choice: dict[str, Any] = {"index": 0, "message": message, "logprobs": None, "finish_reason": r.finish}
    out: dict[str, Any] = {"id": f"chatcmpl-{_rid()}", "object": "chat.completion", "created": 1_760_000_000,
                           "model": model, "system_fingerprint": "fp_e2e", "choices": [choice],
                           "usage": _openai_usage(r)}
    if azure:
        choice["content_filter_results"] = AZURE_FILTER
        out["prompt_filter_results"] = [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]
    return out


def _openai_usage(r: Reply) -> dict[str, Any]:
    return {"prompt_tokens": r.prompt, "completion_tokens": r.completion, "total_tokens": r.prompt + r.completion,
            "prompt_tokens_details": {"cached_tokens": r.cached}}


def openai_chunks(r: Reply, model: str, azure: bool, include_usage: bool) -> list[dict[str, Any]]:
    cid = f"chatcmpl-{_rid()}"

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if azure:
            choice["content_filter_results"] = {}
        out: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": 1_760_000_000,
                               "model": model, "system_fingerprint": "fp_e2e", "choices": [choice]}
        if include_usage:
            out["usage"] = None  # OpenAI sends an explicit null in every chunk but the last
        return out

    chunks: list[dict[str, Any]] = []
    if azure:  # Azure's content-filter annotation of the prompt comes first, without choices
        chunks.append({"choices": [], "created": 0, "id": "", "model": "", "object": "",
                       "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": AZURE_FILTER}]})
    chunks.append(chunk({"role": "assistant", "content": "", "refusal": None}))
    chunks += [chunk({"content": p}) for p in r.pieces]
    for i, (name, args) in enumerate(r.calls):
        chunks.append(chunk({"tool_calls": [{"index": i, "id": f"call_{_rid()}", "type": "function",
                                             "function": {"name": name, "arguments": ""}}]}))
        chunks += [chunk({"tool_calls": [{"index": i, "function": {"arguments": frag}}]})
                   for frag in _halves(_args_json(args))]
    chunks.append(chunk({}, r.finish))
    if include_usage:
        chunks.append({**chunk({}), "choices": [], "usage": _openai_usage(r)})
    return chunks


def openai_error(f: Failure, azure: bool) -> dict[str, Any]:
    if azure:
        return {"error": {"code": str(f.status) if f.status == 429 else "InternalServerError", "message": f.message}}
    if f.status == 429:
        return {"error": {"message": f.message, "type": "requests", "param": None, "code": "rate_limit_exceeded"}}
    return {"error": {"message": f.message, "type": "server_error", "param": None, "code": None}}


_ANTHROPIC_STOP = {"stop": "end_turn", "tool_calls": "tool_use"}


def _anthropic_usage(r: Reply, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": r.prompt - r.cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": r.cached, "output_tokens": output_tokens}


def anthropic_message(r: Reply, model: str) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": r.text}] if r.text else []
    content += [{"type": "tool_use", "id": f"toolu_{_rid()}", "name": n, "input": a} for n, a in r.calls]
    return {"id": f"msg_{_rid()}", "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": _ANTHROPIC_STOP[r.finish], "stop_sequence": None, "usage": _anthropic_usage(r, r.completion)}


def anthropic_events(r: Reply, model: str) -> list[dict[str, Any]]:
    start = {**anthropic_message(r, model), "content": [], "stop_reason": None, "usage": _anthropic_usage(r, 1)}
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    block = 0
    if r.pieces:
        events.append({"type": "content_block_start", "index": block, "content_block": {"type": "text", "text": ""}})
        events += [{"type": "content_block_delta", "index": block, "delta": {"type": "text_delta", "text": p}}
                   for p in r.pieces]
        events.append({"type": "content_block_stop", "index": block})
        block += 1
    for name, args in r.calls:
        events.append({"type": "content_block_start", "index": block,
                       "content_block": {"type": "tool_use", "id": f"toolu_{_rid()}", "name": name, "input": {}}})
        events += [{"type": "content_block_delta", "index": block,
                    "delta": {"type": "input_json_delta", "partial_json": frag}} for frag in _halves(_args_json(args))]
        events.append({"type": "content_block_stop", "index": block})
        block += 1
    events.append({"type": "message_delta", "delta": {"stop_reason": _ANTHROPIC_STOP[r.finish], "stop_sequence": None},
                   "usage": {"output_tokens": r.completion}})
    events.append({"type": "message_stop"})
    return events


def anthropic_error(f: Failure) -> dict[str, Any]:
    etype = "rate_limit_error" if f.status == 429 else "api_error"
    return {"type": "error", "error": {"type": etype, "message": f.message}, "request_id": f"req_{_rid()}"}


def _gemini_usage(r: Reply, done: bool) -> dict[str, Any]:
    if not done:  # earlier chunks of a stream only know the prompt
        return {"promptTokenCount": r.prompt, "cachedContentTokenCount": r.cached, "totalTokenCount": r.prompt}
    return {"promptTokenCount": r.prompt, "cachedContentTokenCount": r.cached, "candidatesTokenCount": r.completion,
            "totalTokenCount": r.prompt + r.completion}


def _gemini_parts(r: Reply) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"text": p} for p in r.pieces]
    return parts + [{"functionCall": {"name": n, "args": a}} for n, a in r.calls]


def gemini_response(r: Reply, model: str) -> dict[str, Any]:
    parts = ([{"text": r.text}] if r.text else []) + [p for p in _gemini_parts(r) if "functionCall" in p]
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": _gemini_usage(r, True), "modelVersion": model, "responseId": _rid()}


def gemini_events(r: Reply, model: str) -> list[dict[str, Any]]:
    rid, parts = _rid(), _gemini_parts(r)
    events: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
        if last:
            cand["finishReason"] = "STOP"
        events.append({"candidates": [cand], "usageMetadata": _gemini_usage(r, last), "modelVersion": model,
                       "responseId": rid})
    return events


def gemini_error(f: Failure) -> dict[str, Any]:
    if f.status == 429:  # Gemini says when to retry in the body (RetryInfo), not in a header
        return {"error": {"code": 429, "message": f.message, "status": "RESOURCE_EXHAUSTED", "details": [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "6.2s"}]}}
    return {"error": {"code": 500, "message": f.message, "status": "INTERNAL"}}


_BEDROCK_STOP = {"stop": "end_turn", "tool_calls": "tool_use"}


def _bedrock_usage(r: Reply) -> dict[str, Any]:
    return {"inputTokens": r.prompt - r.cached, "outputTokens": r.completion, "totalTokens": r.prompt + r.completion,
            "cacheReadInputTokens": r.cached, "cacheWriteInputTokens": 0}


def bedrock_response(r: Reply) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"text": r.text}] if r.text else []
    content += [{"toolUse": {"toolUseId": f"tooluse_{_rid()}", "name": n, "input": a}} for n, a in r.calls]
    return {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": _BEDROCK_STOP[r.finish],
            "usage": _bedrock_usage(r), "metrics": {"latencyMs": 321}}


def bedrock_events(r: Reply) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [{"event": "messageStart", "payload": {"role": "assistant"}}]
    block = 0
    if r.pieces:
        events += [{"event": "contentBlockDelta", "payload": {"contentBlockIndex": block, "delta": {"text": p}}}
                   for p in r.pieces]
        events.append({"event": "contentBlockStop", "payload": {"contentBlockIndex": block}})
        block += 1
    for name, args in r.calls:
        events.append({"event": "contentBlockStart", "payload": {
            "contentBlockIndex": block, "start": {"toolUse": {"toolUseId": f"tooluse_{_rid()}", "name": name}}}})
        events += [{"event": "contentBlockDelta", "payload": {"contentBlockIndex": block,
                                                               "delta": {"toolUse": {"input": frag}}}}
                   for frag in _halves(_args_json(args))]
        events.append({"event": "contentBlockStop", "payload": {"contentBlockIndex": block}})
        block += 1
    events.append({"event": "messageStop", "payload": {"stopReason": _BEDROCK_STOP[r.finish]}})
    events.append({"event": "metadata", "payload": {"usage": _bedrock_usage(r), "metrics": {"latencyMs": 321}}})
    return events


def bedrock_error(f: Failure) -> tuple[str, dict[str, Any]]:
    name = "ThrottlingException" if f.status == 429 else "InternalServerException"
    return f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/", {"message": f.message}


# ------------------------------------------------------------------------------------------------ fake upstreams

OPENAI_KEY = "sk-e2e-openai-0123456789abcdef"
AZURE_KEY = "0123456789abcdef0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-api03-e2e-0123456789"
GEMINI_KEY = "AIzaSyE2E-key-0123456789abcdef"

OPENAI_MODEL = "gpt-4o-mini"
AZURE_DEPLOYMENT = "gpt4o-prod"
AZURE_API_VERSION = "2024-10-21"
ANTHROPIC_MODEL = "claude-sonnet-4-5"
GEMINI_MODEL = "gemini-2.5-flash"
BEDROCK_MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"

PROVIDERS = ["openai", "azure", "anthropic", "gemini", "bedrock"]
PUBLIC_MODEL = {
    "openai": f"openai/{OPENAI_MODEL}",
    "azure": "azure/gpt-4o",
    "anthropic": f"anthropic/{ANTHROPIC_MODEL}",
    "gemini": f"gemini/{GEMINI_MODEL}",
    "bedrock": "bedrock/claude-3-5-sonnet",
}


def _entry(prompt: str, declared: list[str]) -> Reply | Failure | str:
    """The scripted answer to `prompt`, or why a real upstream would refuse the request."""
    entry = SCRIPT.get(prompt)
    if entry is None:
        return f"the script has no answer to {prompt!r}"
    if isinstance(entry, Reply) and not {n for n, _ in entry.calls} <= set(declared):
        return f"tools {sorted(n for n, _ in entry.calls)} were not all declared (got {declared})"
    return entry


async def _sse(request: web.Request, payloads: list[dict[str, Any]], *, named: bool = False,
               crlf: bool = False) -> web.StreamResponse:
    nl = "\r\n" if crlf else "\n"
    text = "".join((f"event: {p['type']}{nl}" if named else "") + "data: " + json.dumps(p, ensure_ascii=False)
                   + nl + nl for p in payloads)
    data = text.encode() + (b"" if named or crlf else b"data: [DONE]\n\n")
    return await stream_response(request, data, "text/event-stream")


async def _openai_like(request: web.Request, body: dict[str, Any], model: str, azure: bool) -> web.StreamResponse:
    declared = [t["function"]["name"] for t in body.get("tools") or []]
    content = body["messages"][-1]["content"]
    entry = _entry(content if isinstance(content, str) else "", declared)
    if isinstance(entry, str):
        return json_response({"error": {"message": entry, "type": "invalid_request_error", "code": None}}, 400)
    if isinstance(entry, Failure):
        hdrs = {"retry-after": RETRY_AFTER} if entry.status == 429 else {}
        return json_response(openai_error(entry, azure), entry.status, hdrs)
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await _sse(request, openai_chunks(entry, model, azure, include_usage))
    return json_response(openai_completion(entry, model, azure))


async def openai_handler(request: web.Request, rec: Received) -> web.StreamResponse:
    if rec.method != "POST" or rec.path != "/v1/chat/completions":
        return json_response({"error": {"message": "Unknown request URL", "type": "invalid_request_error"}}, 404)
    if rec.headers.get("authorization") != f"Bearer {OPENAI_KEY}":
        return json_response({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error",
                                        "code": "invalid_api_key"}}, 401)
    body = rec.json()
    if body.get("model") != OPENAI_MODEL:
        return json_response({"error": {"message": f"The model `{body.get('model')}` does not exist",
                                        "type": "invalid_request_error", "code": "model_not_found"}}, 404)
    return await _openai_like(request, body, OPENAI_MODEL, azure=False)


async def azure_handler(request: web.Request, rec: Received) -> web.StreamResponse:
    if (rec.path != f"/openai/deployments/{AZURE_DEPLOYMENT}/chat/completions"
            or rec.query != {"api-version": AZURE_API_VERSION}):
        return json_response({"error": {"code": "404", "message": "Resource not found"}}, 404)
    if rec.headers.get("api-key") != AZURE_KEY or "authorization" in rec.headers:
        return json_response({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
                             401)
    return await _openai_like(request, rec.json(), "gpt-4o-2024-08-06", azure=True)


async def anthropic_handler(request: web.Request, rec: Received) -> web.StreamResponse:
    if rec.method != "POST" or rec.path != "/v1/messages":
        return json_response({"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}, 404)
    if rec.headers.get("x-api-key") != ANTHROPIC_KEY or rec.headers.get("anthropic-version") != "2023-06-01":
        return json_response({"type": "error", "error": {"type": "authentication_error",
                                                         "message": "invalid x-api-key"}}, 401)
    body = rec.json()
    try:
        validate_anthropic_request(body)
        assert body["model"] == ANTHROPIC_MODEL
    except Exception as exc:  # the fake refuses what the real API would refuse
        return json_response({"type": "error", "error": {"type": "invalid_request_error", "message": str(exc)}}, 400)
    content = body["messages"][-1]["content"]  # a string, or blocks (both are Anthropic's)
    prompt = content if isinstance(content, str) else "".join(b["text"] for b in content if b["type"] == "text")
    entry = _entry(prompt, [t["name"] for t in body.get("tools") or []])
    if isinstance(entry, str):
        return json_response({"type": "error", "error": {"type": "invalid_request_error", "message": entry}}, 400)
    if isinstance(entry, Failure):
        hdrs = {"retry-after": RETRY_AFTER} if entry.status == 429 else {}
        return json_response(anthropic_error(entry), entry.status, hdrs)
    if body.get("stream"):
        return await _sse(request, anthropic_events(entry, ANTHROPIC_MODEL), named=True)
    return json_response(anthropic_message(entry, ANTHROPIC_MODEL))


async def gemini_handler(request: web.Request, rec: Received) -> web.StreamResponse:
    m = re.fullmatch(r"/v1beta/models/([^/:]+):(generateContent|streamGenerateContent)", rec.path)
    if m is None or m[1] != GEMINI_MODEL:
        return json_response({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, 404)
    if rec.headers.get("x-goog-api-key") != GEMINI_KEY or "key" in rec.query:
        return json_response({"error": {"code": 400, "message": "API key not valid.", "status": "INVALID_ARGUMENT",
                                        "details": [{"reason": "API_KEY_INVALID"}]}}, 400)
    stream = m[2] == "streamGenerateContent"
    body = rec.json()
    try:
        validate_gemini_request(body)
        assert rec.query == ({"alt": "sse"} if stream else {})
    except Exception as exc:
        return json_response({"error": {"code": 400, "message": str(exc), "status": "INVALID_ARGUMENT"}}, 400)
    prompt = "".join(p.get("text", "") for p in body["contents"][-1]["parts"])
    declared = [d["name"] for t in body.get("tools") or [] for d in t.get("functionDeclarations") or []]
    entry = _entry(prompt, declared)
    if isinstance(entry, str):
        return json_response({"error": {"code": 400, "message": entry, "status": "INVALID_ARGUMENT"}}, 400)
    if isinstance(entry, Failure):
        return json_response(gemini_error(entry), entry.status)
    if stream:
        return await _sse(request, gemini_events(entry, GEMINI_MODEL), crlf=True)
    return json_response(gemini_response(entry, GEMINI_MODEL))


async def bedrock_handler(request: web.Request, rec: Received) -> web.StreamResponse:
    why = verify_sigv4(rec)
    if why is not None:
        return json_response({"message": f"The request signature we calculated does not match ({why})"}, 403,
                             {"x-amzn-ErrorType": "InvalidSignatureException:http://internal.amazon.com/coral/"})
    m = re.fullmatch(r"/model/([^/]+)/(converse|converse-stream)", rec.path)
    if m is None or unquote(m[1]) != BEDROCK_MODEL:
        return json_response({"message": "unknown operation"}, 404, {"x-amzn-ErrorType": "UnknownOperationException"})
    stream = m[2] == "converse-stream"
    body = rec.json()
    try:
        validate_bedrock_request(BEDROCK_MODEL, body, "ConverseStream" if stream else "Converse")
    except AssertionError as exc:
        return json_response({"message": str(exc)}, 400, {"x-amzn-ErrorType": "ValidationException"})
    prompt = "".join(b.get("text", "") for b in body["messages"][-1]["content"])
    declared = [t["toolSpec"]["name"] for t in (body.get("toolConfig") or {}).get("tools") or []]
    entry = _entry(prompt, declared)
    if isinstance(entry, str):
        return json_response({"message": entry}, 400, {"x-amzn-ErrorType": "ValidationException"})
    if isinstance(entry, Failure):
        etype, err = bedrock_error(entry)
        hdrs = {"x-amzn-ErrorType": etype, "x-amzn-RequestId": str(uuid.uuid4())}
        if entry.status == 429:
            hdrs["retry-after"] = RETRY_AFTER
        return json_response(err, entry.status, hdrs)
    if stream:
        return await stream_response(request, encode_events(bedrock_events(entry)),
                                     "application/vnd.amazon.eventstream", piece=29,
                                     headers={"x-amzn-RequestId": str(uuid.uuid4())})
    return json_response(bedrock_response(entry))


HANDLERS = {"openai": openai_handler, "azure": azure_handler, "anthropic": anthropic_handler,
            "gemini": gemini_handler, "bedrock": bedrock_handler}


def _config(urls: dict[str, str]) -> str:
    return f"""
providers:
  - {{id: openai, type: openai, base_url: "{urls['openai']}/v1", api_key: {OPENAI_KEY}}}
  - {{id: azure, type: azure, base_url: "{urls['azure']}", api_key: {AZURE_KEY}}}
  - {{id: anthropic, type: anthropic, base_url: "{urls['anthropic']}", api_key: {ANTHROPIC_KEY}}}
  - {{id: gemini, type: gemini, base_url: "{urls['gemini']}", api_key: {GEMINI_KEY}}}
  - {{id: bedrock, type: bedrock, base_url: "{urls['bedrock']}", region: {REGION},
      aws_access_key_id: {ACCESS_KEY}, aws_secret_access_key: "{SECRET_KEY}"}}
models:
  - {{id: "{PUBLIC_MODEL['openai']}", provider: openai, upstream_model: {OPENAI_MODEL}}}
  - {{id: "{PUBLIC_MODEL['azure']}", provider: azure, upstream_model: {AZURE_DEPLOYMENT}}}
  - {{id: "{PUBLIC_MODEL['anthropic']}", provider: anthropic, upstream_model: {ANTHROPIC_MODEL}}}
  - {{id: "{PUBLIC_MODEL['gemini']}", provider: gemini, upstream_model: {GEMINI_MODEL}}}
  - {{id: "{PUBLIC_MODEL['bedrock']}", provider: bedrock, upstream_model: "{BEDROCK_MODEL}"}}
default_model: "{PUBLIC_MODEL['openai']}"
auth: {{mode: none, allow_unauthenticated: true}}
server: {{drain_delay_seconds: 0}}
"""


@dataclass
class Env:
    proxy: ProxyServer
    fakes: dict[str, FakeUpstream]
    client: openai.OpenAI


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    lt = LoopThread("e2e-fake-upstreams")  # the fakes serve while the sync SDK client blocks the test thread
    fakes: dict[str, FakeUpstream] = {}
    try:
        for name, handler in HANDLERS.items():
            fakes[name] = lt.run(FakeUpstream(handler).start())
        with ProxyServer(native_config(_config({n: f.url for n, f in fakes.items()}))) as px, openai.OpenAI(
            base_url=px.base_url, api_key="unused-by-auth-none", max_retries=0, timeout=20
        ) as client:
            yield Env(px, fakes, client)
    finally:
        for f in fakes.values():
            lt.run(f.close())
        lt.stop()


# ------------------------------------------------------------------------------------------------------- helpers

VOLATILE = frozenset({"id", "created", "system_fingerprint"})
AZURE_ANNOTATIONS = frozenset({"prompt_filter_results", "content_filter_results"})


def comparable(value: Any) -> Any:
    """A response as the SDK sees it, minus volatile fields, Azure's content-filter annotations and nulls (an absent
    optional field and an explicit null read the same through the SDK); tool-call arguments parsed."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in VOLATILE or k in AZURE_ANNOTATIONS or v is None:
                continue
            out[k] = json.loads(v) if k == "arguments" and isinstance(v, str) else comparable(v)
        return out
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def expected(prompt: str, model: str) -> dict[str, Any]:
    """The one answer every provider must produce for `prompt`."""
    r = SCRIPT[prompt]
    assert isinstance(r, Reply)
    message: dict[str, Any] = {"role": "assistant"}
    if r.text:
        message["content"] = r.text
    if r.calls:
        message["tool_calls"] = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in r.calls]
    return {
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": r.finish}],
        "usage": expected_usage(prompt),
    }


def expected_usage(prompt: str) -> dict[str, Any]:
    r = SCRIPT[prompt]
    assert isinstance(r, Reply)
    return {"prompt_tokens": r.prompt, "completion_tokens": r.completion, "total_tokens": r.prompt + r.completion,
            "prompt_tokens_details": {"cached_tokens": r.cached}}


def ask(prompt: str) -> list[Any]:
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": prompt}]


def sdk_stream(env: Env, model: str, prompt: str, **kw: Any) -> tuple[list[ChatCompletionChunk], dict[str, Any]]:
    """Stream through the SDK; the chunks and the completion the SDK's own accumulator builds from them."""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(input_tools=kw.get("tools", openai.omit))
    chunks: list[ChatCompletionChunk] = []
    with env.client.chat.completions.create(model=model, messages=ask(prompt), stream=True,
                                            stream_options={"include_usage": True}, **kw) as stream:
        for chunk in stream:
            chunks.append(chunk)
            state.handle_chunk(chunk)
    final: dict[str, Any] = dict(state.get_final_completion().to_dict())
    for choice in final["choices"]:  # the accumulator keeps each tool call's stream `index`
        for tc in choice["message"].get("tool_calls") or []:
            tc.pop("index")
    return chunks, final


def raw_stream(env: Env, model: str, prompt: str, include_usage: bool, **kw: Any) -> list[dict[str, Any]]:
    """The SSE body as sent: every event a valid chunk, then exactly one `data: [DONE]`. Returns the chunks."""
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    with env.client.chat.completions.with_streaming_response.create(
        model=model, messages=ask(prompt), stream=True, **extra, **kw
    ) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        body = resp.read()
    assert body.endswith(b"\n\ndata: [DONE]\n\n") and body.count(b"[DONE]") == 1
    events = body.split(b"\n\n")[:-2]
    assert all(e.startswith(b"data: {") and b"\n" not in e for e in events), events
    chunks = [orjson.loads(e[len(b"data: ") :]) for e in events]
    check_chunks(chunks, model, prompt, include_usage)
    return chunks


def check_chunks(chunks: list[dict[str, Any]], model: str, prompt: str, include_usage: bool) -> None:
    """Shape of a chunk sequence as OpenAI sends it."""
    r = SCRIPT[prompt]
    assert isinstance(r, Reply)
    for c in chunks:
        ChatCompletionChunk.model_validate(c)
        assert c["object"] == "chat.completion.chunk" and c["model"] == model
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    with_choices = [c for c in chunks if c["choices"]]
    assert all(len(c["choices"]) == 1 and c["choices"][0]["index"] == 0 for c in with_choices)
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices if c["choices"][0]["finish_reason"]]
    assert finishes == [r.finish] and with_choices[-1]["choices"][0]["finish_reason"] == r.finish
    usages = [c for c in chunks if c.get("usage")]
    if include_usage:
        assert usages == [chunks[-1]] and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == expected_usage(prompt)
    else:
        assert usages == [] and with_choices == chunks


# --------------------------------------------------------------------------------------------------------- tests


def test_fakes_speak_the_native_formats() -> None:
    """The renderers produce what each provider publishes (SDK types / botocore service model)."""
    for prompt, r in SCRIPT.items():
        if isinstance(r, Failure):
            validate_anthropic_error(anthropic_error(r))
            continue
        for azure in (False, True):
            ChatCompletion.model_validate(openai_completion(r, "m", azure))
            for chunk in openai_chunks(r, "m", azure, include_usage=True)[azure:]:
                ChatCompletionChunk.model_validate(chunk)
        validate_anthropic_response(anthropic_message(r, "m"))
        for ev in anthropic_events(r, "m"):
            validate_anthropic_event(ev)
        validate_gemini_response(gemini_response(r, "m"))
        for ev in gemini_events(r, "m"):
            validate_gemini_response(ev)
        check_bedrock_response(bedrock_response(r))
        for ev in bedrock_events(r):
            check_bedrock_event(ev["event"], ev["payload"])
        assert r.prompt > r.cached > 0, prompt  # cache reads reported by every provider, so comparable


@pytest.mark.parametrize("provider", PROVIDERS)
def test_plain_chat(env: Env, provider: str) -> None:
    model = PUBLIC_MODEL[provider]
    before = len(env.fakes[provider].received)
    completion = env.client.chat.completions.create(model=model, messages=ask(HELLO))
    assert completion.model == model and completion.id
    assert comparable(completion.to_dict()) == expected(HELLO, model)
    assert len(env.fakes[provider].received) == before + 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_answer(env: Env, provider: str) -> None:
    model = PUBLIC_MODEL[provider]
    chunks, final = sdk_stream(env, model, HELLO)
    assert comparable(final) == expected(HELLO, model)  # the very same answer as without streaming
    check_chunks([c.to_dict() for c in chunks], model, HELLO, include_usage=True)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert texts == list(SCRIPT[HELLO].pieces)  # type: ignore[union-attr]
    raw_stream(env, model, HELLO, include_usage=True)
    raw_stream(env, model, HELLO, include_usage=False)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_tool_call(env: Env, provider: str) -> None:
    model = PUBLIC_MODEL[provider]
    completion = env.client.chat.completions.create(model=model, messages=ask(WEATHER), tools=TOOLS)
    assert comparable(completion.to_dict()) == expected(WEATHER, model)
    calls = completion.choices[0].message.tool_calls or []
    assert [c.id for c in calls if c.id] == [c.id for c in calls] != []
    assert completion.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_streamed_parallel_tool_calls(env: Env, provider: str) -> None:
    model = PUBLIC_MODEL[provider]
    chunks, final = sdk_stream(env, model, BOTH, tools=TOOLS)
    assert comparable(final) == expected(BOTH, model)
    check_chunks([c.to_dict() for c in chunks], model, BOTH, include_usage=True)
    # Each call opens with a delta carrying its index, id, type and name; later deltas only add arguments.
    starts = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or [] if tc.id]
    assert [(tc.index, tc.type, tc.function and tc.function.name) for tc in starts] == [
        (0, "function", "get_weather"), (1, "function", "get_time")]
    assert len({tc.id for tc in starts}) == 2
    raw_stream(env, model, BOTH, include_usage=False, tools=TOOLS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_rate_limited(env: Env, provider: str) -> None:
    before = len(env.fakes[provider].received)
    with pytest.raises(openai.RateLimitError) as ei:
        env.client.chat.completions.create(model=PUBLIC_MODEL[provider], messages=ask(BUSY))
    err = ei.value
    assert err.status_code == 429
    assert err.response.headers.get("retry-after") == RETRY_AFTER
    assert err.code == "rate_limit_exceeded"
    assert err.response.json()["error"]["message"] == SCRIPT[BUSY].message  # type: ignore[union-attr]
    assert len(env.fakes[provider].received) == before + 1  # neither the SDK nor the proxy retried


@pytest.mark.parametrize("provider", PROVIDERS)
def test_upstream_error(env: Env, provider: str) -> None:
    before = len(env.fakes[provider].received)
    with pytest.raises(openai.InternalServerError) as ei:
        env.client.chat.completions.create(model=PUBLIC_MODEL[provider], messages=ask(BROKEN))
    err = ei.value
    assert err.status_code == 500
    assert err.response.json()["error"]["message"] == SCRIPT[BROKEN].message  # type: ignore[union-attr]
    assert len(env.fakes[provider].received) == before + 1
