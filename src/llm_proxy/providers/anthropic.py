"""Anthropic Messages API translator: OpenAI chat requests to /v1/messages and back, including SSE streams."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from typing import Any

import orjson

from ..config import ProviderSettings
from ..errors import BadRequest, ProxyError, UpstreamError
from ..types import Usage
from .base import Endpoint, Target, UpstreamRequest
from .chat_common import (
    ChunkWriter,
    Part,
    choice_json,
    completion_id,
    completion_json,
    content_parts,
    error_frame,
    float_param,
    int_param,
    load_upstream_json,
    merge_turns,
    messages_of,
    response_format_of,
    stop_of,
    text_of,
    token_count,
    tool_call_json,
    tool_calls_of,
    tool_choice_of,
    tools_of,
)
from .credentials import KeySource, header_secrets
from .signing import HeaderKeySigner
from .sse import SSESplitter
from .upstream_errors import upstream_error

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096
_IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic error type -> (OpenAI error type, code). The HTTP status comes from the response.
_ERROR_TYPES: dict[str, tuple[str, str | None]] = {
    "invalid_request_error": ("invalid_request_error", None),
    "not_found_error": ("invalid_request_error", "model_not_found"),
    "request_too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit_error": ("rate_limit_error", "rate_limit_exceeded"),
    "api_error": ("api_error", None),
    "overloaded_error": ("api_error", "overloaded"),
    "timeout_error": ("api_error", "upstream_timeout"),
    "billing_error": ("insufficient_quota", "insufficient_quota"),
}


# OpenAI reasoning_effort -> Anthropic output_config.effort ("none" sends nothing).
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high", "xhigh": "xhigh"}


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def matched_stop(stop_reason: Any, stop_sequence: Any) -> str | None:
    """The stop sequence that ended the answer (the neutral choice's `stop_reason`, as vLLM names it), if any."""
    if stop_reason == "stop_sequence" and isinstance(stop_sequence, str) and stop_sequence:
        return stop_sequence
    return None


def usage_from(data: Any) -> Usage | None:
    """Anthropic usage -> Usage. prompt = input + cache writes + cache reads; cached = cache reads."""
    if not isinstance(data, dict):
        return None
    cached = token_count(data, "cache_read_input_tokens") if data.get("cache_read_input_tokens") is not None else None
    prompt = token_count(data, "input_tokens") + token_count(data, "cache_creation_input_tokens") + (cached or 0)
    completion = token_count(data, "output_tokens")
    return Usage(prompt, completion, prompt + completion, cached)


def _image_block(p: Part, where: str) -> dict[str, Any]:
    if p.url is not None:
        return {"type": "image", "source": {"type": "url", "url": p.url}}
    if p.mime not in _IMAGE_TYPES:
        raise BadRequest(f"{where}: image type '{p.mime}' is not supported by Anthropic", param=where)
    return {"type": "image", "source": {"type": "base64", "media_type": p.mime, "data": p.data}}


def _blocks(parts: list[Part], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.kind == "text":
            out.append({"type": "text", "text": p.text})
        elif p.kind == "image":
            out.append(_image_block(p, where))
        elif p.mime == "application/pdf":
            doc: dict[str, Any] = {
                "type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": p.data},
            }
            if p.filename:
                doc["title"] = p.filename
            out.append(doc)
        elif p.mime == "text/plain" and p.data is not None:
            out.append({"type": "document", "source": {"type": "text", "media_type": "text/plain",
                                                       "data": _b64_text(p.data, where)}})
        else:
            raise BadRequest(f"{where}: file type '{p.mime}' is not supported by Anthropic", param=where)
    return out


def _b64_text(data: str, where: str) -> str:
    try:
        return base64.b64decode(data).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise BadRequest(f"{where}: text file is not valid base64 UTF-8", param=where) from None


def _tool_result_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, list):
        parts = content_parts(content, where)
        if any(p.kind != "text" for p in parts):
            return _blocks(parts, where)
    return text_of(content, where)


