"""Checks of what the agent-API ingresses produce against the official SDKs' own types (openai, anthropic), and of
the neutral bodies they build against the chat/completions request type.

The SDKs' response models accept unknown fields (extra="allow"); `strict` also walks the validated model and
fails on any field the type does not declare, so a misspelt key cannot pass. Request params are TypedDicts, which
pydantic validates lazily and whose unknown keys it drops: the validated value is materialised and compared."""

from __future__ import annotations

import functools
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter

from ..providers.schemas import _materialise


def _no_extra(value: Any, path: str) -> None:
    if isinstance(value, BaseModel):
        extra = value.__pydantic_extra__
        assert not extra, f"{path or 'value'} has fields its SDK type does not declare: {sorted(extra)}"
        for name in type(value).model_fields:
            _no_extra(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _no_extra(v, f"{path}[{i}]")


def strict(kind: Any, data: Any) -> Any:
    obj = _adapter(kind).validate_python(data)
    _no_extra(obj, "")
    return obj


@functools.cache
def _adapter(kind: Any) -> TypeAdapter[Any]:
    return TypeAdapter(kind)  # kept: a lazily validated iterable needs its adapter alive while it is read


def _params(kind: Any, body: dict[str, Any]) -> None:
    value = _adapter(kind).validate_python(body)
    assert _materialise(value) == body, "body has keys its request type does not know"


@functools.cache
def _chat_types() -> tuple[Any, Any]:
    from openai.types.chat.completion_create_params import (
        CompletionCreateParamsNonStreaming,
        CompletionCreateParamsStreaming,
    )

    return CompletionCreateParamsNonStreaming, CompletionCreateParamsStreaming


def chat_request(body: dict[str, Any]) -> None:
    """A neutral body is a valid chat/completions request."""
    _params(_chat_types()[bool(body.get("stream"))], body)


def responses_request(body: dict[str, Any]) -> None:
    """A test's Responses request is one the openai SDK could send."""
    from openai.types.responses.response_create_params import (
        ResponseCreateParamsNonStreaming,
        ResponseCreateParamsStreaming,
    )

    _params(ResponseCreateParamsStreaming if body.get("stream") else ResponseCreateParamsNonStreaming, body)


def messages_request(body: dict[str, Any]) -> None:
    from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming

    _params(MessageCreateParamsStreaming if body.get("stream") else MessageCreateParamsNonStreaming, body)


def response(data: dict[str, Any]) -> Any:
    from openai.types.responses import Response

    return strict(Response, data)


def message(data: dict[str, Any]) -> Any:
    from anthropic.types import Message

    return strict(Message, data)


def sse(blob: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each event of an SSE byte string; every event has both, its data one JSON line."""
    out = []
    for event in blob.split(b"\n\n"):
        if not event:
            continue
        lines = event.split(b"\n")
        assert len(lines) == 2 and lines[0].startswith(b"event: ") and lines[1].startswith(b"data: "), event
        out.append((lines[0][7:].decode(), orjson.loads(lines[1][6:])))
    return out


def sse_bytes(data: dict[str, Any]) -> bytes:
    """One named event, as the framers write it (to check events a client parsed)."""
    return b"event: " + data["type"].encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def responses_events(blob: bytes) -> list[Any]:
    """The events of a Responses stream, each validated as the SDK's ResponseStreamEvent; the SSE event name is
    the data's type and sequence numbers count from 0 without a gap."""
    from openai.types.responses import ResponseStreamEvent

    events = []
    for i, (name, data) in enumerate(sse(blob)):
        assert name == data["type"]
        assert data["sequence_number"] == i
        events.append(strict(ResponseStreamEvent, data))
    return events


def messages_events(blob: bytes) -> list[Any]:
    from anthropic.types import ErrorResponse, RawMessageStreamEvent

    events = []
    for name, data in sse(blob):
        assert name == data["type"]
        events.append(strict(ErrorResponse if name == "error" else RawMessageStreamEvent, data))
    return events
