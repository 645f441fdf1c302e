"""Shared helpers for non-OpenAI translators: reading OpenAI chat requests, writing OpenAI responses and chunks."""

from __future__ import annotations

import base64
import re
import struct
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadRequest, ProxyError, UpstreamError
from ..types import Usage
from .sse import frame

# Tool-call ids the proxy invents (upstreams that return none, e.g. Gemini) start with this prefix.
GENERATED_TOOL_ID_PREFIX = "call_"

# --------------------------------------------------------------------------------------------------
# Reading the OpenAI request
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Part:
    """One piece of user/assistant content: text, an image or a file (inline base64 or by URL)."""

    kind: str  # "text" | "image" | "file"
    text: str = ""
    mime: str | None = None
    data: str | None = None  # base64, when inline
    url: str | None = None  # when by reference
    filename: str | None = None


@dataclass(slots=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: dict[str, Any] | None


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]
    raw: Mapping[str, Any]  # the client's tool_call object (for provider-specific extras)


_DATA_URL = re.compile(r"^data:([^;,]+)?((?:;[^;,]+)*?);base64,(.*)$", re.DOTALL)

_EXT_MIME = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "gif": "image/gif",
    "webp": "image/webp",
    "heic": "image/heic",
    "heif": "image/heif",
    "pdf": "application/pdf",
}


def parse_data_url(url: str) -> tuple[str, str] | None:
    """`data:<mime>;base64,<data>` -> (mime, base64 data); None for anything else."""
    m = _DATA_URL.match(url)
    if m is None:
        return None
    return (m.group(1) or "application/octet-stream").lower(), m.group(3).strip()


def guess_mime(url: str, default: str = "image/jpeg") -> str:
    path = url.split("?", 1)[0].split("#", 1)[0]
    ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
    return _EXT_MIME.get(ext, default)


def messages_of(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a 'role'", param=f"messages[{i}]")
    return msgs


def text_of(content: Any, where: str) -> str:
    """Text of a content that may only hold text (system, developer and tool messages)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out: list[str] = []
        for j, p in enumerate(content):
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str):
                out.append(p["text"])
            elif isinstance(p, str):
                out.append(p)
            else:
                raise BadRequest(f"{where}[{j}]: only text parts are allowed here", param=where)
        return "\n".join(out)
    raise BadRequest(f"{where} must be a string or an array of content parts", param=where)


def content_parts(content: Any, where: str) -> list[Part]:
    """Normalise a user/assistant `content` into text, image and file parts (empty text dropped)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [Part("text", content)] if content else []
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts", param=where)
    parts: list[Part] = []
    for j, p in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(p, dict):
            raise BadRequest(f"{at} must be an object", param=at)
        kind = p.get("type")
        if kind == "text":
            text = p.get("text")
            if not isinstance(text, str):
                raise BadRequest(f"{at}.text must be a string", param=at)
            if text:
                parts.append(Part("text", text))
        elif kind == "image_url":
            iu = p.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str) or not url:
                raise BadRequest(f"{at}.image_url.url must be a string", param=at)
            inline = parse_data_url(url)
            if inline is not None:
                parts.append(Part("image", mime=inline[0], data=inline[1]))
            elif url.startswith("data:"):
                raise BadRequest(f"{at}: only base64 data URLs are supported", param=at)
            else:
                parts.append(Part("image", mime=guess_mime(url), url=url))
        elif kind == "file":
            f = p.get("file")
            if not isinstance(f, dict) or not isinstance(f.get("file_data"), str):
                raise BadRequest(f"{at}: only files given inline as file.file_data are supported", param=at)
            inline = parse_data_url(f["file_data"])
            if inline is None:
                raise BadRequest(f"{at}.file.file_data must be a base64 data URL", param=at)
            name = f.get("filename") if isinstance(f.get("filename"), str) else None
            parts.append(Part("file", mime=inline[0], data=inline[1], filename=name))
        elif kind == "refusal":
            continue
        else:
            raise BadRequest(f"{at}: content part type '{kind}' is not supported by this provider", param=at)
    return parts