def translate_request(
    body: Mapping[str, Any], model: str, default_max_tokens: int, sampling: bool = False
) -> dict[str, Any]:
    """OpenAI chat request -> Messages API body.

    temperature / top_p are only forwarded when `sampling` is set: the current Messages API schema (anthropic SDK
    types) no longer has them and recent models reject them, while OpenAI clients send them routinely."""
    system: list[str] = []
    turns: list[tuple[str, list[Any]]] = []
    for i, m in enumerate(messages_of(body)):
        role, where = m["role"], f"messages[{i}]"
        if role in ("system", "developer"):
            text = text_of(m.get("content"), f"{where}.content")
            if text:
                system.append(text)
        elif role == "user":
            turns.append(("user", _blocks(content_parts(m.get("content"), f"{where}.content"), f"{where}.content")))
        elif role == "assistant":
            blocks = _blocks(content_parts(m.get("content"), f"{where}.content"), f"{where}.content")
            for tc in tool_calls_of(m, where):
                blocks.append({"type": "tool_use", "id": tc.id, "name": tc.name, "input": tc.arguments})
            turns.append(("assistant", blocks))
        elif role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                raise BadRequest(f"{where}.tool_call_id is required", param=f"{where}.tool_call_id")
            block: dict[str, Any] = {"type": "tool_result", "tool_use_id": tid}
            content = _tool_result_content(m.get("content"), f"{where}.content")
            if content:
                block["content"] = content
            turns.append(("user", [block]))
        else:
            raise BadRequest(f"{where}: role '{role}' is not supported", param=f"{where}.role")
    merged = merge_turns(turns)
    for _role, blocks in merged:
        # tool_result blocks must come first in their user turn.
        blocks.sort(key=lambda b: 0 if b.get("type") == "tool_result" else 1)
    out: dict[str, Any] = {
        "model": model,
        "messages": [{"role": r, "content": b} for r, b in merged],
        "max_tokens": int_param(body, "max_completion_tokens", "max_tokens") or default_max_tokens,
    }
    if system:
        out["system"] = "\n\n".join(system)
    stop = stop_of(body)
    if stop:
        out["stop_sequences"] = stop
    if sampling:
        temperature = float_param(body, "temperature", hi=1.0)  # Anthropic's range is 0..1
        if temperature is not None:
            out["temperature"] = temperature
        top_p = float_param(body, "top_p")
        if top_p is not None:
            out["top_p"] = top_p
    n = int_param(body, "n")
    if n is not None and n > 1:
        raise BadRequest("Anthropic models return one choice; 'n' must be 1", param="n")
    tools = tools_of(body)
    if tools:
        out["tools"] = []
        for t in tools:
            schema = t.parameters or {"type": "object", "properties": {}}
            spec: dict[str, Any] = {"name": t.name, "input_schema": schema}
            if t.description:
                spec["description"] = t.description
            out["tools"].append(spec)
    choice = tool_choice_of(body)
    tc_out: dict[str, Any] | None = None
    if choice == "auto":
        tc_out = {"type": "auto"}
    elif choice == "none":
        tc_out = {"type": "none"}
    elif choice == "required":
        tc_out = {"type": "any"}
    elif isinstance(choice, tuple):
        tc_out = {"type": "tool", "name": choice[1]}
    if body.get("parallel_tool_calls") is False and tools and (tc_out is None or tc_out["type"] != "none"):
        tc_out = {**(tc_out or {"type": "auto"}), "disable_parallel_tool_use": True}
    if tc_out is not None and tools:
        out["tool_choice"] = tc_out
    output_config: dict[str, Any] = {}
    rf = response_format_of(body)
    if rf is not None and rf.type == "json_schema" and rf.schema:
        output_config["format"] = {"type": "json_schema", "schema": rf.schema}
    effort = body.get("reasoning_effort")
    if isinstance(effort, str) and effort in _EFFORT:
        output_config["effort"] = _EFFORT[effort]
    if output_config:
        out["output_config"] = output_config
    user = body.get("user")
    if isinstance(user, str) and user:
        out["metadata"] = {"user_id": user}
    return out


def translate_response(data: Any, public_model: str) -> tuple[bytes, Usage | None]:
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise UpstreamError("Anthropic returned an unexpected body", status=502)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in data["content"]:
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif block.get("type") == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            calls.append(tool_call_json(str(block.get("id") or ""), str(block.get("name") or ""), args))
    usage = usage_from(data.get("usage"))
    text = "".join(texts) if texts or not calls else None
    choice = choice_json(0, text, calls, finish_reason(data.get("stop_reason")))
    stop = matched_stop(data.get("stop_reason"), data.get("stop_sequence"))
    if stop is not None:
        choice["stop_reason"] = stop
    return completion_json(completion_id(data.get("id")), public_model, [choice], usage), usage


def error_from_body(
    status: int, headers: Mapping[str, str], raw: bytes, provider_id: str, secrets: list[str | None]
) -> ProxyError:
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    message: Any = None
    atype: Any = None
    if isinstance(err, dict):
        message, atype = err.get("message"), err.get("type")
    if status == 529 or atype == "overloaded_error":
        status = 503
    etype, code = _ERROR_TYPES.get(atype, (None, None)) if isinstance(atype, str) else (None, None)
    return upstream_error(status, headers, message, etype, code, None, provider_id, secrets, raw)


def _parsed(events: list[tuple[bytes | None, bytes]]) -> Iterator[tuple[Any, dict[str, Any], bytes]]:
    """(kind, event, its JSON) of each event that is a JSON object (its `type`, else its SSE event name)."""
    for name, payload in events:
        if not payload:
            continue
        try:
            ev = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        if isinstance(ev, dict):
            yield ev.get("type") or (name.decode() if name else None), ev, payload


