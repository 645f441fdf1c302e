"""Anthropic's Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) over the neutral chat form.

- `to_chat(body)`: a Messages request -> a neutral chat/completions body (a new dict; the request is never
  mutated): `system`, content blocks (text, image, document, tool_use, tool_result), tools, `tool_choice`,
  `max_tokens` (required, as Anthropic requires it), `stop_sequences`, `temperature`, `top_p`, `stream`.
- `render(req, raw)`: a neutral `chat.completion` -> an Anthropic `message`.
- `MessagesFramer`: neutral `chat.completion.chunk` frames -> Anthropic's events (`message_start`,
  `content_block_start` / `_delta` (`text_delta`, `input_json_delta`) / `_stop`, `message_delta` with the stop
  reason and usage, `message_stop`).
- `error_body(exc)`: `{"type": "error", "error": {"type", "message"}}` with Anthropic's type for the status.
- `count_request(body)`: the neutral body whose prompt `count_tokens` counts (the counting itself is the
  core's estimator: the exchange runs it), and `count_json(n)`.

Pure: no I/O. What the neutral form cannot carry is refused with a 400 rather than dropped where it changes the
answer (server tools such as web search, documents other than PDF / plain text); what only tunes the
upstream (`top_k`, `thinking`, cache_control) is left out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadRequest, ProxyError
from .neutral import (
    ChunkFramer,
    image_part,
    new_id,
    obj,
    read_reply,
    require_object,
    require_str,
    sse_event,
    string,
    token_counts,
)
from .schema import MAX_STOP, MAX_TOKENS

NAME = "anthropic.messages"
PATHS: tuple[str, ...] = ("/v1/messages",)
COUNT_PATHS: tuple[str, ...] = ("/v1/messages/count_tokens",)

STOP_REASONS: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


@dataclass(frozen=True, slots=True)
class MessagesRequest:
    id: str
    model: str
    stop_sequences: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------


def _system(system: Any) -> str:
    if isinstance(system, str):
        return system
    if not isinstance(system, list):
        raise BadRequest("'system' must be a string or an array of text blocks", param="system")
    texts = []
    for j, b in enumerate(system):
        if not isinstance(b, dict) or b.get("type") != "text":
            raise BadRequest(f"system[{j}]: only text blocks are allowed in 'system'", param=f"system[{j}]")
        texts.append(require_str(b.get("text"), f"system[{j}].text", empty=True))
    return "\n\n".join(texts)


def _source(block: dict[str, Any], at: str) -> tuple[str, str | None]:
    """(kind, value) of an image / document source: ("url", url) or ("base64", data URL) or ("text", text)."""
    src = require_object(block.get("source"), f"{at}.source")
    kind = src.get("type")
    if kind == "base64":
        mime = require_str(src.get("media_type"), f"{at}.source.media_type")
        data = require_str(src.get("data"), f"{at}.source.data")
        return "base64", f"data:{mime};base64,{data}"
    if kind == "url":
        return "url", require_str(src.get("url"), f"{at}.source.url")
    if kind == "text":
        return "text", require_str(src.get("data"), f"{at}.source.data", empty=True)
    raise BadRequest(f"{at}.source: source type '{kind}' is not supported", param=f"{at}.source.type")


def _part(block: dict[str, Any], at: str) -> dict[str, Any] | None:
    """A user content block (other than tool_result) -> a neutral content part; None for what is left out."""
    kind = block.get("type")
    if kind == "text":
        return {"type": "text", "text": require_str(block.get("text"), f"{at}.text", empty=True)}
    if kind == "image":
        _, url = _source(block, at)
        return image_part(url, None, at)
    if kind == "document":
        src_kind, value = _source(block, at)
        if src_kind == "text":
            return {"type": "text", "text": value or ""}
        if src_kind == "base64":
            file: dict[str, Any] = {"file_data": value}
            if isinstance(block.get("title"), str):
                file["filename"] = block["title"]
            return {"type": "file", "file": file}
        raise BadRequest(f"{at}: documents by URL are not supported; send them as base64", param=f"{at}.source")
    if kind in ("thinking", "redacted_thinking"):
        return None  # signed by the model that wrote it: nothing another upstream can take
    raise BadRequest(f"{at}: content block type '{kind}' is not supported", param=f"{at}.type")


def _tool_result(block: dict[str, Any], at: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A tool_result block -> (the neutral tool message, image parts it held: they follow as a user message,
    since a chat tool message holds text only)."""
    content = block.get("content")
    texts: list[str] = []
    images: list[dict[str, Any]] = []
    if isinstance(content, str):
        texts.append(content)
    elif isinstance(content, list):
        for k, b in enumerate(content):
            part = _part(require_object(b, f"{at}.content[{k}]"), f"{at}.content[{k}]")
            if part is None:
                continue
            if part["type"] == "text":
                texts.append(part["text"])
            else:
                images.append(part)
    elif content is not None:
        raise BadRequest(f"{at}.content must be a string or an array of blocks", param=f"{at}.content")
    text = "\n".join(texts)
    if block.get("is_error") is True:
        text = f"Error: {text}" if text else "Error"
    msg = {"role": "tool", "tool_call_id": require_str(block.get("tool_use_id"), f"{at}.tool_use_id"),
           "content": text}
    return msg, images


