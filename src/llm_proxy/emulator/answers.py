"""The emulator's answers: OpenAI chat, completion and embedding bodies or SSE events, and its error answers."""

from __future__ import annotations

import base64
import hashlib
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .script import ScriptItem

DEFAULT_EMBEDDING_DIMS = 8
MAX_EMBEDDING_DIMS = 65536
_ARGUMENT_PIECE_CHARS = 8
_WORD_RE = re.compile(r"\s*\S+")


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


class _ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def response(self) -> web.Response:
        return _error_response(self.status, self.message, self.type, self.code, self.param, self.headers)


def _json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


def _error_response(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    envelope = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return _json_response(envelope, status, headers)


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


def _words(text: str) -> int:
    return len(text.split())


def _split_words(text: str) -> list[str]:
    """Split into one piece per word, leading whitespace kept, so that "".join(pieces) == text."""
    pieces: list[str] = _WORD_RE.findall(text)
    consumed = sum(len(p) for p in pieces)
    if consumed < len(text):
        if pieces:
            pieces[-1] += text[consumed:]
        else:
            pieces = [text]
    return pieces


def _split_n(text: str, n: int) -> list[str]:
    """Split into `n` contiguous pieces of (nearly) equal length, fewer when the text is shorter."""
    if not text:
        return []
    n = max(1, min(n, len(text)))
    size = len(text)
    return [text[i * size // n : (i + 1) * size // n] for i in range(n)]


def _split_arguments(text: str, chunks: int | None) -> list[str]:
    if chunks is not None:
        return _split_n(text, chunks)
    return [text[i : i + _ARGUMENT_PIECE_CHARS] for i in range(0, len(text), _ARGUMENT_PIECE_CHARS)]


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str)]
        return " ".join(texts)
    return ""


def _sse(data: Any) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


_SSE_DONE = b"data: [DONE]\n\n"


def _usage(prompt: int, completion: int, override: Mapping[str, Any] | None) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if override:
        usage.update(override)
        if "total_tokens" not in override:
            p, c = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(p, int) and isinstance(c, int):
                usage["total_tokens"] = p + c
    return usage


def _include_usage(body: Mapping[str, Any], item: ScriptItem | None) -> bool:
    if item is not None and item.no_usage:
        return False
    options = body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


# --------------------------------------------------------------------------------------------------
# Answer builders
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Answer:
    """A ready-to-send answer: the non-stream JSON body, or the list of SSE events."""

    body: Any = None
    events: list[bytes] | None = None


def _chat_answer(body: Mapping[str, Any], model: str, item: ScriptItem | None) -> _Answer:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise _ApiError(400, "'messages' is a required property and must be an array", param="messages")
    prompt_tokens = 0
    last_user = ""
    for message in messages:
        if not isinstance(message, Mapping):
            raise _ApiError(400, "each message must be an object", param="messages")
        text = _content_text(message.get("content"))
        prompt_tokens += _words(text)
        if message.get("role") == "user":
            last_user = text
    prompt_tokens = max(1, prompt_tokens)

    tool_calls = item.tool_calls if item else ()
    content = item.content if item else None
    if content is None and not tool_calls:
        content = f"Echo: {last_user}"
    call_ids = [call.id or _new_id("call_") for call in tool_calls]
    completion_tokens = _words(content or "") + sum(_words(call.arguments) for call in tool_calls)
    finish_reason = (item.finish_reason if item else None) or ("tool_calls" if tool_calls else "stop")
    usage = _usage(prompt_tokens, completion_tokens, item.usage if item else None)
    cid, created = _new_id("chatcmpl-"), int(time.time())

    if not body.get("stream"):
        reply: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            reply["tool_calls"] = [
                {"id": tid, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                for tid, call in zip(call_ids, tool_calls, strict=True)
            ]
        answer: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "message": reply, "logprobs": None, "finish_reason": finish_reason}],
        }
        if not (item and item.no_usage):
            answer["usage"] = usage
        return _Answer(body=answer)

    include_usage = _include_usage(body, item)
    chunks = item.chunks if item else None

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            data["usage"] = None
        return _sse(data)

    events = [chunk({"role": "assistant", "content": ""})]
    pieces = _split_n(content, chunks) if content and chunks else _split_words(content or "")
    events.extend(chunk({"content": piece}) for piece in pieces)
    for index, (tid, call) in enumerate(zip(call_ids, tool_calls, strict=True)):
        head = {"index": index, "id": tid, "type": "function", "function": {"name": call.name, "arguments": ""}}
        events.append(chunk({"tool_calls": [head]}))
        events.extend(
            chunk({"tool_calls": [{"index": index, "function": {"arguments": frag}}]})
            for frag in _split_arguments(call.arguments, chunks)
        )
    events.append(chunk({}, finish_reason))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(_SSE_DONE)
    return _Answer(events=events)