class AnthropicStreamDecoder:
    """Anthropic Messages SSE events -> OpenAI chunks."""

    done: bool | None = None  # set by close(): the answer ended (a stop reason, or the upstream's error event)

    def __init__(self, public_model: str, client_wants_usage: bool, secrets: list[str | None] | None = None,
                 provider_id: str = "anthropic") -> None:
        self._secrets = secrets or []
        self._provider_id = provider_id
        self._split = SSESplitter()
        self._w = ChunkWriter(public_model)
        self._want_usage = client_wants_usage
        self._tool_index: dict[int, int] = {}  # content block index -> tool call index
        self._started = False
        self._finished = False
        self._usage_sent = False
        self._stop_reason: str | None = None
        self._stop: str | None = None  # the stop sequence that ended the answer
        self._raw_usage: dict[str, Any] = {}
        self.usage: Usage | None = None
        self.error: ProxyError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        return self._events(self._split.feed(data))

    def close(self) -> list[bytes]:
        out = self._events(self._split.close())
        if self._stop_reason is not None and not self._finished:
            out.append(self._w.finish(finish_reason(self._stop_reason), stop=self._stop))
            self._finished = True
        out.extend(self._usage_frame())
        self.done = self._finished or self.error is not None
        return out

    def _usage_frame(self) -> list[bytes]:
        if self._want_usage and self.usage is not None and self._finished and not self._usage_sent:
            self._usage_sent = True
            return [self._w.usage(self.usage)]
        return []

    def _add_usage(self, data: Any) -> None:
        """Usage fields arrive in message_start and (cumulative) in message_delta; keep the latest of each."""
        if isinstance(data, dict):
            self._raw_usage.update({k: v for k, v in data.items() if v is not None})
            self.usage = usage_from(self._raw_usage)

    def _events(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        for kind, ev, _ in _parsed(events):
            self._event(kind, ev, out)
        return out

    def _event(self, kind: Any, ev: dict[str, Any], out: list[bytes]) -> None:
        w = self._w
        if kind == "message_start":
            msg = ev.get("message") if isinstance(ev.get("message"), dict) else {}
            assert isinstance(msg, dict)
            if isinstance(msg.get("id"), str):
                w.id = completion_id(msg["id"])
            self._add_usage(msg.get("usage"))
            if not self._started:
                self._started = True
                out.append(w.role())
        elif kind == "content_block_start":
            block = ev.get("content_block")
            if isinstance(block, dict) and block.get("type") == "tool_use":
                idx = len(self._tool_index)
                self._tool_index[int(ev.get("index") or 0)] = idx
                out.append(w.tool_start(idx, str(block.get("id") or ""), str(block.get("name") or "")))
                if isinstance(block.get("input"), dict) and block["input"]:
                    out.append(w.tool_args(idx, orjson.dumps(block["input"]).decode()))
            elif isinstance(block, dict) and block.get("type") == "text" and block.get("text"):
                out.append(w.text(str(block["text"])))
        elif kind == "content_block_delta":
            delta = ev.get("delta")
            if not isinstance(delta, dict):
                return
            if delta.get("type") == "text_delta" and delta.get("text"):
                out.append(w.text(str(delta["text"])))
            elif delta.get("type") == "input_json_delta" and delta.get("partial_json"):
                tidx = self._tool_index.get(int(ev.get("index") or 0))
                if tidx is not None:
                    out.append(w.tool_args(tidx, str(delta["partial_json"])))
        elif kind == "message_delta":
            delta = ev.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self._stop_reason = str(delta["stop_reason"])
                self._stop = matched_stop(delta["stop_reason"], delta.get("stop_sequence"))
            self._add_usage(ev.get("usage"))
        elif kind == "message_stop":
            if not self._finished:
                out.append(w.finish(finish_reason(self._stop_reason), stop=self._stop))
                self._finished = True
            out.extend(self._usage_frame())
        elif kind == "error":
            err = ev.get("error") if isinstance(ev.get("error"), dict) else {}
            assert isinstance(err, dict)
            raw_type = err.get("type")
            atype = raw_type if isinstance(raw_type, str) else "api_error"
            etype, code = _ERROR_TYPES.get(atype, ("api_error", None))
            status = {"overloaded_error": 503, "rate_limit_error": 429, "invalid_request_error": 400}.get(atype, 502)
            self.error = upstream_error(status, {}, err.get("message") or "Anthropic stream error", etype, code, None,
                                        self._provider_id, self._secrets)
            out.append(error_frame(self.error))
        # ping and unknown events are ignored


NATIVE_API = "anthropic.messages"  # the client API this provider speaks itself (the Messages ingress's name)


class AnthropicNativeDecoder(AnthropicStreamDecoder):
    """Relays an Anthropic stream to a Messages client as it came, but for `message_start`'s model (the public id)
    and error events (rebuilt from the scrubbed error); the translating decoder's state gives the usage, the end
    (`message_stop`) and the error."""

    def __init__(self, public_model: str, secrets: list[str | None], provider_id: str) -> None:
        super().__init__(public_model, True, secrets, provider_id)
        self._public = public_model

    def feed(self, data: bytes) -> list[bytes]:
        return self._relay(self._split.feed(data))

    def close(self) -> list[bytes]:
        out = self._relay(self._split.close())
        self.done = self._finished or self.error is not None
        return out

    def _relay(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        ignored: list[bytes] = []
        for kind, ev, payload in _parsed(events):
            if not isinstance(kind, str):
                continue
            self._event(kind, ev, ignored)
            ignored.clear()
            if kind == "error" and self.error is not None:
                err = ev.get("error") if isinstance(ev.get("error"), dict) else {}
                atype = err.get("type") if isinstance(err, dict) else None
                payload = orjson.dumps({"type": "error", "error": {
                    "type": atype if isinstance(atype, str) and atype in _ERROR_TYPES else "api_error",
                    "message": self.error.message}})
            elif kind == "message_start" and isinstance(ev.get("message"), dict):
                ev["message"]["model"] = self._public
                payload = orjson.dumps(ev)
            out.append(b"event: " + kind.encode() + b"\ndata: " + payload + b"\n\n")
        if self._finished or self.error is not None:
            self.done = True  # message_stop (or an error event): the gateway reads no further
        return out


class AnthropicProvider:
    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.id = settings.id
        self.type = settings.type
        self.base_url = (settings.base_url or "https://api.anthropic.com").rstrip("/")
        self.default_max_tokens = settings.default_max_tokens or DEFAULT_MAX_TOKENS
        # Opt-in for models that still take temperature/top_p (extra setting `sampling_params: true`).
        self.sampling = settings.sampling_params
        self.signer = HeaderKeySigner("x-api-key", KeySource(settings.api_key, settings.api_key_file),
                                      ("ANTHROPIC_API_KEY",))
        self._header_secrets = header_secrets(settings.headers)
        self.native = settings.native_client_api is not False  # /v1/messages forwarded as it came
        self._headers = {
            "content-type": "application/json",
            "anthropic-version": settings.api_version or ANTHROPIC_VERSION,
            **settings.headers,
        }

    def missing_credentials(self) -> list[str]:
        return self.signer.missing()

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        if endpoint != "chat.completions":
            raise BadRequest(f"endpoint {endpoint} is not supported by provider type anthropic")
        payload = translate_request(body, target.upstream_model, self.default_max_tokens, self.sampling)
        if stream:
            payload["stream"] = True
        headers = dict(self._headers)
        if stream:
            headers["accept"] = "text/event-stream"
        url = self.base_url + ("/messages" if self.base_url.endswith("/v1") else "/v1/messages")
        return UpstreamRequest("POST", url, headers, orjson.dumps(payload), stream)

    async def sign(self, request: UpstreamRequest) -> None:
        self.signer.apply(request)

    def parse_response(self, endpoint: Endpoint, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        data = load_upstream_json(raw, self.id)
        return translate_response(data, target.public_model)

    def native_request(self, api: str, body: dict[str, Any], target: Target, stream: bool) -> UpstreamRequest | None:
        """A Messages request as the client sent it, for the upstream model (providers/base.py NativeProvider)."""
        if api != NATIVE_API or not self.native:
            return None
        headers = dict(self._headers)
        if stream:
            headers["accept"] = "text/event-stream"
        url = self.base_url + ("/messages" if self.base_url.endswith("/v1") else "/v1/messages")
        return UpstreamRequest("POST", url, headers, orjson.dumps({**body, "model": target.upstream_model}), stream)

    def parse_native(self, api: str, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        data = load_upstream_json(raw, self.id)
        if not isinstance(data, dict) or data.get("type") != "message":
            raise UpstreamError("Anthropic returned an unexpected body", status=502)
        data["model"] = target.public_model
        return orjson.dumps(data), usage_from(data.get("usage"))

    def native_decoder(self, api: str, target: Target) -> AnthropicNativeDecoder:
        return AnthropicNativeDecoder(target.public_model, self.secrets(), self.id)

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> AnthropicStreamDecoder:
        return AnthropicStreamDecoder(target.public_model, client_wants_usage, self.secrets(), self.id)

    def secrets(self) -> list[str | None]:
        return [*self.signer.secrets(), *self._header_secrets]

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        return error_from_body(status, headers, raw, self.id, self.secrets())


def create(settings: ProviderSettings) -> AnthropicProvider:
    return AnthropicProvider(settings)
