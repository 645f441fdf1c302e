"""Scriptable OpenAI-compatible fake upstream LLM server for tests, benchmarks and CI."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import re
import signal
import struct
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

__all__ = [
    "DEFAULT_MODELS",
    "EmulatorServer",
    "EmulatorState",
    "ScriptError",
    "ScriptItem",
    "ScriptToolCall",
    "create_app",
    "main",
    "start_emulator",
]

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")
DEFAULT_EMBEDDING_DIMS = 8
MAX_EMBEDDING_DIMS = 65536
MAX_RECORDED_REQUESTS = 1000
MODEL_CREATED = 1_700_000_000
CLIENT_MAX_SIZE = 128 * 1024 * 1024
_POLL_INTERVAL = 0.05
_ARGUMENT_PIECE_CHARS = 8

_ITEM_KEYS = frozenset(
    {
        "content",
        "tool_calls",
        "finish_reason",
        "usage",
        "error",
        "delay_ms",
        "chunk_delay_ms",
        "chunks",
        "hang",
        "disconnect_after_chunks",
        "truncate_body",
        "model",
        "no_usage",
    }
)
_ERROR_KEYS = frozenset({"status", "message", "type", "code", "param", "headers"})
_TOOL_CALL_KEYS = frozenset({"name", "arguments", "id"})
_DEFAULT_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}
_WORD_RE = re.compile(r"\s*\S+")

Kind = Literal["chat", "completion", "embedding"]


# --------------------------------------------------------------------------------------------------
# Script items
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ScriptToolCall:
    """One scripted tool call; `arguments` is already a JSON string."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(slots=True, frozen=True)
