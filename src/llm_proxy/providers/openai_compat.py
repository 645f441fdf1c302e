"""Translator and signer for OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, Groq, any base_url)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

import orjson

from ..config import ProviderSettings
from ..errors import ProxyError, UpstreamError
from ..types import Usage
from . import openai_responses
from .base import Endpoint, Target, UpstreamRequest
from .credentials import KeySource, header_secrets
from .sse import DONE, MAX_EVENT_BYTES, SSESplitter, event_too_large, frame
from .upstream_errors import status_from, upstream_error

# OpenAI-compatible servers that read only `max_tokens` (llama.cpp, Ollama, older vLLM): a client's
# `max_completion_tokens` is renamed for them unless the provider says otherwise (max_tokens_field).
MAX_TOKENS_RENAMED_TYPES = frozenset({"vllm", "ollama", "openai_compat"})


def max_tokens_field(settings: ProviderSettings) -> str:
    """The provider's max_tokens_field, or its type's default."""
    if settings.max_tokens_field is not None:
        return settings.max_tokens_field
    return "max_tokens" if settings.type in MAX_TOKENS_RENAMED_TYPES else "as_sent"


_PATHS: dict[str, str] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}

# The first `"model": "..."` key of a chunk, matched on bytes so the hot path need not parse JSON.
_MODEL_KEY = re.compile(rb'"model"\s*:\s*"(?:[^"\\]|\\.)*"')
_USAGE_OBJ = re.compile(rb'"usage"\s*:\s*\{')
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')  # a choice's finish_reason with a value (not null)
# In an SSE data line this can only be a key or a value, never content (quotes in strings are escaped).
_ERROR_KEY = b'"error"'


def model_json_bytes(public_model: str) -> tuple[bytes, bytes]:
    """A public model's name as JSON, and as the `"model":<json>` member a stream's chunks get."""
    model_json = orjson.dumps(public_model)
    return model_json, b'"model":' + model_json


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
    """An OpenAI-shaped error body (`{"error": {...}}` or `{"error": "..."}`) -> a ProxyError keeping the status."""
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    return error_from_openai_data(status, headers, data, provider_id, secrets, raw)


def error_from_openai_data(
    status: int, headers: Mapping[str, str], data: Any, provider_id: str, secrets: list[str | None],
    raw: bytes = b"",
) -> ProxyError:
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        return upstream_error(status, headers, err.get("message"), err.get("type"), err.get("code"),
                              err.get("param"), provider_id, secrets, raw)
    return upstream_error(status, headers, err, None, None, None, provider_id, secrets, raw)


def status_in_body(data: dict[str, Any]) -> int:
    """The status for an error the upstream sent with HTTP 200 (in a stream, or as the body): vLLM puts the HTTP
    status in `code`; otherwise 502."""
    err = data.get("error")
    return status_from(err.get("code") if isinstance(err, dict) else None)


# An OpenAI chunk sent with stream_options.include_usage ends with this until the usage chunk (which carries an
# object instead): events of a read that all end so carry no usage object, without a scan for one.
_NULL_USAGE_END = b'"usage":null}\n\n'
# What _learn found, per (provider, upstream model) and kept by the provider (bounded: passthrough providers take
# model names from clients).
_LEARNED_MAX = 1024
Learned = tuple[bytes, bytes, bool]  # the upstream's `"model":"..."` bytes, its chunks' lead, whether null-usage


class OpenAIStreamDecoder:
    """Passes OpenAI chunks through, rewriting `model` and lifting the usage chunk.

    Fast path: the events of a read up to its usage chunk, when they are whole single-line `data: {...}` events
    that open with the same first key and carry one `model` value each and no usage object, are relayed with one
    bytes.replace. The usage chunk and [DONE] at the end of a read are peeled off first (looked at from the end);
    anything else (error events, comments, CRLF, events split across reads) goes through the SSE splitter event by
    event. The usage chunk is relayed in the upstream's bytes with `model` rewritten (re-serialised only when its
    usage must be taken out of a chunk that has choices).

    End of the stream: `data: [DONE]` sets `done` (the gateway stops reading there: llama.cpp, for one, drops
    the connection right after it without ending the chunked body). A stream whose body ends without [DONE]
    counts as done at close() when a whole event of its last read carried a finish_reason, or the usage chunk
    came (servers that omit [DONE]); otherwise it was cut short.
    """

    __slots__ = ("_buf", "_cache", "_cache_key", "_cached", "_from", "_last", "_lead", "_model_json", "_next_lead",
                 "_null_end", "_provider_id", "_secrets", "_splitter", "_to", "_want_usage", "done", "error", "usage")

    def __init__(self, public_model: str, client_wants_usage: bool,
                 secrets: list[str | None] | Callable[[], list[str | None]] | None = None,
                 provider_id: str = "openai", learned: dict[str, Learned] | None = None,
                 upstream_model: str = "", model_bytes: tuple[bytes, bytes] | None = None) -> None:
        # The secrets to scrub from an error event: a list, or (from the provider) a callable read only when an
        # error event comes, so that a stream neither builds the list nor reads the key (and a key rotated
        # mid-stream is still the one scrubbed).
        self._secrets = secrets
        self._provider_id = provider_id
        self.error: ProxyError | None = None
        self._splitter: SSESplitter | None = None  # built when an event leaves the fast paths (see _split)
        # The public model as JSON and as `"model":<json>`: the provider's cached bytes, or made here.
        if model_bytes is None:
            model_bytes = model_json_bytes(public_model)
        self._model_json, self._to = model_bytes
        self._want_usage = client_wants_usage
        self.usage: Usage | None = None
        self._buf = b""
        self._from: bytes | None = None  # the upstream's `"model":"..."` bytes, once seen
        self._lead = self._next_lead = b""  # `data: {"<first key>` of its chunks (see _learn)
        self._null_end = False  # its chunks end with `"usage":null}` (see _NULL_USAGE_END)
        self._last = b""  # the latest read, for close()'s look for a finish_reason
        self.done: bool | None = False
        # The provider's cache of what _learn finds (None: learn per stream), and this stream's key in it.
        self._cache = learned
        self._cache_key = upstream_model
        self._cached = False  # what the fast path uses came from the cache (relearnt once if it does not fit)
        if learned is not None:
            hit = learned.get(upstream_model)
            if hit is not None:
                self._cached = True
                self._from, self._lead, self._null_end = hit
                self._next_lead = (_NULL_USAGE_END if self._null_end else b"\n\n") + self._lead

    @property
    def _split(self) -> SSESplitter:
        split = self._splitter
        if split is None:
            split = self._splitter = SSESplitter()
        return split

    def feed(self, data: bytes) -> list[bytes]:
        self._last = data
        pending = self._splitter
        if pending is not None and pending._buf:  # part of an event is in the splitter (SSESplitter.pending)
            return self._frames(pending.feed(data))
        buf = self._buf + data if self._buf else data
        end = buf.rfind(b"\n\n")
        if end < 0:
            if len(buf) > MAX_EVENT_BYTES:
                raise event_too_large()
            self._buf = buf
            return []
        end += 2
        self._buf = buf[end:] if end < len(buf) else b""
        # The usage chunk and [DONE] come last: peeled off from the end (where each event starts, just after the
        # blank line before it), they take a path of their own.
        cut = end
        i = buf.rfind(b"\n\n", 0, cut - 2)
        p = i + 2 if i >= 0 else 0
        done = buf.startswith(DONE, p)
        if done:
            cut = p
            i = buf.rfind(b"\n\n", 0, cut - 2) if cut >= 2 else -1
            p = i + 2 if i >= 0 else 0
        # (the plain find first: the regex, which also takes a spaced `"usage": {`, only when it fails)
        usage = cut > 0 and (buf.find(b'"usage":{', p, cut) >= 0 or _USAGE_OBJ.search(buf, p, cut) is not None)
        if usage:
            cut = p
        fast = None
        if cut:
            fast = self._fast(buf, cut)
            if fast is None and self._cached:  # another upstream model behind the same name, say: learn anew
                self._cached = False
                self._from = None
                fast = self._fast(buf, cut)
            if fast is None:
                return self._frames(self._split.feed(buf[:end]))
            if cut == end:
                return [fast]
        stop = end - 14 if done else end  # the usage chunk's end
        if usage:
            kept = self._usage_fast(buf, cut, stop)
            if kept is None:  # not a plain one-line JSON event: the splitter and _frames, as any other event
                out = self._frames(self._split.feed(buf[cut:end]))
                if fast is not None:
                    out.insert(0, fast)
                return out
        else:
            kept = b""
        if done:
            self.done = True
        if fast is None:
            return [kept] if kept else []
        return [fast, kept] if kept else [fast]

    def close(self) -> list[bytes]:
        if self.done:  # (the usual end: [DONE] came; nothing after it is relayed)
            return []
        rest, self._buf = self._buf, b""
        split = self._split
        if rest:
            split.feed(rest)
        out = self._frames(split.close())
        if not self.done:  # no [DONE]: finished all the same if a whole event of the last read had a finish_reason
            last = self._last
            end = last.rfind(b"\n\n")
            self.done = self.usage is not None or (end > 0 and _FINISHED.search(last, 0, end) is not None)
        return out

    def _fast(self, buf: bytes, cut: int) -> bytes | None:
        """buf[:cut] (whole events, none of them the usage chunk or [DONE]) with `model` rewritten, or None when
        it is not plain chunks."""
        src = self._from
        if src is None:
            if not self._learn(buf, cut):
                return None
            src = self._from
            assert src is not None
        chunk = buf[:cut] if cut < len(buf) else buf
        # The count of newlines, from the length without them: bytes.replace finds a single byte with memchr,
        # where bytes.count compares byte by byte (about 4x the instructions on a read of chunks).
        lines = cut - len(chunk.replace(b"\n", b""))
        events = lines >> 1
        if (
            lines & 1
            or not chunk.startswith(self._lead)
            # Every event opens with the first key of the upstream's chunks: an error event (`{"error": ...}`) does
            # not, so it leaves the fast path (and is rebuilt in _frames) without a scan of its own. With it, the
            # count of newlines says each event is one line. For a null-usage upstream the needle also says each
            # event but the last ends with `"usage":null}` (so carries no usage object).
            or chunk.count(self._next_lead) != events - 1
            or b"\r" in chunk
        ):
            return None
        if self._null_end:
            if not chunk.endswith(_NULL_USAGE_END):
                return None
        elif _USAGE_OBJ.search(chunk) is not None:
            return None
        # One `model` per event, rewritten: split and joined (one scan; bytes.replace makes two, a count and then
        # the finds), the count of parts saying how many there were.
        parts = chunk.split(src)
        if len(parts) != events + 1:
            return None
        return self._to.join(parts)

    def _usage_fast(self, buf: bytes, start: int, stop: int) -> bytes | None:
        """The usage chunk buf[start:stop] (one whole event, [DONE] not in it) as _frames would relay it (b"": not
        at all), its usage taken; None when it is not a one-line `data: {...}` event that _frames would handle as
        a usage chunk, so the splitter and _frames take it."""
        if (
            not buf.startswith(b"data: {", start)
            or buf.find(b"\n", start, stop - 2) >= 0  # one `data:` line (so its payload is the rest of the line)
            or buf.find(b"\r", start, stop) >= 0
            or buf.find(_ERROR_KEY, start, stop) >= 0  # maybe an error event: _frames rebuilds those
        ):
            return None
        try:
            data = orjson.loads(buf[start + 6 : stop - 2])
        except orjson.JSONDecodeError:
            return None
        if not isinstance(data, dict):
            return None
        if not self._want_usage and data.get("choices"):
            return None  # its usage is taken out and the rest re-serialised, by _usage_chunk
        self.usage = Usage.from_openai(data.get("usage")) or self.usage
        if not self._want_usage:
            return b""  # the extra chunk we asked for on the client's behalf
        # Relayed in the upstream's bytes with `model` rewritten, as rewrite_model would: the learnt `"model":"..."`
        # bytes are the first `"model"` of the chunk at depth 1 (nothing before them opens an object or array),
        # so they are what its regex would find and replace.
        src = self._from
        if src is not None:
            m = buf.find(src, start, stop)
            if (
                m > 0
                and buf.find(b'"model"', start, m) < 0
                and buf.find(b"{", start + 7, m) < 0
                and buf.find(b"[", start + 7, m) < 0
            ):
                return buf[start:m] + self._to + buf[m + len(src) : stop]
        return frame(rewrite_model(buf[start + 6 : stop - 2], self._model_json))

    def _learn(self, buf: bytes, cut: int) -> bool:
        """From the first fast-path candidate: the upstream's `"model":"..."` bytes, its chunks' opening
        `data: {"<first key>` (an error event's `{"error"` never matches it), and whether its first chunk ends
        with `"usage":null}`. Kept in the provider's cache for the next streams of this upstream model."""
        if not buf.startswith(b'data: {"'):
            return False
        end = buf.find(b'"', 8, cut)
        first = buf.find(b"\n\n", 0, cut) + 2
        m = _MODEL_KEY.search(buf, 0, first)
        if end < 0 or m is None:
            return False
        # Without the closing quote: a needle ending in `"` makes bytes.count markedly slower on JSON.
        lead = buf[:end]
        head = buf[7 : m.start()]
        if b"error".startswith(buf[8:end]) or b"{" in head or b"[" in head:  # an error, or not top-level
            return False
        self._from = buf[m.start() : m.end()]
        self._lead = lead
        self._null_end = first >= len(_NULL_USAGE_END) and buf.startswith(_NULL_USAGE_END,
                                                                           first - len(_NULL_USAGE_END))
        self._next_lead = (_NULL_USAGE_END if self._null_end else b"\n\n") + lead
        cache = self._cache
        if cache is not None:
            if len(cache) >= _LEARNED_MAX:
                cache.clear()
            cache[self._cache_key] = (self._from, lead, self._null_end)
        return True

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
            if _ERROR_KEY in payload:
                rebuilt = self._error_frame(payload)
                if rebuilt is not None:
                    out.append(rebuilt)
                    continue
            if _USAGE_OBJ.search(payload) is not None:
                kept = self._usage_chunk(payload)
                if kept is not None:
                    out.append(frame(kept))
                continue
            out.append(frame(rewrite_model(payload, self._model_json)))
        return out

    def _error_frame(self, payload: bytes) -> bytes | None:
        """A mid-stream `{"error": ...}` event, rebuilt from its scrubbed parts (None: not an error event)."""
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "error" not in data and data.get("object") == "error":
            data = {"error": data}  # older vLLM: the error object itself
        if not isinstance(data, dict) or "error" not in data:
            if data is not None:
                return None
            # Not JSON but it mentions an error: relaying it could echo anything; say so in our words instead.
            data = {"error": None}
        secrets = self._secrets
        if callable(secrets):
            secrets = secrets()
        self.error = error_from_openai_data(status_in_body(data), {}, data, self._provider_id, secrets or [])
        return frame(self.error.body())

    def _usage_chunk(self, payload: bytes) -> bytes | None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload
        if not isinstance(data, dict):
            return payload
        self.usage = Usage.from_openai(data.get("usage")) or self.usage
        if self._want_usage:
            return rewrite_model(payload, self._model_json)  # the upstream's bytes, `model` rewritten
        if not data.get("choices"):
            return None  # the extra chunk we asked for on the client's behalf
        if "model" in data:
            data["model"] = orjson.loads(self._model_json)
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
        # /v1/responses forwarded as it came: OpenAI's own API serves it; other compatible servers mostly do not,
        # so a type `openai` pointed at another base URL (a vLLM, a test fake) is translated unless it says so.
        native = settings.native_client_api
        self.native = native if native is not None else (
            settings.type == "openai" and urlsplit(self.base_url).hostname == "api.openai.com")
        self._learned: dict[str, Learned] = {}  # what its streams' decoders learn, by upstream model
        self._model_bytes: dict[str, tuple[bytes, bytes]] = {}  # model_json_bytes by public model (bounded)

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
        if "error" in data and "choices" not in data and "data" not in data:  # an error sent with HTTP 200
            raise error_from_openai_data(status_in_body(data), {}, data, self.id, self.secrets())
        if "model" in data or endpoint != "embeddings":
            data["model"] = target.public_model
        return orjson.dumps(data), Usage.from_openai(data.get("usage"))

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> OpenAIStreamDecoder:
        public = target.public_model
        model_bytes = self._model_bytes.get(public)
        if model_bytes is None:
            if len(self._model_bytes) >= _LEARNED_MAX:  # (passthrough providers take model names from clients)
                self._model_bytes.clear()
            model_bytes = self._model_bytes[public] = model_json_bytes(public)
        # self.secrets, not its list: read only if an error event comes (see OpenAIStreamDecoder.__init__).
        return OpenAIStreamDecoder(public, client_wants_usage, self.secrets, self.id, self._learned,
                                   target.upstream_model, model_bytes)

    def native_request(self, api: str, body: dict[str, Any], target: Target, stream: bool) -> UpstreamRequest | None:
        """A Responses request as it came, for the upstream model (providers/base.py NativeProvider)."""
        if api != openai_responses.NATIVE_API or not self.native:
            return None
        return UpstreamRequest("POST", self.base_url + "/responses", dict(self._static_headers),
                               orjson.dumps({**body, "model": target.upstream_model}), stream)

    def parse_native(self, api: str, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        return openai_responses.parse_response(raw, target.public_model, self.id)

    def native_decoder(self, api: str, target: Target) -> openai_responses.ResponsesNativeDecoder:
        return openai_responses.ResponsesNativeDecoder(target.public_model, self.secrets(), self.id)

    def secrets(self) -> list[str | None]:
        return [self.key.get(), *header_secrets(self.settings.headers)]

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        return error_from_openai_body(status, headers, raw, self.id, self.secrets())


def create(settings: ProviderSettings) -> OpenAICompatProvider:
    return OpenAICompatProvider(settings)