def _messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        m = require_object(m, at)
        role = m.get("role")
        content = m.get("content")
        if role not in ("user", "assistant"):
            raise BadRequest(f"{at}.role must be 'user' or 'assistant'", param=f"{at}.role")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise BadRequest(f"{at}.content must be a string or an array of content blocks", param=f"{at}.content")
        if role == "assistant":
            texts: list[str] = []
            calls: list[dict[str, Any]] = []
            for j, b in enumerate(content):
                bat = f"{at}.content[{j}]"
                b = require_object(b, bat)
                if b.get("type") == "text":
                    texts.append(require_str(b.get("text"), f"{bat}.text", empty=True))
                elif b.get("type") == "tool_use":
                    args = b.get("input")
                    calls.append({
                        "id": require_str(b.get("id"), f"{bat}.id"),
                        "type": "function",
                        "function": {"name": require_str(b.get("name"), f"{bat}.name"),
                                     "arguments": orjson.dumps(args if args is not None else {}).decode()},
                    })
                elif b.get("type") in ("thinking", "redacted_thinking"):
                    continue
                else:
                    raise BadRequest(f"{bat}: content block type '{b.get('type')}' is not supported in an assistant "
                                     "turn", param=f"{bat}.type")
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts else None}
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        # A user turn: its tool results first (a chat tool message must follow the assistant's calls), then the
        # rest of it, with any images the results held, as one user message.
        parts: list[dict[str, Any]] = []
        for j, b in enumerate(content):
            bat = f"{at}.content[{j}]"
            b = require_object(b, bat)
            if b.get("type") == "tool_result":
                tool_msg, images = _tool_result(b, bat)
                out.append(tool_msg)
                parts.extend(images)
            else:
                part = _part(b, bat)
                if part is not None:
                    parts.append(part)
        if len(parts) == 1 and parts[0]["type"] == "text":
            out.append({"role": "user", "content": parts[0]["text"]})  # what every chat server takes
        elif parts:
            out.append({"role": "user", "content": parts})
    return out


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    out = []
    for i, t in enumerate(tools):
        at = f"tools[{i}]"
        t = require_object(t, at)
        kind = t.get("type")
        if kind not in (None, "custom"):
            raise BadRequest(f"{at}: the server tool '{kind}' is not supported here; only client tools (with an "
                             "input_schema) are", param=f"{at}.type")
        fn: dict[str, Any] = {"name": require_str(t.get("name"), f"{at}.name"),
                              "parameters": require_object(t.get("input_schema"), f"{at}.input_schema")}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(out: dict[str, Any], tc: Any) -> None:
    tc = require_object(tc, "tool_choice")
    kind = tc.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": require_str(tc.get("name"), "tool_choice.name")}}
    else:
        raise BadRequest(f"'tool_choice.type' {kind!r} is not one of 'auto', 'any', 'tool', 'none'",
                         param="tool_choice.type")
    if tc.get("disable_parallel_tool_use") is True and kind != "none":
        out["parallel_tool_calls"] = False


def _number(body: Mapping[str, Any], name: str, hi: float) -> float | int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= hi:
        raise BadRequest(f"'{name}' must be a number between 0 and {hi:g}", param=name)
    return v


