"""Amazon Bedrock Converse / ConverseStream translator, signed with SigV4 (or a Bedrock API key)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson
import yarl

from ..config import ProviderSettings
from ..errors import BadRequest, ProxyError, UpstreamError
from ..types import Usage
from .base import Endpoint, Target, UpstreamRequest
from .chat_common import (
    ChunkWriter,
    Part,
    choice_json,
    completion_json,
    content_parts,
    error_frame,
    float_param,
    guess_mime,
    int_param,
    load_upstream_json,
    merge_turns,
    messages_of,
    new_completion_id,
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
from .eventstream import EventMessage, EventStreamDecoder, EventStreamError
from .signing import HeaderKeySigner, SigV4Signer, bearer
from .upstream_errors import upstream_error

SIGNING_NAME = "bedrock"

FINISH_REASONS: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}

_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
_DOC_FORMATS = {
    "application/pdf": "pdf",
    "text/csv": "csv",
    "application/msword": "doc",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": "docx",
    "application/vnd.ms-excel": "xls",
    "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet": "xlsx",
    "text/html": "html",
    "text/plain": "txt",
    "text/markdown": "md",
}

# Bedrock exception name -> (OpenAI error type, code). Status comes from the response (or the table below
# for exceptions inside a stream).
_ERRORS: dict[str, tuple[str, str | None, int]] = {
    "ValidationException": ("invalid_request_error", None, 400),
    "ThrottlingException": ("rate_limit_error", "rate_limit_exceeded", 429),
    "ServiceQuotaExceededException": ("rate_limit_error", "rate_limit_exceeded", 429),
    "ModelNotReadyException": ("api_error", "model_not_ready", 503),
    "ResourceNotFoundException": ("invalid_request_error", "model_not_found", 404),
    "AccessDeniedException": ("permission_error", None, 403),
    "ModelTimeoutException": ("api_error", "upstream_timeout", 504),
    "ModelErrorException": ("api_error", "model_error", 502),
    "ModelStreamErrorException": ("api_error", "model_error", 502),
    "InternalServerException": ("api_error", None, 500),
    "ServiceUnavailableException": ("api_error", "service_unavailable", 503),
}

_DOC_NAME_BAD = re.compile(r"[^A-Za-z0-9\s\-\(\)\[\]]")


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(stop_reason, "stop") if isinstance(stop_reason, str) else "stop"


def usage_from(data: Any) -> Usage | None:
    """prompt = inputTokens + cache reads + cache writes (Bedrock reports them apart); cached = cache reads."""
    if not isinstance(data, dict):
        return None
    cached = token_count(data, "cacheReadInputTokens") if data.get("cacheReadInputTokens") is not None else None
    prompt = token_count(data, "inputTokens") + (cached or 0) + token_count(data, "cacheWriteInputTokens")
    completion = token_count(data, "outputTokens")
    return Usage(prompt, completion, prompt + completion, cached)


def _content_blocks(parts: list[Part], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.kind == "text":
            out.append({"text": p.text})
        elif p.kind == "image":
            fmt = _IMAGE_FORMATS.get(p.mime or "")
            if p.url is not None:
                if not p.url.startswith("s3://"):
                    raise BadRequest(f"{where}: Bedrock accepts images as base64 data URLs or s3:// URIs only",
                                     param=where)
                fmt = fmt or _IMAGE_FORMATS.get(guess_mime(p.url))
                source: dict[str, Any] = {"s3Location": {"uri": p.url}}
            else:
                source = {"bytes": p.data}
            if fmt is None:
                raise BadRequest(f"{where}: image type '{p.mime}' is not supported by Bedrock", param=where)
            out.append({"image": {"format": fmt, "source": source}})
        else:
            fmt = _DOC_FORMATS.get(p.mime or "")
            if fmt is None:
                raise BadRequest(f"{where}: file type '{p.mime}' is not supported by Bedrock", param=where)
            # Bedrock document names: alphanumerics, single spaces, hyphens, parentheses, square brackets.
            stem = (p.filename or "document").rsplit(".", 1)[0]
            name = " ".join(_DOC_NAME_BAD.sub(" ", stem).split()) or "document"
            out.append({"document": {"format": fmt, "name": name[:200], "source": {"bytes": p.data}}})
    return out


def translate_request(body: Mapping[str, Any]) -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[Any]]] = []
    has_tool_blocks = False
    for i, m in enumerate(messages_of(body)):
        role, where = m["role"], f"messages[{i}]"
        if role in ("system", "developer"):
            text = text_of(m.get("content"), f"{where}.content")
            if text:
                system.append({"text": text})
        elif role == "user":
            turns.append(("user", _content_blocks(content_parts(m.get("content"), f"{where}.content"),
                                                   f"{where}.content")))
        elif role == "assistant":
            blocks = _content_blocks(content_parts(m.get("content"), f"{where}.content"), f"{where}.content")
            for tc in tool_calls_of(m, where):
                has_tool_blocks = True
                blocks.append({"toolUse": {"toolUseId": tc.id, "name": tc.name, "input": tc.arguments}})
            turns.append(("assistant", blocks))
        elif role == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str) or not tid:
                raise BadRequest(f"{where}.tool_call_id is required", param=f"{where}.tool_call_id")
            has_tool_blocks = True
            text = text_of(m.get("content"), f"{where}.content")
            turns.append(("user", [{"toolResult": {"toolUseId": tid, "content": [{"text": text}]}}]))
        else:
            raise BadRequest(f"{where}: role '{role}' is not supported", param=f"{where}.role")
    merged = merge_turns(turns)
    for _role, blocks in merged:
        blocks.sort(key=lambda b: 0 if "toolResult" in b else 1)
    out: dict[str, Any] = {"messages": [{"role": r, "content": b} for r, b in merged]}
    if system:
        out["system"] = system
    inference: dict[str, Any] = {}
    max_tokens = int_param(body, "max_completion_tokens", "max_tokens")
    if max_tokens is not None:
        inference["maxTokens"] = max_tokens
    temperature = float_param(body, "temperature")
    if temperature is not None:
        inference["temperature"] = temperature
    top_p = float_param(body, "top_p")
    if top_p is not None:
        inference["topP"] = top_p
    stop = stop_of(body)
    if stop:
        inference["stopSequences"] = stop
    if inference:
        out["inferenceConfig"] = inference
    n = int_param(body, "n")
    if n is not None and n > 1:
        raise BadRequest("Bedrock Converse returns one choice; 'n' must be 1", param="n")
    tools = tools_of(body)
    choice = tool_choice_of(body)
    # Converse has no "none" tool choice: leave the tools out, unless the history holds tool blocks (then
    # Bedrock requires toolConfig and the model may still call a tool).
    if tools and (choice != "none" or has_tool_blocks):
        specs: list[dict[str, Any]] = []
        for t in tools:
            spec: dict[str, Any] = {
                "name": t.name,
                "inputSchema": {"json": t.parameters or {"type": "object", "properties": {}}},
            }
            if t.description:
                spec["description"] = t.description
            specs.append({"toolSpec": spec})
        tool_config: dict[str, Any] = {"tools": specs}
        if choice == "required":
            tool_config["toolChoice"] = {"any": {}}
        elif isinstance(choice, tuple):
            tool_config["toolChoice"] = {"tool": {"name": choice[1]}}
        # "auto" is the default and not every model accepts an explicit toolChoice, so it is not sent.
        out["toolConfig"] = tool_config
    rf = response_format_of(body)
    if rf is not None and rf.type == "json_schema" and rf.schema:
        js: dict[str, Any] = {"schema": orjson.dumps(rf.schema).decode()}
        if rf.name:
            js["name"] = rf.name
        if rf.description:
            js["description"] = rf.description
        out["outputConfig"] = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": js}}}
    return out


def translate_response(data: Any, public_model: str) -> tuple[bytes, Usage | None]:
    output = data.get("output") if isinstance(data, dict) else None
    message = output.get("message") if isinstance(output, dict) else None
    if not isinstance(data, dict) or not isinstance(message, dict):
        raise UpstreamError("Bedrock returned an unexpected body", status=502)
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in message.get("content") or []:
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            tu = block["toolUse"]
            args = orjson.dumps(tu.get("input") if tu.get("input") is not None else {}).decode()
            calls.append(tool_call_json(str(tu.get("toolUseId") or ""), str(tu.get("name") or ""), args))
    usage = usage_from(data.get("usage"))
    text = "".join(texts) if texts or not calls else None
    choice = choice_json(0, text, calls, finish_reason(data.get("stopReason")))
    return completion_json(new_completion_id(), public_model, [choice], usage), usage


def _exception_name(raw: str) -> str:
    # "ThrottlingException:http://internal.amazon.com/coral/..." or "com.amazon...#ThrottlingException"
    name = raw.split(":", 1)[0]
    name = name.rsplit("#", 1)[-1]
    return name[:1].upper() + name[1:]


def error_from_response(
    status: int, headers: Mapping[str, str], raw: bytes, provider_id: str, secrets: list[str | None]
) -> ProxyError:
    message: Any = None
    name = headers.get("x-amzn-errortype") or headers.get("X-Amzn-ErrorType") or ""
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, dict):
        message = data.get("message") or data.get("Message")
        if not name and isinstance(data.get("__type"), str):
            name = data["__type"]
    etype, code, _ = _ERRORS.get(_exception_name(name), (None, None, status)) if name else (None, None, status)
    if status == 408:
        status = 504
    elif status == 424:
        status = 502
    return upstream_error(status, headers, message, etype, code, None, provider_id, secrets, raw)


class BedrockStreamDecoder:
    """ConverseStream event-stream messages -> OpenAI chunks."""

    done: bool | None = None  # set by close(): the answer ended (a stop reason, or the upstream's error event)

    def __init__(self, public_model: str, client_wants_usage: bool, secrets: list[str | None],
                 provider_id: str = "bedrock") -> None:
        self._provider_id = provider_id
        self._frames = EventStreamDecoder()
        self._w = ChunkWriter(public_model)
        self._want_usage = client_wants_usage
        self._secrets = secrets
        self._tool_index: dict[int, int] = {}
        self._started = False
        self._finished = False
        self._usage_sent = False
        self._broken = False
        self.usage: Usage | None = None
        self.error: ProxyError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        if self._broken:
            return []
        try:
            messages = self._frames.feed(data)
        except EventStreamError as exc:
            self._broken = True
            return [self._fail(UpstreamError(f"Invalid event stream from upstream: {exc}", status=502))]
        out: list[bytes] = []
        for msg in messages:
            self._message(msg, out)
        return out

    def close(self) -> list[bytes]:
        out: list[bytes] = []
        if self._want_usage and self.usage is not None and self._finished and not self._usage_sent:
            self._usage_sent = True
            out.append(self._w.usage(self.usage))
        self.done = self._finished or self.error is not None  # also at `metadata`, the last event: no more reads
        return out

    def _fail(self, err: ProxyError) -> bytes:
        self.error = err
        return error_frame(err)

    def _message(self, msg: EventMessage, out: list[bytes]) -> None:
        mtype = msg.headers.get(":message-type", "event")
        if mtype == "exception":
            name = _exception_name(str(msg.headers.get(":exception-type") or "InternalServerException"))
            text: Any = "Bedrock stream error"
            try:
                body = orjson.loads(msg.payload) if msg.payload else {}
                if isinstance(body, dict) and isinstance(body.get("message"), str):
                    text = body["message"]
            except orjson.JSONDecodeError:
                pass
            etype, code, status = _ERRORS.get(name, ("api_error", None, 502))
            out.append(self._fail(upstream_error(status, {}, text, etype, code, None, self._provider_id,
                                                 self._secrets)))
            return
        if mtype == "error":
            text = msg.headers.get(":error-message") or msg.headers.get(":error-code") or "Bedrock stream error"
            out.append(self._fail(upstream_error(502, {}, text, None, None, None, self._provider_id, self._secrets)))
            return
        try:
            ev = orjson.loads(msg.payload) if msg.payload else {}
        except orjson.JSONDecodeError:
            return
        if not isinstance(ev, dict):
            return
        self._event(msg.headers.get(":event-type"), ev, out)

    def _event(self, kind: Any, ev: dict[str, Any], out: list[bytes]) -> None:
        w = self._w
        if kind == "messageStart":
            if not self._started:
                self._started = True
                out.append(w.role())
        elif kind == "contentBlockStart":
            start = ev.get("start")
            tu = start.get("toolUse") if isinstance(start, dict) else None
            if isinstance(tu, dict):
                idx = len(self._tool_index)
                self._tool_index[int(ev.get("contentBlockIndex") or 0)] = idx
                out.append(w.tool_start(idx, str(tu.get("toolUseId") or ""), str(tu.get("name") or "")))
        elif kind == "contentBlockDelta":
            delta = ev.get("delta")
            if not isinstance(delta, dict):
                return
            if isinstance(delta.get("text"), str) and delta["text"]:
                out.append(w.text(delta["text"]))
            elif isinstance(delta.get("toolUse"), dict):
                frag = delta["toolUse"].get("input")
                tidx = self._tool_index.get(int(ev.get("contentBlockIndex") or 0))
                if tidx is not None and isinstance(frag, str) and frag:
                    out.append(w.tool_args(tidx, frag))
        elif kind == "messageStop":
            if not self._finished:
                self._finished = True
                out.append(w.finish(finish_reason(ev.get("stopReason"))))
        elif kind == "metadata":
            self.usage = usage_from(ev.get("usage")) or self.usage
            out.extend(self.close())
        # contentBlockStop and unknown events carry nothing for the client


class BedrockProvider:
    """Credentials: a Bedrock API key (`api_key` / `api_key_file` / AWS_BEARER_TOKEN_BEDROCK) is sent as a bearer
    token; otherwise SigV4 with aws_access_key_id / aws_secret_access_key / aws_session_token, falling back to
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN."""

    def __init__(self, settings: ProviderSettings, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.settings = settings
        self.id = settings.id
        self.type = settings.type
        self.region = settings.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.base_url = (settings.base_url or f"https://bedrock-runtime.{self.region}.amazonaws.com").rstrip("/")
        self._headers = {"content-type": "application/json", **settings.headers}
        self._header_secrets = header_secrets(settings.headers)
        token = settings.api_key or env.get("AWS_BEARER_TOKEN_BEDROCK")
        self.signer: HeaderKeySigner | SigV4Signer
        if token or settings.api_key_file:
            self.signer = bearer(KeySource(token, settings.api_key_file), ("AWS_BEARER_TOKEN_BEDROCK",))
        else:
            self.signer = SigV4Signer.from_settings(
                settings.aws_access_key_id, settings.aws_secret_access_key, settings.aws_session_token,
                self.region, SIGNING_NAME, env,
            )

    def missing_credentials(self) -> list[str]:
        return self.signer.missing()

    def url_for(self, model_id: str, stream: bool) -> str:
        url = f"{self.base_url}/model/{quote(model_id, safe='')}/{'converse-stream' if stream else 'converse'}"
        # One canonical spelling of the path (yarl): the client sends it byte for byte, so it is the signed path.
        return str(yarl.URL(url))

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        if endpoint != "chat.completions":
            raise BadRequest(f"endpoint {endpoint} is not supported by provider type bedrock")
        payload = translate_request(body)
        return UpstreamRequest(
            "POST", self.url_for(target.upstream_model, stream), dict(self._headers), orjson.dumps(payload), stream,
            framing="aws-eventstream" if stream else "sse",
        )

    async def sign(self, request: UpstreamRequest) -> None:
        self.signer.apply(request)

    def parse_response(self, endpoint: Endpoint, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        data = load_upstream_json(raw, self.id)
        return translate_response(data, target.public_model)

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> BedrockStreamDecoder:
        return BedrockStreamDecoder(target.public_model, client_wants_usage, self.secrets(), self.id)

    def secrets(self) -> list[str | None]:
        return [*self.signer.secrets(), *self._header_secrets]

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        return error_from_response(status, headers, raw, self.id, self.secrets())


def create(settings: ProviderSettings) -> BedrockProvider:
    return BedrockProvider(settings)
