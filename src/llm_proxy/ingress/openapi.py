"""The OpenAPI 3.1 document of the API the proxy serves (`GET /openapi.json`), built from ingress/schema.py.

The OpenAI request bodies are the very schemas the handlers validate against, so the document cannot drift from
the code. The agent APIs' (Responses, Messages) are described by their top-level fields: their translators
(ingress/responses_api.py, anthropic_messages.py) check the rest, naming the field. Responses are described as far
as the proxy itself guarantees them: OpenAI's shapes for the model list, health and version, and the error envelope
(Anthropic's on the Messages routes) for every error status.
"""

from __future__ import annotations

import functools
from typing import Any

from .. import __version__
from .schema import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, MAX_STOP, MAX_TOKENS

Schema = dict[str, Any]

ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_MODEL: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

_STATUS: Schema = {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}}

# Statuses any protected operation may answer with, besides its own (all in the error envelope).
_ERRORS = {
    "400": "Invalid request (malformed JSON, a missing or invalid field)",
    "401": "Missing or invalid credentials",
    "403": "The caller may not use this model",
    "404": "Unknown model",
    "413": "Request body over the configured limit",
    "415": "Request body is not JSON",
    "429": "Rate limited (by the proxy or the upstream)",
    "502": "Upstream failed or answered what could not be read",
    "503": "A provider or the identity provider is unavailable",
    "504": "Upstream timed out",
}


_OBJECTS: Schema = {"type": "array", "items": {"type": "object"}}
_TEXT_OR_PARTS: Schema = {"anyOf": [{"type": "string"}, _OBJECTS]}

RESPONSES: Schema = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": {"type": "string"},
        "input": _TEXT_OR_PARTS,
        "instructions": {"anyOf": [{"type": "string"}, _OBJECTS, {"type": "null"}]},
        "previous_response_id": {"type": ["string", "null"],
                                 "description": "A stored response of the caller's (usage.store_completions)"},
        "store": {"type": ["boolean", "null"], "description": "Keep the response (default false)"},
        "stream": {"type": ["boolean", "null"]},
        "tools": {"type": "array", "items": {"type": "object", "required": ["type"],
                                             "properties": {"type": {"const": "function"}}}},
        "tool_choice": {"anyOf": [{"enum": ["auto", "none", "required"]}, {"type": "object"}]},
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "max_output_tokens": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_TOKENS},
        "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": 2},
        "top_p": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
        "text": {"type": "object"},
        "reasoning": {"type": ["object", "null"]},
        "metadata": {"type": ["object", "null"]},
        "user": {"type": "string"},
    },
}

_MESSAGE: Schema = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {"role": {"enum": ["user", "assistant"]}, "content": _TEXT_OR_PARTS},
}
_MESSAGES_PROMPT: dict[str, Schema] = {
    "model": {"type": "string"},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "system": _TEXT_OR_PARTS,
    "tools": _OBJECTS,
    "tool_choice": {"type": "object"},
}
MESSAGES: Schema = {
    "type": "object",
    "required": ["model", "max_tokens", "messages"],
    "properties": {
        **_MESSAGES_PROMPT,
        "max_tokens": {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
        "stop_sequences": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        "stream": {"type": "boolean"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1},
        "metadata": {"type": "object"},
    },
}
COUNT_TOKENS: Schema = {"type": "object", "required": ["model", "messages"], "properties": _MESSAGES_PROMPT}

ANTHROPIC_ERROR: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {"type": "object", "required": ["type", "message"],
                  "properties": {"type": {"type": "string"}, "message": {"type": "string"}}},
    },
}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_responses() -> dict[str, Any]:
    return {code: _json({"$ref": "#/components/schemas/Error"}, text) for code, text in _ERRORS.items()}


def _create(name: str, summary: str, stream: bool, *, events: str = "Server-sent events ending with data: [DONE]",
            answer: str = "The upstream's answer, in OpenAI's shape, with the requested model id",
            anthropic: bool = False) -> Schema:
    ok: Schema = _json({"type": "object"}, answer)
    if stream:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"}, "description": events}
    errors = _error_responses()
    if anthropic:  # Anthropic's envelope; the key as x-api-key (the anthropic SDK's) or a bearer token
        errors = {code: _json({"$ref": "#/components/schemas/AnthropicError"}, r["description"])
                  for code, r in errors.items()}
    return {
        "post": {
            "operationId": f"create{name}",
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}] if anthropic else [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}Request"}}},
            },
            "responses": {"200": ok, **errors},
        }
    }


def _get(op_id: str, summary: str, schema: Schema, *, protected: bool, extra: dict[str, Any] | None = None) -> Schema:
    op: Schema = {"operationId": op_id, "summary": summary, "responses": {"200": _json(schema, summary)}}
    if protected:
        op["security"] = [{"bearer": []}]
        op["responses"].update({k: v for k, v in _error_responses().items() if k in ("401", "403", "404", "503")})
    if extra:
        op.update(extra)
    return {"get": op}


@functools.cache
def document() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/v1/chat/completions": _create("ChatCompletion", "Create a chat completion (streamed or not)", True),
        "/v1/completions": _create("Completion", "Create a (legacy) completion", True),
        "/v1/embeddings": _create("Embedding", "Create embeddings", False),
        "/v1/responses": _create(
            "Response", "Create a model response (OpenAI's Responses API)", True,
            answer="A Response object", events="Responses events (response.created ... response.completed)"),
        "/v1/responses/{response_id}": _get(
            "retrieveResponse", "A stored response (store: true) of the caller's", {"type": "object"}, protected=True,
            extra={"parameters": [{"name": "response_id", "in": "path", "required": True,
                                   "schema": {"type": "string"}}]}),
        "/v1/messages": _create(
            "Message", "Create a message (Anthropic's Messages API)", True, anthropic=True,
            answer="A Message object", events="Anthropic's events (message_start ... message_stop)"),
        "/v1/messages/count_tokens": _create(
            "CountTokens", "Count the tokens of a Messages request (no upstream is asked)", False, anthropic=True,
            answer="{input_tokens}"),
        "/v1/models": _get(
            "listModels", "The models the caller may use",
            {"type": "object", "required": ["object", "data"],
             "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}},
            protected=True),
        "/v1/models/{model}": _get(
            "retrieveModel", "One model", _MODEL, protected=True,
            extra={"parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]}),
        "/v1/health": _get("health", "Startup probe", _STATUS, protected=False),
        "/v1/health/live": _get("live", "Liveness", _STATUS, protected=False),
        "/v1/version": _get("version", "The proxy's version",
                            {"type": "object", "required": ["version"], "properties": {"version": {"type": "string"}}},
                            protected=False),
        "/v1/client-config": _get(
            "clientConfig", "What IDE clients read",
            {"type": "object", "required": ["model", "enabled"],
             "properties": {"model": {"type": "string"}, "enabled": {"enum": ["true", "false"]}}},
            protected=False),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "llm-proxy",
            "version": __version__,
            "description": "OpenAI-compatible LLM gateway. Every path is also served under /v1/openai/v1/...",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
            "schemas": {
                "Error": ERROR,
                "AnthropicError": ANTHROPIC_ERROR,
                "ResponseRequest": RESPONSES,
                "MessageRequest": MESSAGES,
                "CountTokensRequest": COUNT_TOKENS,
                "ChatCompletionRequest": CHAT_COMPLETIONS,
                "CompletionRequest": COMPLETIONS,
                "EmbeddingRequest": EMBEDDINGS,
            },
        },
    }