class ScriptError:
    """A scripted error answer: HTTP status plus the OpenAI error envelope fields."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ScriptItem:
    """One scripted answer. `content=None` without tool calls means "use the default echo reply"."""

    content: str | None = None
    tool_calls: tuple[ScriptToolCall, ...] = ()
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: ScriptError | None = None
    delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    chunks: int | None = None
    hang: bool = False
    disconnect_after_chunks: int | None = None
    truncate_body: bool = False
    model: str | None = None
    # Like llama.cpp and other servers without `stream_options`: no usage object, streamed or not.
    no_usage: bool = False

    @property
    def has_reply(self) -> bool:
        return self.content is not None or bool(self.tool_calls)


def _fail(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _opt_str(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise _fail(where, f"'{key}' must be a string")
    return value


def _opt_number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _fail(where, f"'{key}' must be a non-negative number")
    return float(value)


def _opt_int(raw: Mapping[str, Any], key: str, where: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"'{key}' must be an integer >= {minimum}")
    return value


def _opt_bool(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(where, f"'{key}' must be a boolean")
    return value


def _parse_error(raw: Any, where: str) -> ScriptError:
    if not isinstance(raw, Mapping):
        raise _fail(where, "'error' must be an object")
    unknown = set(raw) - _ERROR_KEYS
    if unknown:
        raise _fail(where, f"unknown error keys {sorted(unknown)}; allowed: {sorted(_ERROR_KEYS)}")
    status = raw.get("status", 500)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise _fail(where, "'error.status' must be an integer between 400 and 599")
    headers_raw = raw.get("headers") or {}
    if not isinstance(headers_raw, Mapping):
        raise _fail(where, "'error.headers' must be an object")
    err_type = _opt_str(raw, "type", where)
    if err_type is None:
        err_type = _DEFAULT_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = _opt_str(raw, "message", where)
    return ScriptError(
        status=status,
        message=message if message is not None else f"Emulated error (HTTP {status})",
        type=err_type,
        code=_opt_str(raw, "code", where),
        param=_opt_str(raw, "param", where),
        headers={str(k): str(v) for k, v in headers_raw.items()},
    )


def _parse_tool_calls(raw: Any, where: str) -> tuple[ScriptToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, "'tool_calls' must be a list")
    calls: list[ScriptToolCall] = []
    for i, call in enumerate(raw):
        cwhere = f"{where}.tool_calls[{i}]"
        if not isinstance(call, Mapping):
            raise _fail(cwhere, "must be an object")
        unknown = set(call) - _TOOL_CALL_KEYS
        if unknown:
            raise _fail(cwhere, f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOOL_CALL_KEYS)}")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(cwhere, "'name' must be a non-empty string")
        arguments = call.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        calls.append(ScriptToolCall(name=name, arguments=arguments, id=_opt_str(call, "id", cwhere)))
    return tuple(calls)


def parse_item(raw: Any, where: str = "item") -> ScriptItem:
    """Validate one `responses` entry (a string or an object) and return it as a ScriptItem."""
    if isinstance(raw, ScriptItem):
        return raw
    if isinstance(raw, str):
        return ScriptItem(content=raw)
    if not isinstance(raw, Mapping):
        raise _fail(where, "must be a string or an object")
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise _fail(where, f"unknown keys {sorted(unknown)}; allowed: {sorted(_ITEM_KEYS)}")
    usage = raw.get("usage")
    if usage is not None and not isinstance(usage, Mapping):
        raise _fail(where, "'usage' must be an object")
    error = raw.get("error")
    return ScriptItem(
        content=_opt_str(raw, "content", where),
        tool_calls=_parse_tool_calls(raw.get("tool_calls"), where),
        finish_reason=_opt_str(raw, "finish_reason", where),
        usage=dict(usage) if usage is not None else None,
        error=_parse_error(error, where) if error is not None else None,
        delay_ms=_opt_number(raw, "delay_ms", where),
        chunk_delay_ms=_opt_number(raw, "chunk_delay_ms", where),
        chunks=_opt_int(raw, "chunks", where, 1),
        hang=_opt_bool(raw, "hang", where),
        disconnect_after_chunks=_opt_int(raw, "disconnect_after_chunks", where, 0),
        truncate_body=_opt_bool(raw, "truncate_body", where),
        no_usage=_opt_bool(raw, "no_usage", where),
        model=_opt_str(raw, "model", where),
    )


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


class EmulatorState:
    """Scripted answers, recorded requests and counters of one emulator app."""

    def __init__(self, models: Iterable[str] = DEFAULT_MODELS) -> None:
        self.models: list[str] = list(models)
        self.queue: deque[ScriptItem] = deque()
        self.model_queues: dict[str, deque[ScriptItem]] = {}
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0
        self.in_flight = 0
        self.closing = False
        self._waiters: list[asyncio.Future[None]] = []

    # -- scripting -----------------------------------------------------------------------------

    def script(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a script body `{"reset", "models", "responses"}`; raises ValueError when invalid.

        Validation happens before anything changes, so an invalid script leaves the state intact.
        """
        if not isinstance(spec, Mapping):
            raise ValueError("script body must be an object")
        reset = spec.get("reset", False)
        if not isinstance(reset, bool):
            raise ValueError("'reset' must be a boolean")
        models = spec.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
            raise ValueError("'models' must be a list of non-empty strings")
        responses = spec.get("responses") or []
        if not isinstance(responses, list):
            raise ValueError("'responses' must be a list")
        items = [parse_item(raw, f"responses[{i}]") for i, raw in enumerate(responses)]
        if reset:
            self.clear()
        if models is not None:
            self.models = list(dict.fromkeys(models))
        self.push(*items)
        return {"status": "ok", "queued": self.queued, "models": list(self.models)}

    def push(self, *items: ScriptItem | str | Mapping[str, Any]) -> None:
        """Append answers to the global queue, or to a per-model queue for items that name a model."""
        for raw in items:
            item = parse_item(raw)
            if item.model is None:
                self.queue.append(item)
            else:
                self.model_queues.setdefault(item.model, deque()).append(item)

    def clear(self) -> None:
        """Forget queued answers and recorded requests (what `"reset": true` does)."""
        self.queue.clear()
        self.model_queues.clear()
        self.requests.clear()

    def reset(self) -> None:
        """Back to the initial state: default models, nothing queued or recorded, counters at zero."""
        self.clear()
        self.models = list(DEFAULT_MODELS)
        self.cancelled = 0

    @property
    def queued(self) -> int:
        return len(self.queue) + sum(len(q) for q in self.model_queues.values())

    def next_item(self, model: str, *, for_embeddings: bool = False) -> ScriptItem | None:
        """Pop the answer for a request to `model`: its per-model queue first, then the global one.

        For embeddings, a global item that carries a reply (content or tool calls) is left in the
        queue for the chat/completions request it was meant for; only fault items (error, hang,
        delay, truncate_body...) are taken.
        """
        per_model = self.model_queues.get(model)
        if per_model:
            return per_model.popleft()
        if self.queue and (not for_embeddings or not self.queue[0].has_reply):
            return self.queue.popleft()
        return None

    def unpop(self, item: ScriptItem) -> None:
        """Put back an item taken by `next_item` (at the front of the queue it came from)."""
        if item.model is None:
            self.queue.appendleft(item)
        else:
            self.model_queues.setdefault(item.model, deque()).appendleft(item)

    # -- recording -----------------------------------------------------------------------------

    def record(self, request: web.Request, body: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "json": body,
            }
        )
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[: len(self.requests) - MAX_RECORDED_REQUESTS]
        self.notify()

    def notify(self) -> None:
        """Wake up `wait_until` callers; called whenever requests or counters change."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        """Wait (without polling) until `predicate()` is true, re-checked after each state change.

        For in-process tests, e.g. `await server.state.wait_until(lambda: server.state.cancelled == 1)`.
        Raises TimeoutError after `seconds`.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(seconds):
            while not predicate():
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                await waiter

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "requests": len(self.requests),
            "queued": self.queued,
            "models": list(self.models),
        }


STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("llm_proxy_emulator_state", EmulatorState)


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


class _ClientGone(Exception):
    """The client closed the connection while we were waiting."""


class _ServerClosing(Exception):
    """The emulator is shutting down while a request was waiting."""


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


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None


def _request_model(state: EmulatorState, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter", param="model")
    if model not in state.models:
        raise _ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return model


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait(state: EmulatorState, request: web.Request, seconds: float | None) -> None:
    """Sleep `seconds` (None: forever) while watching for a client disconnect or server shutdown."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while True:
        if state.closing:
            raise _ServerClosing
        if _client_gone(request):
            raise _ClientGone
        if deadline is None:
            await asyncio.sleep(_POLL_INTERVAL)
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, _POLL_INTERVAL))


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


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


# --------------------------------------------------------------------------------------------------
# Completion endpoints
# --------------------------------------------------------------------------------------------------


async def _send(
    request: web.Request, state: EmulatorState, item: ScriptItem | None, answer: _Answer
) -> web.StreamResponse:
    headers = {"x-request-id": _new_id("req_")}
    if answer.events is None:
        payload = orjson.dumps(answer.body)
        if item is not None and item.truncate_body:
            resp = web.StreamResponse(headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload) + max(16, len(payload))
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            _abort(request)
            return resp
        return web.Response(body=payload, content_type="application/json", headers=headers)

    events = answer.events
    cut: int | None = None
    if item is not None:
        if item.disconnect_after_chunks is not None:
            cut = item.disconnect_after_chunks
        elif item.truncate_body:
            cut = len(events) // 2
    chunk_delay = item.chunk_delay_ms / 1000.0 if item is not None else 0.0
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for n, event in enumerate(events):
        if cut is not None and n >= cut:
            _abort(request)
            return resp
        if chunk_delay and n:
            await _wait(state, request, chunk_delay)
        await resp.write(event)
    return resp


async def _completion(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.in_flight += 1
    state.notify()
    try:
        try:
            body = await _read_json(request)
        except _ApiError:
            state.record(request, None)
            raise
        state.record(request, body)
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = _request_model(state, body)
        item = state.next_item(model, for_embeddings=kind == "embedding")
        answer: _Answer | None = None
        if item is None or item.error is None:
            try:
                if kind == "chat":
                    answer = _chat_answer(body, model, item)
                elif kind == "completion":
                    answer = _completion_answer(body, model, item)
                else:
                    answer = _embedding_answer(body, model)
            except _ApiError:
                if item is not None:  # an invalid request does not use up the scripted answer
                    state.unpop(item)
                raise
        if item is not None:
            if item.hang:
                await _wait(state, request, None)
            if item.delay_ms:
                await _wait(state, request, item.delay_ms / 1000.0)
            if item.error is not None:
                err = item.error
                return _error_response(err.status, err.message, err.type, err.code, err.param, err.headers)
        assert answer is not None
        return await _send(request, state, item, answer)
    except _ApiError as exc:
        return exc.response()
    except (_ClientGone, ConnectionResetError):
        state.cancelled += 1
        return web.Response(status=499)
    except _ServerClosing:
        _abort(request)
        return web.Response(status=503)
    except asyncio.CancelledError:
        if not state.closing:
            state.cancelled += 1
        raise
    finally:
        state.in_flight -= 1
        state.notify()


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "completion")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "embedding")


# --------------------------------------------------------------------------------------------------
# Other routes
# --------------------------------------------------------------------------------------------------


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "emulator"}


async def _list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.record(request, None)
    return _json_response({"object": "list", "data": [_model_object(m) for m in state.models]})


async def _get_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.record(request, None)
    model = request.match_info["model"]
    if model not in state.models:
        return _error_response(
            404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
        )
    return _json_response(_model_object(model))


async def _health(request: web.Request) -> web.StreamResponse:
    return _json_response({"status": "ok"})


async def _script(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        body = await _read_json(request)
        return _json_response(state.script(body))
    except _ApiError as exc:
        return exc.response()
    except ValueError as exc:
        return _error_response(400, str(exc))


async def _requests(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[STATE_KEY].requests)


async def _reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.reset()
    return _json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[STATE_KEY].stats())


def _auth_middleware(api_key: str) -> Middleware:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error_response(
                401,
                "Incorrect API key provided." if given else "You didn't provide an API key.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return auth


@web.middleware
async def _http_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text routing errors (404, 405, 413...) into OpenAI error envelopes."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        code = "not_found" if exc.status == 404 else None
        return _error_response(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code, headers=headers)


def create_app(api_key: str | None = None) -> web.Application:
    """Build the emulator aiohttp application; its state is `app[STATE_KEY]`."""
    middlewares: list[Middleware] = [_http_errors_middleware]
    if api_key:
        middlewares.append(_auth_middleware(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    app[STATE_KEY] = EmulatorState()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model:.+}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/_emulator/script", _script)
    app.router.add_get("/_emulator/requests", _requests)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_get("/_emulator/stats", _stats)
    return app


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class EmulatorServer:
    """A running emulator: `.port`, `.base_url` (ends in /v1), `.state`, `await .close()`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, state: EmulatorState) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.state = state

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT (the /_emulator/* routes live here)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.url}/v1"

    async def close(self) -> None:
        self.state.closing = True
        await self._runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_emulator(host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> EmulatorServer:
    """Start the emulator in the running loop (port 0: any free port) and return the running server."""
    app = create_app(api_key)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound_port = int(address[1])
            break
    return EmulatorServer(runner, host, bound_port, app[STATE_KEY])


async def _serve(host: str, port: int, api_key: str | None) -> None:
    server = await start_emulator(host, port, api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    auth = "on" if api_key else "off"
    print(f"llm-proxy emulator listening on {server.base_url} (auth {auth})", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(host: str, port: int, api_key: str | None) -> None:
    """Run the emulator until interrupted (Ctrl-C or SIGTERM)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, api_key))