def _prompt(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a request that make up its prompt: model, system, messages, tools, tool_choice."""
    model = require_str(body.get("model"), "model")
    messages = _messages(body)
    if body.get("system") is not None:
        system = _system(body["system"])
        if system:
            messages.insert(0, {"role": "system", "content": system})
    out: dict[str, Any] = {"model": model, "messages": messages}
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    if body.get("tool_choice") is not None and tools:
        _tool_choice(out, body["tool_choice"])
    return out


def to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Messages request -> the neutral chat body."""
    out = _prompt(body)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        raise BadRequest("max_tokens: Field required", param="max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(f"'max_tokens' must be an integer between 1 and {MAX_TOKENS}", param="max_tokens")
    out["max_completion_tokens"] = max_tokens
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise BadRequest("'stop_sequences' must be an array of strings", param="stop_sequences")
        if len(stop) > MAX_STOP:
            # The neutral chat form every provider is reached through takes OpenAI's 4 (as /v1/chat/completions
            # does); dropping some would end the answer elsewhere than asked.
            raise BadRequest(f"'stop_sequences': at most {MAX_STOP} are supported here, got {len(stop)}",
                             param="stop_sequences")
        if stop:
            out["stop"] = list(stop)
    for name, hi in (("temperature", 1), ("top_p", 1)):
        v = _number(body, name, hi)
        if v is not None:
            out[name] = v
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str) and metadata["user_id"]:
        out["user"] = metadata["user_id"]
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # message_delta carries the usage
    return out


def parse(body: Mapping[str, Any]) -> tuple[dict[str, Any], MessagesRequest]:
    chat = to_chat(body)
    return chat, MessagesRequest(new_id("msg_"), chat["model"], tuple(chat.get("stop", ())))


def count_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """The neutral body whose prompt `count_tokens` counts (max_tokens is not needed there)."""
    return _prompt(body)


def count_json(input_tokens: int) -> bytes:
    return orjson.dumps({"input_tokens": input_tokens})


# --------------------------------------------------------------------------------------------------
# Reply
# --------------------------------------------------------------------------------------------------


def stop_reason(finish: str | None) -> str:
    return STOP_REASONS.get(finish or "stop", "end_turn")


def stopped(req: MessagesRequest, finish: str | None, stop: str | None) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence): `stop_sequence` and the sequence when one of the request's ended the answer
    and the upstream said which (neutral.stop_string); otherwise the finish reason's, and None."""
    if stop is not None and (finish or "stop") == "stop" and stop in req.stop_sequences:
        return "stop_sequence", stop
    return stop_reason(finish), None


def usage_json(usage: dict[str, Any] | None) -> dict[str, Any]:
    """OpenAI usage -> Anthropic's: input_tokens excludes the tokens read from the cache (OpenAI's prompt_tokens
    includes them), which are cache_read_input_tokens."""
    prompt, completion, cached, _ = token_counts(usage)
    out: dict[str, Any] = {"input_tokens": prompt - (cached or 0), "output_tokens": completion}
    if cached is not None:
        out["cache_read_input_tokens"] = cached
    return out


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's arguments (a JSON string) as the object tool_use.input must be."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise ProxyError("The model's tool call arguments are not valid JSON", status=502, type="api_error",
                         code="bad_upstream_response") from None
    return value if isinstance(value, dict) else {"value": value}


def render_message(req: MessagesRequest, raw: bytes) -> dict[str, Any]:
    reply = read_reply(raw)
    content: list[dict[str, Any]] = []
    text = reply.text or reply.refusal
    if text:
        content.append({"type": "text", "text": text})
    for tc in reply.tool_calls:
        content.append({"type": "tool_use", "id": tc["id"], "name": tc["name"], "input": tool_input(tc["arguments"])})
    reason, sequence = stopped(req, reply.finish_reason, reply.stop)
    return {
        "id": req.id,
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage_json(reply.usage),
    }


def render(req: MessagesRequest, raw: bytes) -> bytes:
    return orjson.dumps(render_message(req, raw))


# Our status -> Anthropic's error type (https://docs.anthropic.com/en/api/errors).
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 402: "billing_error",
                403: "permission_error", 404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                504: "timeout_error", 529: "overloaded_error"}


def error_type(exc: ProxyError) -> str:
    if exc.code == "overloaded":
        return "overloaded_error"
    if exc.type == "insufficient_quota":
        return "billing_error"
    known = _ERROR_TYPES.get(exc.status)
    if known is not None:
        return known
    return "invalid_request_error" if 400 <= exc.status < 500 else "api_error"


def error_json(exc: ProxyError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(exc), "message": exc.message}}


