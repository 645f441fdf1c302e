"""Translator and signer for OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, Groq, any base_url)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from ..config import ProviderSettings, max_tokens_field
from ..errors import ProxyError, RateLimited, UpstreamError
from ..types import Usage
from .base import Endpoint, Target, UpstreamRequest
from .credentials import KeySource, scrub
from .sse import MAX_EVENT_BYTES, SSESplitter, event_too_large, frame

_PATHS: dict[str, str] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}

# The first `"model": "..."` key of a chunk, matched on bytes so the hot path need not parse JSON.
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*\{')
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a choice's finish_reason with a value (not null)


def rewrite_model(payload: bytes, model_json: bytes) -> bytes:
    """Replace the top-level `model` value of a JSON object, without a full parse when safe."""
    m = _MODEL_KEY.search(payload)
    if m is not None:
        head = payload[1 : m.start()]
        if b"{" not in head and b"[" not in head:  # key sits at depth 1
            return payload[: m.start()] + b'"model":' + model_json + payload[m.end() :]
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload
    if isinstance(data, dict) and "model" in data:
        data["model"] = orjson.loads(model_json)
        return orjson.dumps(data)
    return payload


def error_from_openai_body(
    status: int, headers: Mapping[str, str], raw: bytes, provider_id: str, secrets: list[str | None]
) -> ProxyError:
    """Shared mapping of an OpenAI-shaped error body to a ProxyError keeping status and message."""
    message = f"Upstream provider '{provider_id}' returned HTTP {status}"
    etype: str | None = None
    code: str | None = None
    param: str | None = None
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        if isinstance(err.get("message"), str) and err["message"]:
            message = scrub(err["message"], secrets)[:2000]
        etype = err.get("type") if isinstance(err.get("type"), str) else None
        code = str(err["code"]) if err.get("code") is not None else None
        param = err.get("param") if isinstance(err.get("param"), str) else None
    elif isinstance(err, str):
        message = scrub(err, secrets)[:2000]
    return map_status(status, headers, message, etype, code, param, provider_id)


def map_status(
    status: int,
    headers: Mapping[str, str],
    message: str,
    etype: str | None,
    code: str | None,
    param: str | None,
    provider_id: str,
) -> ProxyError:
    if status in (401, 403):
        # A 401 from the proxy means "your token is bad"; an upstream credential problem is ours.
        return UpstreamError(
            f"Upstream provider '{provider_id}' rejected the proxy's credentials (HTTP {status})",
            status=502,
            type="api_error",
            code="upstream_auth_failed",
        )
    out_headers: dict[str, str] = {}
    for h in ("retry-after", "retry-after-ms"):
        v = headers.get(h)
        if v:
            out_headers[h] = v
    if status == 429:
        return RateLimited(message, type=etype or "rate_limit_error", code=code or "rate_limit_exceeded",
                           param=param, headers=out_headers)
    default_type = "invalid_request_error" if 400 <= status < 500 else "api_error"
    return UpstreamError(message, status=status if 400 <= status < 600 else 502, type=etype or default_type,
                         code=code, param=param, headers=out_headers)


class OpenAIStreamDecoder:
    """Passes OpenAI chunks through, rewriting `model` and lifting the usage chunk.

    Fast path: a read holding only whole single-line `data: {...}` events with one `model` value and no
    usage object is relayed with one bytes.replace. Anything else (the usage chunk, [DONE], comments,
    CRLF, events split across reads) goes through the SSE splitter event by event.

    End of the stream: `data: [DONE]` sets `done` (the gateway stops reading there: llama.cpp, for one, drops
    the connection right after it without ending the chunked body). A stream whose body ends without [DONE]
    counts as done at close() when a whole event of its last read carried a finish_reason, or the usage chunk
    came (servers that omit [DONE]); otherwise it was cut short.
    """

    __slots__ = ("_buf", "_from", "_last", "_model_json", "_split", "_to", "_want_usage", "done", "usage")

    def __init__(self, public_model: str, client_wants_usage: bool) -> None:
        self._split = SSESplitter()
        self._model_json = orjson.dumps(public_model)
        self._want_usage = client_wants_usage
        self.usage: Usage | None = None
        self._buf = b""
        self._from: bytes | None = None  # the upstream's `"model":"..."` bytes, once seen
        self._to = b'"model":' + self._model_json
        self._last = b""  # the latest read, for close()'s look for a finish_reason
        self.done: bool | None = False

    def feed(self, data: bytes) -> list[bytes]:
        self._last = data
        if self._split.pending:
            return self._frames(self._split.feed(data))
        buf = self._buf + data if self._buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > MAX_EVENT_BYTES:
                raise event_too_large()
            self._buf = buf
            return []
        # Events before the usage chunk take the fast path; the usage chunk and what follows do not.
        m = _USAGE_OBJ.search(buf, 0, end)
        cut = end + 2 if m is None else buf.rfind(b"\n\n", 0, m.start()) + 2
        fast = self._fast(buf[:cut]) if cut >= 2 else None
        if fast is None:
            self._buf = b""
            return self._frames(self._split.feed(buf))
        if m is None:
            self._buf = buf[cut:]
            return [fast]
        self._buf = b""
        return [fast, *self._frames(self._split.feed(buf[cut:]))]

    def close(self) -> list[bytes]:
        rest, self._buf = self._buf, b""
        if self.done:
            return []
        if rest:
            self._split.feed(rest)
        out = self._frames(self._split.close())
        if not self.done:  # no [DONE]: finished all the same if a whole event of the last read had a finish_reason
            last = self._last
            end = last.rfind(b"\n\n")
            self.done = self.usage is not None or (end > 0 and _FINISHED.search(last, 0, end) is not None)
        return out

    def _fast(self, chunk: bytes) -> bytes | None:
        events = chunk.count(b"\n\n")
        if (
            not chunk.startswith(b"data: {")
            or chunk.count(b"\n") != 2 * events
            or chunk.count(b"\n\ndata: {") != events - 1
            or b"\r" in chunk
        ):
            return None
        src = self._from
        if src is None:
            m = _MODEL_KEY.search(chunk)
            if m is None:
                return None
            head = chunk[7 : m.start()]
            if b"{" in head or b"[" in head:  # not a top-level key of the first event
                return None
            src = self._from = chunk[m.start() : m.end()]
        if chunk.count(src) != events:
            return None
        return chunk.replace(src, self._to)

    def _frames(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        if self.done:
            return out
        for _name, payload in events:
            if payload == b"[DONE]":
                self.done = True
                break  # the upstream's end: nothing after it is relayed
            if not payload:
                continue
            if _USAGE_OBJ.search(payload) is not None:
                kept = self._usage_chunk(payload)
                if kept is not None:
                    out.append(frame(kept))
                continue
            out.append(frame(rewrite_model(payload, self._model_json)))
        return out

    def _usage_chunk(self, payload: bytes) -> bytes | None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload
        if not isinstance(data, dict):
            return payload
        self.usage = Usage.from_openai(data.get("usage")) or self.usage
        if "model" in data:
            data["model"] = orjson.loads(self._model_json)
        if not self._want_usage:
            if not data.get("choices"):
                return None  # the extra chunk we asked for on the client's behalf
            data.pop("usage", None)
        return orjson.dumps(data)


class OpenAICompatProvider:
    """Forwards the client's JSON with the few edits it needs; the usual case costs one parse and one dump."""

    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.id = settings.id
        self.type = settings.type
        self.base_url = (settings.base_url or "").rstrip("/")
        self.key = KeySource(settings.api_key, settings.api_key_file)
        self._static_headers = {"content-type": "application/json", **settings.headers}
        self._max_tokens = max_tokens_field(settings)  # as_sent | max_tokens | both

    def missing_credentials(self) -> list[str]:
        return []

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        # A shallow copy: the client's dict is reused by every retry attempt (on other deployments too).
        body = {**body, "model": target.upstream_model}
        if self._max_tokens != "as_sent" and "max_completion_tokens" in body:
            body.setdefault("max_tokens", body["max_completion_tokens"])  # a client's own max_tokens stays
            if self._max_tokens == "max_tokens":
                del body["max_completion_tokens"]
        if stream and endpoint != "embeddings":
            opts = body.get("stream_options")
            # Always ask for usage so the ledger gets token counts; the decoder hides it again if
            # the client did not ask.
            body["stream_options"] = {**opts, "include_usage": True} if isinstance(opts, dict) else {
                "include_usage": True
            }
        return UpstreamRequest(
            "POST", self.base_url + _PATHS[endpoint], dict(self._static_headers), orjson.dumps(body), stream
        )

    async def sign(self, request: UpstreamRequest) -> None:
        key = self.key.get()
        if key:
            request.headers["authorization"] = "Bearer " + key

    def parse_response(self, endpoint: Endpoint, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise UpstreamError(f"Upstream provider '{self.id}' returned an unexpected body", status=502)
        if "model" in data or endpoint != "embeddings":
            data["model"] = target.public_model
        return orjson.dumps(data), Usage.from_openai(data.get("usage"))

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> OpenAIStreamDecoder:
        return OpenAIStreamDecoder(target.public_model, client_wants_usage)

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        return error_from_openai_body(status, headers, raw, self.id, [self.key.get()])


def create(settings: ProviderSettings) -> OpenAICompatProvider:
    return OpenAICompatProvider(settings)