def tool_arguments(args: Any, where: str) -> dict[str, Any]:
    """A tool call's `arguments` (a JSON string) as an object."""
    if isinstance(args, dict):
        return args
    if args is None or (isinstance(args, str) and not args.strip()):
        return {}
    if isinstance(args, str):
        try:
            value = orjson.loads(args)
        except orjson.JSONDecodeError:
            raise BadRequest(f"{where} is not valid JSON", param=where) from None
        if isinstance(value, dict):
            return value
    raise BadRequest(f"{where} must be a JSON object", param=where)


def tool_calls_of(msg: Mapping[str, Any], where: str) -> list[ToolCall]:
    raw = msg.get("tool_calls")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest(f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
    calls: list[ToolCall] = []
    for k, tc in enumerate(raw):
        at = f"{where}.tool_calls[{k}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{at}.function.name is required", param=at)
        assert isinstance(tc, dict)
        tid = tc.get("id")
        calls.append(
            ToolCall(
                tid if isinstance(tid, str) and tid else new_tool_call_id(),
                fn["name"],
                tool_arguments(fn.get("arguments"), f"{at}.function.arguments"),
                tc,
            )
        )
    return calls


def tools_of(body: Mapping[str, Any]) -> list[FunctionTool]:
    raw = body.get("tools")
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("'tools' must be an array", param="tools")
    out: list[FunctionTool] = []
    for i, t in enumerate(raw):
        at = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise BadRequest(f"{at}: only tools of type 'function' are supported", param=at)
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{at}.function.name is required", param=at)
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"{at}.function.parameters must be an object", param=at)
        desc = fn.get("description")
        out.append(FunctionTool(fn["name"], desc if isinstance(desc, str) and desc else None, params))
    return out


def tool_choice_of(body: Mapping[str, Any]) -> str | tuple[str, str] | None:
    """None (absent), "auto", "none", "required" or ("function", name)."""
    tc = body.get("tool_choice")
    if tc is None:
        return None
    if tc in ("auto", "none", "required"):
        return str(tc)
    if isinstance(tc, dict):
        fn = tc.get("function")
        if tc.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return ("function", fn["name"])
    raise BadRequest("'tool_choice' must be 'auto', 'none', 'required' or a function", param="tool_choice")


