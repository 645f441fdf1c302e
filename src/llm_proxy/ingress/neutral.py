"""What the agent-API translators share: reading the neutral reply (OpenAI chat JSON and `chat.completion.chunk`
SSE frames) and writing named SSE events.

Pure: no I/O. The neutral stream reaches an ingress's framer as the bytes the exchange relays: one or more whole
`data: ...` events per blob as a rule, but an event cut across two blobs is put together here rather than trusted
not to happen (a pass-through upstream's reads are relayed as they came).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import BadRequest, ProxyError

# One event still incomplete may hold at most this much (the providers' own splitter has the same bound).
MAX_EVENT_BYTES = 8 << 20


def new_id(prefix: str) -> str:
    """An id in the style of the API's own (`resp_...`, `msg_...`, `fc_...`): the prefix and 48 hex digits."""
    return prefix + secrets.token_hex(24)


def obj(value: Any) -> dict[str, Any]:
    """`value` if it is a JSON object, else an empty one (for reading what an upstream sent)."""
    return value if isinstance(value, dict) else {}


def string(value: Any, default: str = "") -> str:
    """`value` if it is a non-empty string, else `default`."""
    return value if isinstance(value, str) and value else default


def sse_event(name: str, data: dict[str, Any]) -> bytes:
    """One named SSE event (`event:` line and one `data:` line of compact JSON)."""
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class ChunkReader:
    """Neutral SSE bytes -> the JSON objects of their `data:` lines, in order. `[DONE]`, comments and other fields
    are skipped; a data line that is not a JSON object is skipped too (the exchange has already relayed it as it
    came, and it carries nothing a translated stream could show)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, blob: bytes) -> Iterator[dict[str, Any]]:
        buf = self._buf + blob if self._buf else blob
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > MAX_EVENT_BYTES:
                self._buf = b""
                raise ProxyError("The upstream stream sent an event over 8 MiB", status=502, type="api_error",
                                 code="bad_upstream_response")
            self._buf = buf
            return
        self._buf = buf[end + 2:]
        for event in buf[:end].split(b"\n\n"):
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if not data or data == b"[DONE]":
                    continue
                try:
                    obj = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    yield obj


class ChunkFramer:
    """The skeleton of a framer that translates the neutral chunk stream: the first chunk starts the stream, the
    first choice's text and tool-call deltas go to `_text` / `_tool`, its finish reason to `_finished`, and the
    last events (`_last`, once) wait for the usage chunk that follows the finish reason, or for `end()`."""

    identity = False

    def __init__(self) -> None:
        self._reader = ChunkReader()
        self._started = False
        self._finish: str | None = None
        self._stop: str | None = None  # the stop sequence that ended the answer, when the upstream said which
        self._usage: dict[str, Any] | None = None
        self._ended = False

    # The translation's own parts.
    def _begin(self, out: list[bytes]) -> None:
        raise NotImplementedError

    def _text(self, text: str, out: list[bytes]) -> None:
        raise NotImplementedError

    def _tool(self, tc: dict[str, Any], out: list[bytes]) -> None:
        raise NotImplementedError

    def _finished(self, out: list[bytes]) -> None:
        raise NotImplementedError

    def _last(self, out: list[bytes]) -> None:
        raise NotImplementedError

    def _start(self, out: list[bytes]) -> None:
        if not self._started:
            self._started = True
            self._begin(out)

    def _final(self, out: list[bytes]) -> None:
        if not self._ended:
            self._ended = True
            self._last(out)

    def feed(self, blob: bytes) -> bytes:
        out: list[bytes] = []
        for chunk in self._reader.feed(blob):
            self._start(out)
            if self._ended:
                continue
            for choice in chunk.get("choices") or ():
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    self._choice(choice, out)
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self._usage = usage
                if self._finish is not None:
                    self._final(out)
        return b"".join(out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text(text, out)
            for tc in delta.get("tool_calls") or ():
                if isinstance(tc, dict):
                    self._tool(tc, out)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self._finish = finish
            self._stop = stop_string(choice)
            self._finished(out)

    def end(self) -> bytes:
        out: list[bytes] = []
        self._start(out)
        self._final(out)
        return b"".join(out)


@dataclass(slots=True)
class ChatReply:
    """A non-streamed neutral reply, read: the first choice's text, tool calls and finish reason, and the usage."""

    id: str | None
    created: int | None
    text: str
    tool_calls: list[dict[str, str]]  # {"id", "name", "arguments"}
    finish_reason: str | None
    usage: dict[str, Any] | None
    refusal: str | None = None
    stop: str | None = None  # the stop sequence that ended the answer (stop_string)
    extra: dict[str, Any] = field(default_factory=dict)


def stop_string(choice: dict[str, Any]) -> str | None:
    """The stop sequence that ended a choice, where the upstream says which: a choice's `stop_reason` string
    (vLLM's field; the Anthropic and Bedrock translators set it from their `stop_sequence`)."""
    value = choice.get("stop_reason")
    return value if isinstance(value, str) and value else None


def read_reply(raw: bytes) -> ChatReply:
    """Parse a neutral `chat.completion` body. A body that is not one is the upstream's fault: 502."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ProxyError("The upstream returned a reply that is not a chat completion", status=502,
                         type="api_error", code="bad_upstream_response")
    choice = obj(data["choices"][0]) if data["choices"] else {}
    msg = obj(choice.get("message"))
    content = msg.get("content")
    text = content if isinstance(content, str) else "".join(
        p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
    ) if isinstance(content, list) else ""
    calls: list[dict[str, str]] = []
    for tc in msg.get("tool_calls") or ():
        tc = obj(tc)
        fn = obj(tc.get("function"))
        if not isinstance(fn.get("name"), str):
            continue
        args = fn.get("arguments")
        calls.append({
            "id": string(tc.get("id")) or new_id("call_"),
            "name": fn["name"],
            "arguments": args if isinstance(args, str) else orjson.dumps(args or {}).decode(),
        })
    finish = choice.get("finish_reason")
    usage = data.get("usage")
    refusal = msg.get("refusal")
    return ChatReply(
        data.get("id") if isinstance(data.get("id"), str) else None,
        data.get("created") if isinstance(data.get("created"), int) else None,
        text,
        calls,
        finish if isinstance(finish, str) else None,
        usage if isinstance(usage, dict) else None,
        refusal if isinstance(refusal, str) and refusal else None,
        stop_string(choice),
    )


def token_counts(usage: dict[str, Any] | None) -> tuple[int, int, int | None, int | None]:
    """(prompt, completion, cached, reasoning) tokens of an OpenAI usage object (0 / None when absent)."""
    if not isinstance(usage, dict):
        return 0, 0, None, None

    def count(d: Any, key: str) -> int | None:
        v = d.get(key) if isinstance(d, dict) else None
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None

    return (
        count(usage, "prompt_tokens") or 0,
        count(usage, "completion_tokens") or 0,
        count(usage.get("prompt_tokens_details"), "cached_tokens"),
        count(usage.get("completion_tokens_details"), "reasoning_tokens"),
    )


def image_part(url: Any, detail: Any, where: str) -> dict[str, Any]:
    """A neutral `image_url` content part."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: an image needs a URL or a base64 data URL", param=where)
    image: dict[str, Any] = {"url": url}
    if detail in ("low", "high", "auto"):
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


def require_object(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"'{where}' must be an object", param=where)
    return value


def require_str(value: Any, where: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise BadRequest(f"'{where}' must be a {'' if empty else 'non-empty '}string", param=where)
    return value
