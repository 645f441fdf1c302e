"""Google Gemini API (generativelanguage) translator: generateContent, streamGenerateContent and batchEmbedContents."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import orjson

from ..config import ProviderSettings
from ..errors import BadRequest, ProxyError, UpstreamError
from ..types import Usage
from .base import Endpoint, Target, UpstreamRequest
from .chat_common import (
    GENERATED_TOOL_ID_PREFIX,
    ChunkWriter,
    Part,
    choice_json,
    completion_id,
    completion_json,
    content_parts,
    embeddings_json,
    error_frame,
    float_param,
    int_param,
    load_upstream_json,
    merge_turns,
    messages_of,
    new_tool_call_id,
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
from .upstream_errors import status_from, upstream_error

DEFAULT_API_VERSION = "v1beta"

# Google's documented stand-in for a missing thought signature on replayed function calls (Gemini 3+).
SKIP_SIGNATURE = "skip_thought_signature_validator"

FINISH_REASONS: dict[str, str] = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
}

_STATUS_TYPES: dict[str, tuple[str, str | None]] = {
    "INVALID_ARGUMENT": ("invalid_request_error", None),
    "FAILED_PRECONDITION": ("invalid_request_error", None),
    "OUT_OF_RANGE": ("invalid_request_error", None),
    "NOT_FOUND": ("invalid_request_error", "model_not_found"),
    "RESOURCE_EXHAUSTED": ("rate_limit_error", "rate_limit_exceeded"),
    "INTERNAL": ("api_error", None),
    "UNAVAILABLE": ("api_error", "service_unavailable"),
    "DEADLINE_EXCEEDED": ("api_error", "upstream_timeout"),
}

_OLD_MODELS = re.compile(r"(^|/)gemini-(1|2)(\.|-)")


def model_path(upstream_model: str) -> str:
    """`gemini-2.5-flash` and `models/gemini-2.5-flash` -> `models/gemini-2.5-flash`; `tunedModels/x` unchanged."""
    m = upstream_model.strip().strip("/")
    if m.startswith("models/"):
        m = m[len("models/") :]
    if "/" in m:  # tunedModels/..., or another resource name
        return m
    return "models/" + m


def finish_reason(reason: Any, has_tool_calls: bool) -> str:
    if has_tool_calls and reason in (None, "STOP"):
        return "tool_calls"
    return FINISH_REASONS.get(reason, "stop") if isinstance(reason, str) else "stop"


def usage_from(meta: Any) -> Usage | None:
    """prompt = promptTokenCount (+ tool-use prompt); completion = candidates + thoughts; cached from cache count."""
    if not isinstance(meta, dict):
        return None
    prompt = token_count(meta, "promptTokenCount") + token_count(meta, "toolUsePromptTokenCount")
    completion = token_count(meta, "candidatesTokenCount") + token_count(meta, "thoughtsTokenCount")
    cached = token_count(meta, "cachedContentTokenCount") if meta.get("cachedContentTokenCount") is not None else None
    return Usage(prompt, completion, prompt + completion, cached)


# --------------------------------------------------------------------------------------------------
# JSON Schema -> Gemini Schema (the OpenAPI 3.0 subset accepted in functionDeclarations.parameters)
# --------------------------------------------------------------------------------------------------

_TYPES = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER", "boolean": "BOOLEAN", "array": "ARRAY",
          "object": "OBJECT", "null": "NULL"}
_FORMATS = {"STRING": {"enum", "date-time"}, "NUMBER": {"float", "double"}, "INTEGER": {"int32", "int64"}}
_COPY = ("description", "title", "pattern", "example", "default", "minimum", "maximum")
_COPY_INT = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties")
_MAX_DEPTH = 32


def to_gemini_schema(schema: Any, defs: Mapping[str, Any] | None = None, depth: int = 0) -> dict[str, Any]:
    """Convert a JSON Schema to Gemini's Schema: upper-case types, nullable instead of null unions, local $refs
    inlined, oneOf -> anyOf, unsupported keywords (additionalProperties, $schema, const of non-strings...) dropped."""
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return {"type": "OBJECT"} if depth > _MAX_DEPTH else {}
    if defs is None:
        defs = {**(schema.get("definitions") or {}), **(schema.get("$defs") or {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        name = ref.rsplit("/", 1)[-1]
        if ref.startswith(("#/$defs/", "#/definitions/")) and name in defs:
            merged = {**defs[name], **{k: v for k, v in schema.items() if k != "$ref"}}
            return to_gemini_schema(merged, defs, depth + 1)
        return {"type": "OBJECT"}
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and all_of:
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for sub in all_of:
            if isinstance(sub, dict):
                resolved = sub
                if isinstance(sub.get("$ref"), str) and sub["$ref"].rsplit("/", 1)[-1] in defs:
                    resolved = defs[sub["$ref"].rsplit("/", 1)[-1]]
                for k, v in resolved.items():
                    if k == "properties" and isinstance(v, dict):
                        merged["properties"] = {**(merged.get("properties") or {}), **v}
                    elif k == "required" and isinstance(v, list):
                        merged["required"] = [*(merged.get("required") or []), *v]
                    else:
                        merged.setdefault(k, v)
        return to_gemini_schema(merged, defs, depth + 1)

    out: dict[str, Any] = {}
    nullable = schema.get("nullable") is True
    t = schema.get("type")
    types = t if isinstance(t, list) else [t] if isinstance(t, str) else []
    if "null" in types:
        nullable = True
        types = [x for x in types if x != "null"]
    variants = schema.get("anyOf") or schema.get("oneOf")
    if len(types) > 1 and not variants:
        variants = [{**schema, "type": x} for x in types]
        types = []
    if isinstance(variants, list) and variants:
        subs = []
        for v in variants:
            if isinstance(v, dict) and v.get("type") == "null":
                nullable = True
                continue
            subs.append(to_gemini_schema({k: val for k, val in v.items()}, defs, depth + 1) if isinstance(v, dict)
                        else {})
        if len(subs) == 1:
            out.update(subs[0])
        elif subs:
            out["anyOf"] = subs
        for k in ("description", "title"):
            if isinstance(schema.get(k), str):
                out.setdefault(k, schema[k])
        if nullable:
            out["nullable"] = True
        return out
    gtype = _TYPES.get(types[0]) if types else None
    if gtype is None:
        if isinstance(schema.get("properties"), dict):
            gtype = "OBJECT"
        elif "items" in schema:
            gtype = "ARRAY"
        elif "enum" in schema or "const" in schema:
            gtype = "STRING"
    if gtype:
        out["type"] = gtype
    for k in _COPY:
        if k in schema and schema[k] is not None:
            out[k] = schema[k]
    for k in _COPY_INT:
        if isinstance(schema.get(k), int) and not isinstance(schema.get(k), bool):
            out[k] = schema[k]
    fmt = schema.get("format")
    if isinstance(fmt, str) and fmt in _FORMATS.get(gtype or "", set()):
        out["format"] = fmt
    enum = schema.get("enum")
    if enum is None and "const" in schema:
        enum = [schema["const"]]
    if isinstance(enum, list) and enum and all(isinstance(e, str) for e in enum) and gtype == "STRING":
        out["enum"] = enum
        out["format"] = "enum"
    if gtype == "OBJECT" and isinstance(schema.get("properties"), dict):
        props = {str(k): to_gemini_schema(v, defs, depth + 1) for k, v in schema["properties"].items()}
        out["properties"] = props
        req = schema.get("required")
        if isinstance(req, list):
            kept = [r for r in req if isinstance(r, str) and r in props]
            if kept:
                out["required"] = kept
    if gtype == "ARRAY":
        items = schema.get("items")
        out["items"] = to_gemini_schema(items, defs, depth + 1) if isinstance(items, dict) else {"type": "STRING"}
    if nullable:
        out["nullable"] = True
    return out


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------


def _parts(parts: list[Part]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for p in parts:
        if p.kind == "text":
            out.append({"text": p.text})
        elif p.url is not None:
            out.append({"fileData": {"mimeType": p.mime or "image/jpeg", "fileUri": p.url}})
        else:
            out.append({"inlineData": {"mimeType": p.mime or "application/octet-stream", "data": p.data}})
    return out


def _signature(raw: Mapping[str, Any]) -> str | None:
    """The thought signature a client sends back on a tool call (`extra_content.google.thought_signature`)."""
    extra = raw.get("extra_content")
    google = extra.get("google") if isinstance(extra, dict) else None
    sig = google.get("thought_signature") if isinstance(google, dict) else None
    return sig if isinstance(sig, str) and sig else None


def _function_response(content: Any, where: str) -> dict[str, Any]:
    text = text_of(content, where)
    try:
        value = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        value = None
    return value if isinstance(value, dict) else {"output": text}


def translate_request(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    system: list[dict[str, Any]] = []
    turns: list[tuple[str, list[Any]]] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, for functionResponse
    sign_missing = not _OLD_MODELS.search(model)
    for i, m in enumerate(messages_of(body)):
        role, where = m["role"], f"messages[{i}]"
        if role in ("system", "developer"):
            text = text_of(m.get("content"), f"{where}.content")
            if text:
                system.append({"text": text})
        elif role == "user":
            turns.append(("user", _parts(content_parts(m.get("content"), f"{where}.content"))))
        elif role == "assistant":
            blocks = _parts(content_parts(m.get("content"), f"{where}.content"))
            calls = tool_calls_of(m, where)
            signed = any(_signature(tc.raw) for tc in calls)
            for k, tc in enumerate(calls):
                names[tc.id] = tc.name
                fc: dict[str, Any] = {"name": tc.name, "args": tc.arguments}
                if not tc.id.startswith(GENERATED_TOOL_ID_PREFIX):
                    fc["id"] = tc.id
                part: dict[str, Any] = {"functionCall": fc}
                sig = _signature(tc.raw)
                if sig:
                    part["thoughtSignature"] = sig
                elif k == 0 and not signed and sign_missing:
                    part["thoughtSignature"] = SKIP_SIGNATURE
                blocks.append(part)
            turns.append(("model", blocks))
        elif role == "tool":
            tid = m.get("tool_call_id")
            name = names.get(tid) if isinstance(tid, str) else None
            name = name or (m.get("name") if isinstance(m.get("name"), str) else None)
            if not name:
                raise BadRequest(f"{where}: tool_call_id does not match a tool call of an earlier assistant message",
                                 param=f"{where}.tool_call_id")
            fr: dict[str, Any] = {"name": name, "response": _function_response(m.get("content"), f"{where}.content")}
            if isinstance(tid, str) and tid and not tid.startswith(GENERATED_TOOL_ID_PREFIX):
                fr["id"] = tid
            turns.append(("user", [{"functionResponse": fr}]))
        else:
            raise BadRequest(f"{where}: role '{role}' is not supported", param=f"{where}.role")
    out: dict[str, Any] = {"contents": [{"role": r, "parts": b} for r, b in merge_turns(turns)]}
    if system:
        out["systemInstruction"] = {"parts": system}
    tools = tools_of(body)
    choice = tool_choice_of(body)
    if tools:
        decls: list[dict[str, Any]] = []
        for t in tools:
            decl: dict[str, Any] = {"name": t.name}
            if t.description:
                decl["description"] = t.description
            params = to_gemini_schema(t.parameters) if t.parameters else {}
            if params.get("properties"):  # an OBJECT without properties is rejected; omit for no-arg functions
                decl["parameters"] = params
            decls.append(decl)
        out["tools"] = [{"functionDeclarations": decls}]
        fcc: dict[str, Any] | None = None
        if choice == "auto":
            fcc = {"mode": "AUTO"}
        elif choice == "none":
            fcc = {"mode": "NONE"}
        elif choice == "required":
            fcc = {"mode": "ANY"}
        elif isinstance(choice, tuple):
            fcc = {"mode": "ANY", "allowedFunctionNames": [choice[1]]}
        if fcc is not None:
            out["toolConfig"] = {"functionCallingConfig": fcc}
    gen: dict[str, Any] = {}
    for src, dst in (("temperature", "temperature"), ("top_p", "topP"), ("presence_penalty", "presencePenalty"),
                     ("frequency_penalty", "frequencyPenalty")):
        v = float_param(body, src)
        if v is not None:
            gen[dst] = v
    max_tokens = int_param(body, "max_completion_tokens", "max_tokens")
    if max_tokens is not None:
        gen["maxOutputTokens"] = max_tokens
    stop = stop_of(body)
    if stop:
        gen["stopSequences"] = stop
    n = int_param(body, "n")
    if n is not None and n != 1:
        gen["candidateCount"] = n
    seed = int_param(body, "seed")
    if seed is not None:
        gen["seed"] = seed
    rf = response_format_of(body)
    if rf is not None and rf.type != "text":
        gen["responseMimeType"] = "application/json"
        if rf.schema:
            gen["responseSchema"] = to_gemini_schema(rf.schema)
    if gen:
        out["generationConfig"] = gen
    return out


def translate_embeddings(body: Mapping[str, Any], model: str) -> dict[str, Any]:
    inp = body.get("input")
    texts = [inp] if isinstance(inp, str) else inp
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise BadRequest("'input' must be a string or an array of strings for this provider", param="input")
    dims = int_param(body, "dimensions")
    path = model_path(model)
    reqs: list[dict[str, Any]] = []
    for t in texts:
        r: dict[str, Any] = {"model": path, "content": {"parts": [{"text": t}]}}
        if dims:
            r["outputDimensionality"] = dims
        reqs.append(r)
    return {"requests": reqs}


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------


def _tool_call(part: Mapping[str, Any]) -> dict[str, Any]:
    fc = part["functionCall"]
    tid = fc.get("id") if isinstance(fc.get("id"), str) and fc.get("id") else new_tool_call_id()
    args = orjson.dumps(fc.get("args") if fc.get("args") is not None else {}).decode()
    extra = None
    if isinstance(part.get("thoughtSignature"), str):
        extra = {"extra_content": {"google": {"thought_signature": part["thoughtSignature"]}}}
    return tool_call_json(str(tid), str(fc.get("name") or ""), args, extra)


def translate_response(data: Any, public_model: str) -> tuple[bytes, Usage | None]:
    if not isinstance(data, dict):
        raise UpstreamError("Gemini returned an unexpected body", status=502)
    choices: list[dict[str, Any]] = []
    for pos, cand in enumerate(data.get("candidates") or []):
        if not isinstance(cand, dict):
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        content = cand.get("content") if isinstance(cand.get("content"), dict) else {}
        assert isinstance(content, dict)
        for part in content.get("parts") or []:
            if not isinstance(part, dict) or part.get("thought") is True:
                continue
            if isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif isinstance(part.get("functionCall"), dict):
                calls.append(_tool_call(part))
        index: int = cand["index"] if isinstance(cand.get("index"), int) else pos
        text = "".join(texts) if texts or not calls else None
        choices.append(choice_json(index, text, calls, finish_reason(cand.get("finishReason"), bool(calls))))
    if not choices:
        # The prompt itself was blocked (promptFeedback.blockReason).
        choices.append(choice_json(0, "", [], "content_filter"))
    usage = usage_from(data.get("usageMetadata"))
    return completion_json(completion_id(data.get("responseId")), public_model, choices, usage), usage


def error_from_body(
    status: int, headers: Mapping[str, str], raw: bytes, provider_id: str, secrets: list[str | None]
) -> ProxyError:
    message: Any = None
    gstatus: str | None = None
    retry_delay: str | None = None
    key_invalid = False
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        data = None
    if isinstance(data, list) and data:  # streamed errors sometimes arrive as a one-element array
        data = data[0]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict):
        message = err.get("message")
        gstatus = err.get("status") if isinstance(err.get("status"), str) else None
        for d in err.get("details") or []:
            if not isinstance(d, dict):
                continue
            if d.get("reason") in ("API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED"):
                key_invalid = True
            if isinstance(d.get("retryDelay"), str):
                retry_delay = d["retryDelay"]
    if key_invalid or gstatus in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        status = 401 if status not in (401, 403) else status
    out_headers = {h: v for h in ("retry-after", "retry-after-ms") if (v := headers.get(h))}
    if status == 429 and retry_delay and "retry-after" not in out_headers:
        try:
            out_headers["retry-after"] = str(math.ceil(float(retry_delay.rstrip("s"))))
        except (ValueError, OverflowError):
            pass
    etype, code = _STATUS_TYPES.get(gstatus or "", (None, None))
    if gstatus == "DEADLINE_EXCEEDED":
        status = 504
    return upstream_error(status, out_headers, message, etype, code, None, provider_id, secrets, raw)


class GeminiStreamDecoder:
    """streamGenerateContent?alt=sse events (each a GenerateContentResponse) -> OpenAI chunks."""

    done: bool | None = None  # set by close(): the answer ended (a stop reason, or the upstream's error event)

    def __init__(
        self, public_model: str, client_wants_usage: bool, secrets: list[str | None], provider_id: str = "gemini"
    ) -> None:
        self._provider_id = provider_id
        self._split = SSESplitter()
        self._w = ChunkWriter(public_model)
        self._want_usage = client_wants_usage
        self._secrets = secrets
        self._started: set[int] = set()
        self._tools: dict[int, int] = {}  # choice index -> tool calls so far
        self._finished: set[int] = set()
        self._usage_sent = False
        self._id_set = False
        self.usage: Usage | None = None
        self.error: ProxyError | None = None

    def feed(self, data: bytes) -> list[bytes]:
        return self._events(self._split.feed(data))

    def close(self) -> list[bytes]:
        out = self._events(self._split.close())
        if self._want_usage and self.usage is not None and not self._usage_sent and self._finished:
            self._usage_sent = True
            out.append(self._w.usage(self.usage))
        self.done = bool(self._finished) or self.error is not None
        return out

    def _events(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        out: list[bytes] = []
        for _name, payload in events:
            if not payload:
                continue
            try:
                data = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if isinstance(data, dict):
                self._chunk(data, out)
        return out

    def _chunk(self, data: dict[str, Any], out: list[bytes]) -> None:
        w = self._w
        if isinstance(data.get("error"), dict):
            self.error = error_from_body(status_from(data["error"].get("code")), {}, orjson.dumps(data),
                                         self._provider_id, self._secrets)
            out.append(error_frame(self.error))
            return
        if not self._id_set and isinstance(data.get("responseId"), str):
            w.id = completion_id(data["responseId"])
            self._id_set = True
        self.usage = usage_from(data.get("usageMetadata")) or self.usage
        candidates = data.get("candidates")
        if not candidates and isinstance(data.get("promptFeedback"), dict) and data["promptFeedback"].get(
                "blockReason"):
            if 0 not in self._started:
                self._started.add(0)
                out.append(w.role(0))
            if 0 not in self._finished:
                self._finished.add(0)
                out.append(w.finish("content_filter", 0))
            return
        for pos, cand in enumerate(candidates or []):
            if not isinstance(cand, dict):
                continue
            index: int = cand["index"] if isinstance(cand.get("index"), int) else pos
            if index not in self._started:
                self._started.add(index)
                out.append(w.role(index))
            content = cand.get("content")
            for part in (content.get("parts") if isinstance(content, dict) else None) or []:
                if not isinstance(part, dict) or part.get("thought") is True:
                    continue
                if isinstance(part.get("text"), str) and part["text"]:
                    out.append(w.text(part["text"], index))
                elif isinstance(part.get("functionCall"), dict):
                    call = _tool_call(part)
                    k = self._tools.get(index, 0)
                    self._tools[index] = k + 1
                    fn = call.pop("function")
                    extra = call.get("extra_content")
                    out.append(w.tool_start(k, call["id"], fn["name"], fn["arguments"],
                                            {"extra_content": extra} if extra else None, index))
            reason = cand.get("finishReason")
            if reason and index not in self._finished:
                self._finished.add(index)
                out.append(w.finish(finish_reason(reason, self._tools.get(index, 0) > 0), index))


class GeminiProvider:
    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings
        self.id = settings.id
        self.type = settings.type
        base = (settings.base_url or "https://generativelanguage.googleapis.com").rstrip("/")
        if not re.search(r"/v\d+(alpha|beta)?\d*$", base):
            base += "/" + (settings.api_version or DEFAULT_API_VERSION)
        self.base_url = base
        self.signer = HeaderKeySigner("x-goog-api-key", KeySource(settings.api_key, settings.api_key_file),
                                      ("GEMINI_API_KEY", "GOOGLE_API_KEY"))
        self._header_secrets = header_secrets(settings.headers)
        self._headers = {"content-type": "application/json", **settings.headers}

    def missing_credentials(self) -> list[str]:
        return self.signer.missing()

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        path = quote(model_path(target.upstream_model), safe="/")
        if endpoint == "embeddings":
            payload = translate_embeddings(body, target.upstream_model)
            req = UpstreamRequest("POST", f"{self.base_url}/{path}:batchEmbedContents", dict(self._headers),
                                  orjson.dumps(payload), False)
            fmt = body.get("encoding_format")
            req.extra["encoding_format"] = fmt if fmt in ("float", "base64") else "float"
            return req
        if endpoint != "chat.completions":
            raise BadRequest(f"endpoint {endpoint} is not supported by provider type gemini")
        payload = translate_request(body, target.upstream_model)
        if stream:
            url = f"{self.base_url}/{path}:streamGenerateContent?alt=sse"
        else:
            url = f"{self.base_url}/{path}:generateContent"
        return UpstreamRequest("POST", url, dict(self._headers), orjson.dumps(payload), stream)

    async def sign(self, request: UpstreamRequest) -> None:
        self.signer.apply(request)

    def parse_response(self, endpoint: Endpoint, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        data = load_upstream_json(raw, self.id)
        if endpoint == "embeddings":
            embs = data.get("embeddings") if isinstance(data, dict) else None
            if not isinstance(embs, list):
                raise UpstreamError("Gemini returned an unexpected embeddings body", status=502)
            vectors = [list(e.get("values") or []) for e in embs if isinstance(e, dict)]
            usage = usage_from(data.get("usageMetadata")) if isinstance(data, dict) else None
            # The proxy cannot see the request's encoding_format here: floats are always valid for OpenAI clients
            # (the SDK only decodes strings); see UpstreamRequest.extra["encoding_format"].
            return embeddings_json(vectors, target.public_model, "float", usage), usage
        return translate_response(data, target.public_model)

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> GeminiStreamDecoder:
        return GeminiStreamDecoder(target.public_model, client_wants_usage, self.secrets(), self.id)

    def secrets(self) -> list[str | None]:
        return [*self.signer.secrets(), *self._header_secrets]

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        return error_from_body(status, headers, raw, self.id, self.secrets())


def create(settings: ProviderSettings) -> GeminiProvider:
    return GeminiProvider(settings)
