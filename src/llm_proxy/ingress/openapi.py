"""The OpenAPI 3.1 document of the API the proxy serves (`GET /openapi.json`), built from ingress/schema.py.

The request bodies are the very schemas the handlers validate against, so the document cannot drift from the
code. Responses are described as far as the proxy itself guarantees them: OpenAI's shapes for the model list,
health and version, and the error envelope for every error status.
"""

from __future__ import annotations

import functools
from typing import Any

from .. import __version__
from .schema import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS

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


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_responses() -> dict[str, Any]:
    return {code: _json({"$ref": "#/components/schemas/Error"}, text) for code, text in _ERRORS.items()}


def _create(name: str, summary: str, stream: bool) -> Schema:
    ok: Schema = _json({"type": "object"}, "The upstream's answer, in OpenAI's shape, with the requested model id")
    if stream:
        ok["content"]["text/event-stream"] = {"schema": {"type": "string"},
                                              "description": "Server-sent events ending with data: [DONE]"}
    return {
        "post": {
            "operationId": f"create{name}",
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}Request"}}},
            },
            "responses": {"200": ok, **_error_responses()},
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": ERROR,
                "ChatCompletionRequest": CHAT_COMPLETIONS,
                "CompletionRequest": COMPLETIONS,
                "EmbeddingRequest": EMBEDDINGS,
            },
        },
    }
