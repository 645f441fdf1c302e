"""Whatever JSON a client sends, the agent-API translators answer with the neutral body or a 400: never another
exception (which would be a 500), and never a change to the request."""

from __future__ import annotations

import copy
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_proxy.errors import BadRequest
from llm_proxy.ingress import anthropic_messages as am
from llm_proxy.ingress import responses_api as ra

_KEYS = ["type", "role", "content", "text", "call_id", "name", "arguments", "output", "image_url", "source",
         "media_type", "data", "url", "tool_use_id", "input", "id", "is_error", "format", "schema", "parameters",
         "input_schema", "file_data", "detail", "effort"]
_WORDS = ["message", "user", "assistant", "system", "developer", "function_call", "function_call_output",
          "input_text", "input_image", "input_file", "output_text", "text", "image", "document", "tool_use",
          "tool_result", "base64", "url", "function", "json_schema", "json_object", "auto", "any", "tool", "none"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False, width=32) | st.sampled_from(_WORDS),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(_KEYS), inner, max_size=5),
    max_leaves=25,
)


def _check(translate: Any, body: dict[str, Any]) -> None:
    before = copy.deepcopy(body)
    try:
        out = translate(body)
    except BadRequest:
        pass
    else:
        orjson.dumps(out)  # serialisable as the upstream request will be
    assert body == before


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"model": st.just("m")}, optional={
    "input": json_values, "instructions": json_values, "tools": json_values, "tool_choice": json_values,
    "text": json_values, "max_output_tokens": json_values, "temperature": json_values, "reasoning": json_values,
    "stream": json_values, "parallel_tool_calls": json_values}))
def test_responses_requests(body: dict[str, Any]) -> None:
    _check(ra.to_chat, body)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({"model": st.just("m"), "max_tokens": st.just(5)}, optional={
    "messages": json_values, "system": json_values, "tools": json_values, "tool_choice": json_values,
    "stop_sequences": json_values, "temperature": json_values, "metadata": json_values, "stream": json_values}))
def test_messages_requests(body: dict[str, Any]) -> None:
    _check(am.to_chat, body)
