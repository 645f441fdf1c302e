"""Request schemas of the client APIs, as JSON Schema, and the cheap validators compiled from them.

One source for two uses: the handlers validate request bodies with the checkers compiled here, and
`GET /openapi.json` publishes the same schemas (ingress/openapi.py). The compiler takes the small subset of JSON
Schema the schemas use (type, enum, minimum/maximum, minItems/maxItems, minLength/maxLength, items, anyOf,
required, properties) and checks only the top-level fields a body carries, each with a few isinstance tests:
no walk of message contents or tool schemas on the request path (translators validate what they read).
Fields the schemas do not name pass through untouched: providers take extras the schemas do not list.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass
from typing import Any, cast

from ..errors import BadRequest

Schema = dict[str, Any]
Check = Callable[[Any], bool]

_INT: Schema = {"type": "integer"}
_NULLABLE_STR: Schema = {"type": ["string", "null"]}


def _num(lo: float, hi: float) -> Schema:
    return {"type": ["number", "null"], "minimum": lo, "maximum": hi}


def _int(lo: int, hi: int, nullable: bool = True) -> Schema:
    return {"type": ["integer", "null"] if nullable else "integer", "minimum": lo, "maximum": hi}


# Parameters that multiply what the upstream bills (or are plainly wrong) are bounded: n as OpenAI bounds it;
# max_tokens above any model's output window is a mistake (or abuse); legacy completions allow max_tokens 0
# (echo + logprobs: scoring a prompt); logprobs / top_logprobs: the usual servers' ceilings (OpenAI 20 and 5,
# vLLM's max_logprobs 20 by default).
MAX_TOKENS = 1 << 20

MAX_STOP = 4  # stop sequences, as OpenAI bounds them: the neutral form's bound too

_STOP: Schema = {
    "anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 0, "maxItems": MAX_STOP},
        {"type": "null"},
    ]
}
_MAX_TOKENS = _int(1, MAX_TOKENS)
_COMMON: dict[str, Schema] = {
    "model": {"type": "string", "minLength": 1, "maxLength": 256},
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"type": ["object", "null"]},
    "temperature": _num(0, 2),
    "top_p": _num(0, 1),
    "n": _int(1, 128),
    "max_tokens": _MAX_TOKENS,
    "presence_penalty": _num(-2, 2),
    "frequency_penalty": _num(-2, 2),
    "logit_bias": {"type": ["object", "null"]},
    "seed": {"type": ["integer", "null"]},
    "stop": _STOP,
    "user": _NULLABLE_STR,
}

CHAT_COMPLETIONS: Schema = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        **_COMMON,
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "object", "required": ["role"], "properties": {"role": {"type": "string"}}},
        },
        "max_completion_tokens": _MAX_TOKENS,
        "logprobs": {"type": ["boolean", "null"]},
        "top_logprobs": _int(0, 20),
        "tools": {"type": ["array", "null"], "items": {"type": "object"}, "maxItems": 512},
        "tool_choice": {
            "anyOf": [{"type": "string", "enum": ["none", "auto", "required"]}, {"type": "object"}, {"type": "null"}]
        },
        "parallel_tool_calls": {"type": ["boolean", "null"]},
        "response_format": {"type": ["object", "null"]},
        "metadata": {"type": ["object", "null"]},
        "store": {"type": ["boolean", "null"]},
    },
}

COMPLETIONS: Schema = {
    "type": "object",
    "required": ["model", "prompt"],
    "properties": {
        **_COMMON,
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "items": {"type": "integer"}},
                {"type": "array", "minItems": 1, "items": {"type": "array"}},
            ]
        },
        "max_tokens": _int(0, MAX_TOKENS),
        "best_of": _int(1, 20),
        "echo": {"type": ["boolean", "null"]},
        "logprobs": _int(0, 20),
        "suffix": _NULLABLE_STR,
    },
}

EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _COMMON["model"],
        "input": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "string"}},
                {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "integer"}},
                {"type": "array", "minItems": 1, "maxItems": 2048, "items": {"type": "array"}},
            ]
        },
        "encoding_format": {"type": ["string", "null"], "enum": ["float", "base64", None]},
        "dimensions": _int(1, 65536),
        "user": _NULLABLE_STR,
    },
}

# --------------------------------------------------------------------------------------------------
# The compiler
# --------------------------------------------------------------------------------------------------

_TYPES: dict[str, Check] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}

_TYPE_WORDS = {"string": "a string", "integer": "an integer", "number": "a number", "boolean": "a boolean",
               "object": "an object", "array": "an array", "null": "null"}


def _size(kind: type, lo: int | None, hi: int | None) -> Check | None:
    if lo is None and hi is None:
        return None
    low, high = lo or 0, hi if hi is not None else float("inf")

    def check(v: Any) -> bool:
        return not isinstance(v, kind) or low <= len(cast(Sized, v)) <= high

    return check


def compile_schema(schema: Schema) -> Check:
    """A predicate for one value against one schema of the supported subset."""
    if "anyOf" in schema:
        alts = [compile_schema(s) for s in schema["anyOf"]]

        def any_of(v: Any) -> bool:
            for a in alts:
                if a(v):
                    return True
            return False

        return any_of
    checks: list[Check] = []
    t = schema.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else list(t)
        preds = [_TYPES[n] for n in names]
        if len(preds) == 1:
            checks.append(preds[0])
        else:
            def one_of_types(v: Any) -> bool:
                for p in preds:
                    if p(v):
                        return True
                return False

            checks.append(one_of_types)
    if "enum" in schema:
        allowed = list(schema["enum"])
        checks.append(lambda v: v in allowed)
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None or hi is not None:
        def in_range(v: Any) -> bool:
            if v is None or isinstance(v, bool) or not isinstance(v, int | float):
                return True  # the type check decides
            return (lo is None or v >= lo) and (hi is None or v <= hi)

        checks.append(in_range)
    for kind, lo_key, hi_key in ((str, "minLength", "maxLength"), (list, "minItems", "maxItems")):
        size_check = _size(kind, schema.get(lo_key), schema.get(hi_key))
        if size_check is not None:
            checks.append(size_check)
    if "items" in schema:
        item = compile_schema(schema["items"])

        def items(v: Any) -> bool:
            if isinstance(v, list):
                for x in v:
                    if not item(x):
                        return False
            return True

        checks.append(items)
    required = schema.get("required")
    if required:
        req = list(required)
        checks.append(lambda v: not isinstance(v, dict) or all(k in v for k in req))
    props = schema.get("properties")
    if props:
        sub = list({k: compile_schema(s) for k, s in props.items()}.items())

        def properties(v: Any) -> bool:
            if isinstance(v, dict):
                for k, c in sub:
                    if k in v and not c(v[k]):
                        return False
            return True

        checks.append(properties)
    if not checks:
        return lambda v: True
    if len(checks) == 1:
        return checks[0]

    # Loops, not all(<generator>): a generator costs ~1 µs (this was the request path's check before generated_checks).
    def all_of(v: Any) -> bool:
        for c in checks:
            if not c(v):
                return False
        return True

    return all_of


# --------------------------------------------------------------------------------------------------
# The generated checks (what the request path runs)
# --------------------------------------------------------------------------------------------------
#
# compile_schema() above composes closures: a chat body's fields took ~25 calls of them. The same subset is
# also written out as Python source, one function per field whose checks are one boolean expression (a loop
# only where the schema has `items` or `properties`), and compiled once at import. The source is made only
# from the schemas in this module (type names, bounds and property names; enum values are passed as
# constants), never from a request. compile_schema() stays the reference: a test holds the two to the same
# verdicts over a corpus of values for every field.

_TYPE_EXPR = {
    "string": "isinstance({v}, str)",
    "integer": "(isinstance({v}, int) and not isinstance({v}, bool))",
    "number": "(isinstance({v}, (int, float)) and not isinstance({v}, bool))",
    "boolean": "isinstance({v}, bool)",
    "object": "isinstance({v}, dict)",
    "array": "isinstance({v}, list)",
    "null": "{v} is None",
}


class _Source:
    """Functions being written for one set of schemas, and the constants they refer to."""

    def __init__(self) -> None:
        self.defs: list[str] = []
        self.consts: dict[str, Any] = {}
        self.names = 0  # variables the property checks bind

    def const(self, value: Any) -> str:
        name = f"_c{len(self.consts)}"
        self.consts[name] = value
        return name

    def function(self, lines: list[str]) -> str:
        """A function of one value `v`, its body `lines` (indented once); its name."""
        name = f"_f{len(self.defs)}"
        self.defs.append(f"def {name}(v):\n" + "".join(f"    {line}\n" for line in lines))
        return name

    def check(self, schema: Schema) -> str:
        """The name of a function checking one value against `schema` (as compile_schema(schema) does)."""
        return self.function([f"return {self.expr(schema, 'v')}"])

    def expr(self, schema: Schema, v: str) -> str:
        """A boolean expression over the variable `v`: the value passes `schema`."""
        if "anyOf" in schema:
            return "(" + " or ".join(self.expr(s, v) for s in schema["anyOf"]) + ")"
        parts: list[str] = []
        t = schema.get("type")
        names = [] if t is None else [t] if isinstance(t, str) else list(t)
        if names:
            parts.append("(" + " or ".join(_TYPE_EXPR[n].format(v=v) for n in names) + ")")

        def unless_not(kind: str) -> str:
            # The checks below concern one kind of value and pass any other; when the type test above admits
            # only that kind, the value is of it already.
            return "" if names in (["string"], ["array"], ["object"]) and _KINDS[names[0]] == kind \
                else f"not isinstance({v}, {kind}) or "

        if "enum" in schema:
            parts.append(f"{v} in {self.const(list(schema['enum']))}")
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is not None or hi is not None:
            bounds = (f"{lo!r} <= " if lo is not None else "") + v + (f" <= {hi!r}" if hi is not None else "")
            if names and set(names) <= {"integer", "number", "null"}:
                # The type test admits numbers (not booleans) and perhaps None only: the bounds apply to all else.
                parts.append(f"({v} is None or {bounds})" if "null" in names else bounds)
            else:
                parts.append(f"({v} is None or isinstance({v}, bool) or not isinstance({v}, (int, float)) or "
                             f"{bounds})")
        for kind, lo_key, hi_key in (("str", "minLength", "maxLength"), ("list", "minItems", "maxItems")):
            low, high = schema.get(lo_key), schema.get(hi_key)
            if low is None and high is None:
                continue
            size = f"{low or 0} <= len({v})" + (f" <= {high}" if high is not None else "")
            parts.append(f"({unless_not(kind)}{size})")
        if "items" in schema:
            item = self.expr(schema["items"], "x")
            parts.append(self.function(
                ["if isinstance(v, list):", "    for x in v:", f"        if not {item}:", "            return False",
                 "return True"]) + f"({v})")
        required = schema.get("required")
        if required:
            parts.append(f"({unless_not('dict')}(" + " and ".join(f"{k!r} in {v}" for k in required) + "))")
        props = schema.get("properties")
        if props:
            checks = []
            for k, sub in props.items():
                self.names += 1
                x = f"_p{self.names}"  # a name no other check uses (nested properties each get their own)
                checks.append(f"(({x} := {v}.get({k!r}, _MISSING)) is _MISSING or {self.expr(sub, x)})")
            parts.append(f"({unless_not('dict')}(" + " and ".join(checks) + "))")
        return "(" + " and ".join(parts) + ")" if parts else "True"

    def build(self) -> dict[str, Any]:
        namespace: dict[str, Any] = {"_MISSING": _MISSING, **self.consts}
        exec(compile("".join(self.defs), "<llm_proxy.ingress.schema>", "exec"), namespace)  # noqa: S102
        return namespace


_MISSING = object()
_KINDS = {"string": "str", "array": "list", "object": "dict"}


def generated_checks(properties: Mapping[str, Schema]) -> dict[str, Check]:
    """One generated check per top-level property (the request path's; compile_schema() is the reference)."""
    src = _Source()
    names = {k: src.check(s) for k, s in properties.items()}
    namespace = src.build()
    return {k: namespace[name] for k, name in names.items()}


def describe(schema: Schema) -> str:
    """What a value must be, in words (for the 400's message)."""
    if "anyOf" in schema:
        parts = [describe(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " or ".join(dict.fromkeys(parts))
    t = schema.get("type")
    names = [t] if isinstance(t, str) else [n for n in (t or []) if n != "null"]
    text = " or ".join(_TYPE_WORDS[n] for n in names) or "a value"
    if "enum" in schema:
        text += " (one of " + ", ".join(repr(e) for e in schema["enum"] if e is not None) + ")"
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and hi is not None:
        text += f" between {lo:g} and {hi:g}"
    elif lo is not None:
        text += f" of at least {lo:g}"
    if schema.get("minItems"):
        text += f" with at least {schema['minItems']} item(s)"
    if schema.get("maxItems"):
        text += f" with at most {schema['maxItems']} items"
    if schema.get("minLength"):
        text += " (not empty)"
    if "items" in schema and schema["items"].get("type"):
        text += " of " + describe(schema["items"]).replace("a ", "", 1).replace("an ", "", 1) + "s"
    return text


@dataclass(frozen=True, slots=True)
class _Field:
    check: Check
    schema: Schema
    type_check: Check | None  # the schema's own `type` alone, to tell a wrong type from a wrong value


def _reject(name: str, value: Any, f: _Field) -> BadRequest:
    """The 400 for a field that failed its check, with OpenAI's codes where OpenAI has them."""
    schema = f.schema
    if f.type_check is not None and not f.type_check(value):
        return BadRequest(f"Invalid type for '{name}': expected {describe(schema)}", param=name, code="invalid_type")
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if isinstance(value, int | float) and not isinstance(value, bool):
        kind = "integer" if isinstance(value, int) else "decimal"
        if lo is not None and value < lo:
            return BadRequest(f"Invalid '{name}': {kind} below minimum value {lo:g}, got {value:g}", param=name,
                              code=f"{kind}_below_min_value")
        if hi is not None and value > hi:
            return BadRequest(f"Invalid '{name}': {kind} above maximum value {hi:g}, got {value:g}", param=name,
                              code=f"{kind}_above_max_value")
    return BadRequest(f"Invalid '{name}': expected {describe(schema)}", param=name, code="invalid_value")


@dataclass(frozen=True, slots=True)
class BodyValidator:
    """Checks a parsed request body (a dict) against one endpoint's schema; raises BadRequest naming the field.

    Cost: one dict lookup per top-level field of the body, and the few isinstance tests of the fields it names."""

    schema: Schema
    required: tuple[str, ...]
    fields: Mapping[str, _Field]
    checks: Mapping[str, Check]  # each field's check alone (fields[name].check): one lookup less per field

    @classmethod
    def of(cls, schema: Schema) -> BodyValidator:
        props = schema.get("properties", {})
        checks = generated_checks(props)
        fields: dict[str, _Field] = {}
        for k, s in props.items():
            t = s.get("type")
            fields[k] = _Field(checks[k], s, compile_schema({"type": t}) if t is not None else None)
        return cls(schema, tuple(schema.get("required", ())), fields, checks)

    def __call__(self, body: Mapping[str, Any]) -> None:
        for name in self.required:
            if name not in body:
                raise BadRequest(f"'{name}' is required", param=name, code=f"missing_{name}")
        checks = self.checks
        for name, value in body.items():
            check = checks.get(name)
            if check is not None and not check(value):
                raise _reject(name, value, self.fields[name])


VALIDATORS: dict[str, BodyValidator] = {
    "chat.completions": BodyValidator.of(CHAT_COMPLETIONS),
    "completions": BodyValidator.of(COMPLETIONS),
    "embeddings": BodyValidator.of(EMBEDDINGS),
}