def error_body(exc: ProxyError) -> bytes:
    return orjson.dumps(error_json(exc))


# --------------------------------------------------------------------------------------------------
# Stream
# --------------------------------------------------------------------------------------------------


class MessagesFramer(ChunkFramer):
    """Neutral chat.completion.chunk frames -> Anthropic stream events.

    Content blocks are sequential, as Anthropic sends them: text, then each tool call; a new block stops the
    one before. `message_delta` (stop reason and usage) waits for the usage chunk that follows the finish reason
    (the ingress asks for it), or for `end()`."""

    def __init__(self, req: MessagesRequest) -> None:
        super().__init__()
        self.req = req
        self._index = -1  # the open block's index (-1: none open)
        self._open: str | None = None  # "text" | "tool_use"
        self._calls: dict[int, int] = {}  # tool-call index -> block index

    def _begin(self, out: list[bytes]) -> None:
        message: dict[str, Any] = {
            "id": self.req.id, "type": "message", "role": "assistant", "model": self.req.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(sse_event("message_start", {"type": "message_start", "message": message}))

    def _stop_block(self, out: list[bytes]) -> None:
        if self._open is not None:
            out.append(sse_event("content_block_stop", {"type": "content_block_stop", "index": self._index}))
            self._open = None

    def _block(self, block: dict[str, Any], out: list[bytes]) -> int:
        self._stop_block(out)
        self._index += 1
        self._open = block["type"]
        out.append(sse_event("content_block_start",
                             {"type": "content_block_start", "index": self._index, "content_block": block}))
        return self._index

    def _delta(self, index: int, delta: dict[str, Any], out: list[bytes]) -> None:
        out.append(sse_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))

    def _text(self, text: str, out: list[bytes]) -> None:
        if self._open != "text":
            self._block({"type": "text", "text": ""}, out)
        self._delta(self._index, {"type": "text_delta", "text": text}, out)

    def _finished(self, out: list[bytes]) -> None:
        self._stop_block(out)

    def _tool(self, tc: dict[str, Any], out: list[bytes]) -> None:
        key = tc.get("index", len(self._calls))
        fn = obj(tc.get("function"))
        index = self._calls.get(key)
        if index is None:
            call_id = string(tc.get("id")) or new_id("toolu_")
            name = string(fn.get("name"))
            index = self._calls[key] = self._block(
                {"type": "tool_use", "id": call_id, "name": name, "input": {}}, out)
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            self._delta(index, {"type": "input_json_delta", "partial_json": args}, out)

    def _last(self, out: list[bytes]) -> None:
        self._stop_block(out)
        reason, sequence = stopped(self.req, self._finish, self._stop)
        out.append(sse_event("message_delta", {
            "type": "message_delta",
            "delta": {"stop_reason": reason, "stop_sequence": sequence},
            "usage": usage_json(self._usage),
        }))
        out.append(sse_event("message_stop", {"type": "message_stop"}))

    def error(self, exc: ProxyError) -> bytes:
        """An error after the stream began: Anthropic's `error` event (the SDK raises it)."""
        if self._ended:
            return b""
        self._ended = True
        return error_event(exc)


def error_event(exc: ProxyError) -> bytes:
    """Anthropic's in-band `error` event."""
    return sse_event("error", error_json(exc))


# --------------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------------


class _WithBearer(Mapping[str, str]):
    """Request headers with `x-api-key` offered as `Authorization: Bearer` (what the authenticator reads)."""

    __slots__ = ("_auth", "_headers")

    def __init__(self, headers: Mapping[str, str], key: str) -> None:
        self._headers = headers
        self._auth = "Bearer " + key

    def __getitem__(self, name: str) -> str:
        if name.lower() == "authorization":
            return self._auth
        return self._headers[name]

    def __iter__(self) -> Any:
        yield "Authorization"
        yield from (k for k in self._headers if k.lower() != "authorization")

    def __len__(self) -> int:
        return len(list(iter(self)))


def credentials(headers: Mapping[str, str]) -> Mapping[str, str]:
    """The anthropic SDK sends its key as `x-api-key`; `Authorization: Bearer` (its `auth_token`) also works.
    Either goes through the configured authenticator; when both come, `Authorization` is the one used."""
    if headers.get("Authorization") or headers.get("authorization"):
        return headers
    key = headers.get("x-api-key") or headers.get("X-Api-Key")
    return _WithBearer(headers, key.strip()) if key and key.strip() else headers
