"""The generated request-body checks (what the request path runs) give compile_schema()'s verdicts."""

from __future__ import annotations

from typing import Any

import pytest

from llm_proxy.errors import BadRequest
from llm_proxy.ingress.schema import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    MAX_TOKENS,
    VALIDATORS,
    compile_schema,
    generated_checks,
)

_SCALARS: list[Any] = [
    None, True, False, 0, 1, -1, 2, 3, 4, 5, 19, 20, 21, 128, 129, 2048, 65536, 65537, MAX_TOKENS, MAX_TOKENS + 1,
    -2, -2.5, -3, 0.0, 0.5, 1.0, 1.5, 2.0, 2.0001, 1e300, -1e300, float("nan"), float("inf"), float("-inf"),
    "", "a", "x" * 256, "x" * 257, "none", "auto", "required", "float", "base64", "int8",
]
_CONTAINERS: list[Any] = [
    [], [""], ["a"], ["a"] * 4, ["a"] * 5, [1], [1, 2], [True], [1.5], [[1]], [[]], [None], ["a", 1],
    [{}], [{"role": "user"}], [{"role": "user", "content": "hi"}], [{"role": 1}], [{"content": "x"}],
    [{"role": "user"}, "x"], [{"role": "user"}, {"role": None}], ["a"] * 2049, [1] * 2048,
    {}, {"a": 1}, {"include_usage": True}, {"role": "user"}, {"a": {"b": 1}, "c": "x"}, {"a": {"b": -1}},
    {"a": {"c": 1}}, {"a": {"b": 1, "d": "x"}}, {"a": {"b": 1, "d": 1}}, {"a": None}, {"c": "z"},
    [{"a": {"b": 1}}], [{"a": {"b": 1}, "c": "y"}, {"c": "q"}],
]
# Not the API's: nesting the API's schemas do not have (properties in properties, arrays of them).
NESTED: dict[str, Any] = {
    "type": ["object", "null"],
    "required": ["a"],
    "properties": {
        "a": {"type": "object", "required": ["b"],
              "properties": {"b": {"type": "integer", "minimum": 0}, "d": {"type": "string"}}},
        "c": {"type": "string", "enum": ["x", "y"]},
    },
}
VALUES = _SCALARS + _CONTAINERS


@pytest.mark.parametrize("schema", [CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS], ids=["chat", "completions",
                                                                                   "embeddings"])
def test_generated_checks_agree_with_the_reference(schema: dict[str, Any]) -> None:
    props = schema["properties"]
    fast = generated_checks(props)
    assert set(fast) == set(props)
    for name, sub in props.items():
        reference = compile_schema(sub)
        for value in VALUES:
            assert fast[name](value) is reference(value), (name, value)


def test_generated_checks_of_nested_schemas_agree_with_the_reference() -> None:
    schemas = {"nested": NESTED, "items": {"type": "array", "items": NESTED, "maxItems": 2},
               "any": {"anyOf": [NESTED, {"type": "array", "items": {"type": "array", "items": NESTED}}]},
               "bounds only": {"minimum": 1, "maximum": 3}, "mixed": {"type": ["integer", "string"], "minimum": 0},
               "number": {"type": "number", "maximum": 2}}
    fast = generated_checks(schemas)
    for name, sub in schemas.items():
        reference = compile_schema(sub)
        for value in [*VALUES, [[{"a": {"b": 1}}]], [[{"a": {"b": "1"}}]], [[]]]:
            assert fast[name](value) is reference(value), (name, value)


def test_the_validator_refuses_what_the_reference_refuses() -> None:
    validate = VALIDATORS["chat.completions"]
    good = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64, "temperature": 0}
    validate(good)
    for field, value in [("messages", []), ("messages", [{"content": "x"}]), ("messages", [{"role": 1}]),
                         ("max_tokens", 0), ("max_tokens", True), ("temperature", 2.5), ("model", ""),
                         ("stop", ["a"] * 5), ("tool_choice", "sometimes"), ("stream", "yes")]:
        with pytest.raises(BadRequest) as err:
            validate({**good, field: value})
        assert err.value.param == field
