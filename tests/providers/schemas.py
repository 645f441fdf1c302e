"""Checks of wire bodies against each provider's own published schema (SDK types, botocore service model)."""

from __future__ import annotations

import base64
import collections.abc as cabc
import functools
from typing import Any

import botocore.session
from botocore.model import Shape, StructureShape
from botocore.validate import ParamValidator
from google.genai import types as gtypes
from pydantic import BaseModel, TypeAdapter

# --------------------------------------------------------------------------------------------------
# Anthropic: the SDK's TypedDicts. Pydantic ignores unknown TypedDict keys and validates Iterable fields
# lazily, so the validated value is materialised and must equal the input (an unknown key would be missing).
# --------------------------------------------------------------------------------------------------


def _materialise(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _materialise(x) for k, x in v.items()}
    if isinstance(v, BaseModel):
        return ("model-instead-of-param", type(v).__name__)
    if v is None or isinstance(v, str | bytes | int | float | bool):
        return v
    if isinstance(v, cabc.Iterable):
        return [_materialise(x) for x in v]
    return v


@functools.cache
def _anthropic_adapter(stream: bool) -> TypeAdapter[Any]:
    from anthropic.types.message_create_params import (
        MessageCreateParamsNonStreaming,
        MessageCreateParamsStreaming,
    )

    return TypeAdapter(MessageCreateParamsStreaming if stream else MessageCreateParamsNonStreaming)


def validate_anthropic_request(body: dict[str, Any]) -> None:
    value = _anthropic_adapter(bool(body.get("stream"))).validate_python(body)
    assert _materialise(value) == body, "body has keys the Messages API schema does not know"


def validate_anthropic_response(data: dict[str, Any]) -> None:
    from anthropic.types import Message

    Message.model_validate(data)


def validate_anthropic_event(data: dict[str, Any]) -> None:
    from anthropic.types import ErrorResponse, RawMessageStreamEvent

    if data["type"] == "ping":
        assert data == {"type": "ping"}
    elif data["type"] == "error":
        TypeAdapter(ErrorResponse).validate_python(data)
    else:
        TypeAdapter(RawMessageStreamEvent).validate_python(data)


def validate_anthropic_error(data: dict[str, Any]) -> None:
    from anthropic.types import ErrorResponse

    TypeAdapter(ErrorResponse).validate_python(data)


# --------------------------------------------------------------------------------------------------
# Gemini: google-genai pydantic models (extra="forbid", camelCase aliases accepted).
# --------------------------------------------------------------------------------------------------

GEMINI_TOP_LEVEL = {"contents", "systemInstruction", "tools", "toolConfig", "generationConfig", "safetySettings",
                    "cachedContent"}


def validate_gemini_request(body: dict[str, Any]) -> None:
    assert set(body) <= GEMINI_TOP_LEVEL, set(body) - GEMINI_TOP_LEVEL
    for c in body["contents"]:
        gtypes.Content.model_validate(c)
        assert c["role"] in ("user", "model")
    if "systemInstruction" in body:
        gtypes.Content.model_validate(body["systemInstruction"])
    for t in body.get("tools", []):
        gtypes.Tool.model_validate(t)
    if "toolConfig" in body:
        gtypes.ToolConfig.model_validate(body["toolConfig"])
    if "generationConfig" in body:
        gtypes.GenerateContentConfig.model_validate(body["generationConfig"])


def validate_gemini_embed_request(body: dict[str, Any]) -> None:
    assert set(body) == {"requests"}
    for r in body["requests"]:
        assert set(r) <= {"model", "content", "outputDimensionality", "taskType", "title"}
        gtypes.Content.model_validate(r["content"])
        if "outputDimensionality" in r:
            gtypes.EmbedContentConfig.model_validate({"outputDimensionality": r["outputDimensionality"]})


def validate_gemini_response(data: dict[str, Any]) -> None:
    gtypes.GenerateContentResponse.model_validate(data)


# --------------------------------------------------------------------------------------------------
# Bedrock: botocore's bedrock-runtime service model.
# --------------------------------------------------------------------------------------------------


@functools.cache
def bedrock_model() -> Any:
    return botocore.session.get_session().get_service_model("bedrock-runtime")


def _blobs_to_bytes(value: Any, shape: Shape) -> Any:
    """REST-JSON carries blobs as base64 strings; botocore's parameters hold bytes."""
    if shape.type_name == "blob" and isinstance(value, str):
        return base64.b64decode(value)
    if isinstance(shape, StructureShape) and isinstance(value, dict):
        if shape.is_document_type:
            return value
        return {k: _blobs_to_bytes(v, shape.members[k]) if k in shape.members else v for k, v in value.items()}
    if shape.type_name == "list" and isinstance(value, list):
        return [_blobs_to_bytes(v, shape.member) for v in value]
    return value


def validate_bedrock_request(model_id: str, body: dict[str, Any], operation: str = "Converse") -> None:
    op = bedrock_model().operation_model(operation)
    params = _blobs_to_bytes({"modelId": model_id, **body}, op.input_shape)
    report = ParamValidator().validate(params, op.input_shape)
    assert not report.has_errors(), report.generate_report()


def check_bedrock_shape(value: Any, shape: Shape, path: str = "", allow: frozenset[str] = frozenset()) -> None:
    """Every key of `value` must be a member of `shape` (recursively); for responses and stream events."""
    if isinstance(shape, StructureShape) and not shape.is_document_type:
        assert isinstance(value, dict), path
        for k, v in value.items():
            if k in allow:
                continue
            assert k in shape.members, f"{path}.{k} is not in {shape.name}"
            check_bedrock_shape(v, shape.members[k], f"{path}.{k}", allow)
    elif shape.type_name == "list":
        assert isinstance(value, list), path
        for i, v in enumerate(value):
            check_bedrock_shape(v, shape.member, f"{path}[{i}]", allow)
    elif shape.type_name == "string":
        assert isinstance(value, str), path
        if shape.enum:
            assert value in shape.enum, f"{path}: {value} not in {shape.enum}"
    elif shape.type_name in ("integer", "long"):
        assert isinstance(value, int), path


def check_bedrock_response(data: dict[str, Any]) -> None:
    check_bedrock_shape(data, bedrock_model().operation_model("Converse").output_shape)


def check_bedrock_event(event_type: str, payload: dict[str, Any]) -> None:
    stream = bedrock_model().operation_model("ConverseStream").output_shape.members["stream"]
    # Bedrock pads events with a random "p" field to hide payload lengths.
    check_bedrock_shape(payload, stream.members[event_type], event_type, allow=frozenset({"p"}))
