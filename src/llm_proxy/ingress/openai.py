"""The OpenAI client APIs: chat completions, (legacy) completions, embeddings.

Their request and reply are the neutral form already, so they are identities on the hot path: parse() validates
(ingress/schema.py, the schemas GET /openapi.json publishes) and builds the Call around the body as it came;
render() returns the reply as it is; the framer writes the neutral frames untouched and ends with `[DONE]`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import BadRequest, ProxyError
from .base import Call, as_sent
from .schema import VALIDATORS, BodyValidator

DONE = b"data: [DONE]\n\n"
PREFIXES = ("/v1", "/v1/openai/v1")  # llama-stack clients use the second


class OpenAIFramer:
    """OpenAI's SSE framing: the neutral frames as they are, `[DONE]` at the end, an `error` event in-band."""

    __slots__ = ()
    identity = True

    def feed(self, blob: bytes) -> bytes:
        return blob

    def end(self) -> bytes:
        return DONE

    def error(self, exc: ProxyError) -> bytes:
        return b"data: " + exc.body() + b"\n\n"


_FRAMER = OpenAIFramer()  # no state: one for every stream


class OpenAIIngress:
    """One OpenAI endpoint. `streams`: whether `stream: true` is accepted (not for embeddings)."""

    __slots__ = ("_validate", "endpoint", "name", "paths", "streams")

    def __init__(self, name: str, endpoint: str, path: str, *, streams: bool) -> None:
        self.name = name
        self.endpoint = endpoint
        self.paths = tuple(prefix + path for prefix in PREFIXES)
        self.streams = streams
        self._validate: BodyValidator = VALIDATORS[endpoint]

    def credentials(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return as_sent(headers)

    def parse(self, body: dict[str, Any]) -> Call:
        self._validate(body)
        stream = body.get("stream") is True
        want_usage = False
        if stream:
            if not self.streams:
                raise BadRequest(f"streaming is not supported for {self.endpoint}", param="stream")
            opts = body.get("stream_options")
            want_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        return Call(body["model"], self.endpoint, body, stream, want_usage)

    def render(self, call: Call, raw: bytes) -> bytes:
        return raw

    def framer(self, call: Call) -> OpenAIFramer:
        return _FRAMER

    def error_body(self, exc: ProxyError) -> bytes:
        return exc.body()

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        return None


class OpenAIChatIngress(OpenAIIngress):
    """Chat completions also keep what they answered for GET /v1/chat/completions (usage.store_completions),
    unless the request says `store: false`; the reply is kept as raw JSON."""

    __slots__ = ()

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        body = call.body
        if body.get("store") is False:
            return None
        return {"input_messages": body.get("messages"), "response": orjson.Fragment(raw)}


CHAT = OpenAIChatIngress("openai.chat", "chat.completions", "/chat/completions", streams=True)
COMPLETIONS = OpenAIIngress("openai.completions", "completions", "/completions", streams=True)
EMBEDDINGS = OpenAIIngress("openai.embeddings", "embeddings", "/embeddings", streams=False)