def stop_of(body: Mapping[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise BadRequest("'stop' must be a string or an array of strings", param="stop")


def int_param(body: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise BadRequest(f"'{name}' must be a non-negative integer", param=name)
        return v
    return None


def float_param(body: Mapping[str, Any], name: str, hi: float | None = None) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadRequest(f"'{name}' must be a number", param=name)
    f = float(v)
    return min(f, hi) if hi is not None else f


@dataclass(slots=True)
class ResponseFormat:
    type: str  # "text" | "json_object" | "json_schema"
    schema: dict[str, Any] | None = None
    name: str | None = None
    description: str | None = None


def response_format_of(body: Mapping[str, Any]) -> ResponseFormat | None:
    rf = body.get("response_format")
    if rf is None:
        return None
    if isinstance(rf, dict) and rf.get("type") in ("text", "json_object"):
        return ResponseFormat(str(rf["type"]))
    if isinstance(rf, dict) and rf.get("type") == "json_schema":
        js = rf.get("json_schema")
        if isinstance(js, dict):
            schema = js.get("schema")
            name = js.get("name")
            desc = js.get("description")
            return ResponseFormat(
                "json_schema",
                schema if isinstance(schema, dict) else None,
                name if isinstance(name, str) and name else None,
                desc if isinstance(desc, str) and desc else None,
            )
    raise BadRequest("'response_format' is not valid", param="response_format")


def merge_turns(turns: list[tuple[str, list[Any]]]) -> list[tuple[str, list[Any]]]:
    """Merge consecutive turns of the same role (upstreams that require alternating roles)."""
    out: list[tuple[str, list[Any]]] = []
    for role, blocks in turns:
        if not blocks:
            continue
        if out and out[-1][0] == role:
            out[-1][1].extend(blocks)
        else:
            out.append((role, list(blocks)))
    return out


# --------------------------------------------------------------------------------------------------
# Writing OpenAI responses
# --------------------------------------------------------------------------------------------------


def token_count(data: Mapping[str, Any], key: str) -> int:
    """A provider's token counter as an int (0 when absent or not a number)."""
    v = data.get(key)
    return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0


def load_upstream_json(raw: bytes, provider_id: str) -> Any:
    """A successful upstream body; unreadable JSON is the upstream's fault (502), never a traceback."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"Upstream provider '{provider_id}' returned invalid JSON", status=502) from None


def new_completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


def new_tool_call_id() -> str:
    return GENERATED_TOOL_ID_PREFIX + uuid.uuid4().hex[:24]


def completion_id(upstream_id: Any) -> str:
    return f"chatcmpl-{upstream_id}" if isinstance(upstream_id, str) and upstream_id else new_completion_id()


def tool_call_json(tid: str, name: str, arguments: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tid, "type": "function", "function": {"name": name, "arguments": arguments}}
    if extra:
        out.update(extra)
    return out


def choice_json(index: int, text: str | None, tool_calls: list[dict[str, Any]], finish: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish}


def completion_json(cid: str, model: str, choices: list[dict[str, Any]], usage: Usage | None) -> bytes:
    out: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        out["usage"] = usage.to_openai()
    return orjson.dumps(out)


def embeddings_json(vectors: list[list[float]], model: str, encoding: str, usage: Usage | None) -> bytes:
    data: list[dict[str, Any]] = []
    for i, vec in enumerate(vectors):
        emb: Any = vec
        if encoding == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": emb})
    u = usage or Usage()
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": u.prompt_tokens, "total_tokens": u.total_tokens or u.prompt_tokens},
        }
    )


def error_frame(err: ProxyError) -> bytes:
    """An in-stream error in the shape the OpenAI SDKs raise on (`data: {"error": {...}}`)."""
    return frame(err.body())


class ChunkWriter:
    """Builds `chat.completion.chunk` SSE frames for one streamed response."""

    __slots__ = ("created", "id", "model")

    def __init__(self, model: str, cid: str | None = None) -> None:
        self.model = model
        self.id = cid or new_completion_id()
        self.created = int(time.time())

    def _frame(self, choices: list[dict[str, Any]], usage: Usage | None = None) -> bytes:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            out["usage"] = usage.to_openai()
        return frame(orjson.dumps(out))

    def delta(self, delta: dict[str, Any], index: int = 0, finish: str | None = None) -> bytes:
        return self._frame([{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def role(self, index: int = 0) -> bytes:
        return self.delta({"role": "assistant", "content": ""}, index)

    def text(self, text: str, index: int = 0) -> bytes:
        return self.delta({"content": text}, index)

    def tool_start(
        self, tool_index: int, tid: str, name: str, arguments: str = "", extra: dict[str, Any] | None = None,
        index: int = 0,
    ) -> bytes:
        call = {"index": tool_index, **tool_call_json(tid, name, arguments, extra)}
        return self.delta({"tool_calls": [call]}, index)

    def tool_args(self, tool_index: int, fragment: str, index: int = 0) -> bytes:
        return self.delta({"tool_calls": [{"index": tool_index, "function": {"arguments": fragment}}]}, index)

    def finish(self, reason: str, index: int = 0, stop: str | None = None) -> bytes:
        """The finish chunk; `stop`: the stop sequence that ended the answer (vLLM's `stop_reason` field)."""
        if stop is None:
            return self.delta({}, index, reason)
        return self._frame([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason,
                             "stop_reason": stop}])

    def usage(self, usage: Usage) -> bytes:
        return self._frame([], usage)
