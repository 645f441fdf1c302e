"""OpenAI's Responses API passed through (providers/base.py NativeProvider, for type openai): the usage of a Response,
and the decoder that relays its stream events with the public model in them."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import ProxyError, UpstreamError
from ..types import Usage
from .sse import SSESplitter
from .upstream_errors import upstream_error

NATIVE_API = "openai.responses"  # the Responses ingress's name
_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _count(data: Any, key: str) -> int | None:
    v = data.get(key) if isinstance(data, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def responses_usage(data: Any) -> Usage | None:
    """A Response's `usage` -> Usage (input tokens include the cached ones, as chat's prompt tokens do)."""
    if not isinstance(data, dict):
        return None
    prompt, completion = _count(data, "input_tokens") or 0, _count(data, "output_tokens") or 0
    return Usage(prompt, completion, _count(data, "total_tokens") or prompt + completion,
                 _count(data.get("input_tokens_details"), "cached_tokens"))


def parse_response(raw: bytes, public_model: str, provider_id: str) -> tuple[bytes, Usage | None]:
    """A non-streamed Response: the public model in it, and its usage."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict) or data.get("object") != "response":
        raise UpstreamError(f"Upstream provider '{provider_id}' returned a body that is not a Response", status=502)
    data["model"] = public_model
    return orjson.dumps(data), responses_usage(data.get("usage"))


class ResponsesNativeDecoder:
    """A Responses stream relayed event by event: `response.*` snapshots get the public model, the final one
    (`response.completed` / `.incomplete` / `.failed`) gives the usage and ends it, an `error` event is rebuilt
    from the scrubbed error (and ends it); `response.failed` is the stream's error too (its message scrubbed)."""

    def __init__(self, public_model: str, secrets: list[str | None], provider_id: str) -> None:
        self._public = public_model
        self._secrets = secrets
        self._provider_id = provider_id
        self._split = SSESplitter()
        self.usage: Usage | None = None
        self.done: bool | None = None
        self.error: ProxyError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        return self._relay(self._split.feed(data))

    def close(self) -> list[bytes]:
        out = self._relay(self._split.close())
        if not self.done:
            self.done = False
        return out

    def _relay(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        for _, payload in events:
            if not payload or self.done:
                continue
            try:
                ev = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            kind = ev.get("type") if isinstance(ev, dict) else None
            if not isinstance(kind, str):
                continue
            response = ev.get("response")
            if isinstance(response, dict):
                response["model"] = self._public
                if kind in _FINAL:
                    self.usage = responses_usage(response.get("usage")) or self.usage
                    self.done = True
                if kind == "response.failed":  # the row is an error; its message relayed scrubbed
                    err = response.get("error") if isinstance(response.get("error"), dict) else {}
                    assert isinstance(err, dict)
                    self.error = upstream_error(502, {}, err.get("message") or "The response failed", "api_error",
                                                err.get("code"), None, self._provider_id, self._secrets)
                    response["error"] = {"code": self.error.code or "server_error", "message": self.error.message}
            elif kind == "error":
                self.error = upstream_error(502, {}, ev.get("message") or "Responses stream error", "api_error",
                                            ev.get("code"), ev.get("param"), self._provider_id, self._secrets)
                ev = {"type": "error", "code": self.error.code, "message": self.error.message,
                      "param": self.error.param, "sequence_number": ev.get("sequence_number", 0)}
                self.done = True
            out.append(b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(ev) + b"\n\n")
        return out