def _prompt_parts(prompt: Any) -> tuple[int, str]:
    """(token count, last text prompt) of a legacy completions `prompt`."""
    if prompt is None:
        return 0, ""
    if isinstance(prompt, str):
        return _words(prompt), prompt
    if isinstance(prompt, list):
        tokens, last = 0, ""
        for part in prompt:
            if isinstance(part, str):
                tokens += _words(part)
                last = part
            elif isinstance(part, int) and not isinstance(part, bool):
                tokens += 1
            elif isinstance(part, list):
                tokens += len(part)
            else:
                raise _ApiError(400, "'prompt' must be a string, an array of strings or of tokens", param="prompt")
        return tokens, last
    raise _ApiError(400, "'prompt' must be a string, an array of strings or of tokens", param="prompt")


def _completion_answer(body: Mapping[str, Any], model: str, item: ScriptItem | None) -> _Answer:
    prompt_tokens, last_prompt = _prompt_parts(body.get("prompt"))
    prompt_tokens = max(1, prompt_tokens)
    text = item.content if item and item.content is not None else f"Echo: {last_prompt}"
    finish_reason = (item.finish_reason if item else None) or "stop"
    usage = _usage(prompt_tokens, _words(text), item.usage if item else None)
    cid, created = _new_id("cmpl-"), int(time.time())

    def payload(choice_text: str, finish: str | None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": choice_text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }

    if not body.get("stream"):
        data = payload(text, finish_reason)
        if not (item and item.no_usage):
            data["usage"] = usage
        return _Answer(body=data)

    include_usage = _include_usage(body, item)
    chunks = item.chunks if item else None

    def event(choice_text: str, finish: str | None) -> bytes:
        data = payload(choice_text, finish)
        if include_usage:
            data["usage"] = None
        return _sse(data)

    pieces = _split_n(text, chunks) if chunks else _split_words(text)
    events = [event(piece, None) for piece in pieces]
    events.append(event("", finish_reason))
    if include_usage:
        events.append(
            _sse(
                {
                    "id": cid,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
            )
        )
    events.append(_SSE_DONE)
    return _Answer(events=events)


def embedding_vector(data: str | list[int], dims: int = DEFAULT_EMBEDDING_DIMS) -> list[float]:
    """Deterministic unit-length vector derived from SHA-256 of the input."""
    seed = data.encode() if isinstance(data, str) else b"tokens:" + orjson.dumps(data)
    raw = bytearray()
    counter = 0
    while len(raw) < dims * 4:
        raw += hashlib.sha256(counter.to_bytes(4, "big") + seed).digest()
        counter += 1
    values = [u / 2147483648.0 - 1.0 for u in struct.unpack(f">{dims}I", bytes(raw[: dims * 4]))]
    norm = sum(v * v for v in values) ** 0.5 or 1.0
    return [v / norm for v in values]


def _embedding_answer(body: Mapping[str, Any], model: str) -> _Answer:
    raw_input = body.get("input")
    inputs: list[str | list[int]]
    bad = _ApiError(400, "'input' must be a string, an array of strings or of tokens", param="input")
    if isinstance(raw_input, str):
        inputs = [raw_input]
    elif isinstance(raw_input, list) and raw_input:
        if all(isinstance(x, int) and not isinstance(x, bool) for x in raw_input):
            inputs = [list(raw_input)]
        elif all(isinstance(x, str) for x in raw_input):
            inputs = list(raw_input)
        elif all(isinstance(x, list) and all(isinstance(t, int) for t in x) for x in raw_input):
            inputs = [list(x) for x in raw_input]
        else:
            raise bad
    else:
        raise bad
    dims = body.get("dimensions")
    if dims is None:
        dims = DEFAULT_EMBEDDING_DIMS
    elif isinstance(dims, bool) or not isinstance(dims, int) or not 1 <= dims <= MAX_EMBEDDING_DIMS:
        raise _ApiError(400, f"'dimensions' must be an integer between 1 and {MAX_EMBEDDING_DIMS}", param="dimensions")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise _ApiError(400, "'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, value in enumerate(inputs):
        tokens += _words(value) if isinstance(value, str) else len(value)
        vector = embedding_vector(value, dims)
        embedding: list[float] | str = (
            base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode() if encoding == "base64" else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = max(1, tokens)
    return _Answer(
        body={
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )
