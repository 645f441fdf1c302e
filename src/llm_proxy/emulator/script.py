"""The emulator's script: the scripted answer items (ScriptItem and its parts) and their strict parser."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

_ITEM_KEYS = frozenset(
    {
        "content",
        "tool_calls",
        "finish_reason",
        "usage",
        "error",
        "delay_ms",
        "chunk_delay_ms",
        "chunks",
        "hang",
        "disconnect_after_chunks",
        "truncate_body",
        "model",
        "no_usage",
    }
)
_ERROR_KEYS = frozenset({"status", "message", "type", "code", "param", "headers"})
_TOOL_CALL_KEYS = frozenset({"name", "arguments", "id"})
_DEFAULT_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
}


# --------------------------------------------------------------------------------------------------
# Script items
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class ScriptToolCall:
    """One scripted tool call; `arguments` is already a JSON string."""

    name: str
    arguments: str
    id: str | None = None


@dataclass(slots=True, frozen=True)
class ScriptError:
    """A scripted error answer: HTTP status plus the OpenAI error envelope fields."""

    status: int
    message: str
    type: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class ScriptItem:
    """One scripted answer. `content=None` without tool calls means "use the default echo reply"."""

    content: str | None = None
    tool_calls: tuple[ScriptToolCall, ...] = ()
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: ScriptError | None = None
    delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    chunks: int | None = None
    hang: bool = False
    disconnect_after_chunks: int | None = None
    truncate_body: bool = False
    model: str | None = None
    # Like llama.cpp and other servers without `stream_options`: no usage object, streamed or not.
    no_usage: bool = False

    @property
    def has_reply(self) -> bool:
        return self.content is not None or bool(self.tool_calls)


def _fail(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}")


def _opt_str(raw: Mapping[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise _fail(where, f"'{key}' must be a string")
    return value


def _opt_number(raw: Mapping[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _fail(where, f"'{key}' must be a non-negative number")
    return float(value)


def _opt_int(raw: Mapping[str, Any], key: str, where: str, minimum: int) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(where, f"'{key}' must be an integer >= {minimum}")
    return value


def _opt_bool(raw: Mapping[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _fail(where, f"'{key}' must be a boolean")
    return value


def _parse_error(raw: Any, where: str) -> ScriptError:
    if not isinstance(raw, Mapping):
        raise _fail(where, "'error' must be an object")
    unknown = set(raw) - _ERROR_KEYS
    if unknown:
        raise _fail(where, f"unknown error keys {sorted(unknown)}; allowed: {sorted(_ERROR_KEYS)}")
    status = raw.get("status", 500)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise _fail(where, "'error.status' must be an integer between 400 and 599")
    headers_raw = raw.get("headers") or {}
    if not isinstance(headers_raw, Mapping):
        raise _fail(where, "'error.headers' must be an object")
    err_type = _opt_str(raw, "type", where)
    if err_type is None:
        err_type = _DEFAULT_ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = _opt_str(raw, "message", where)
    return ScriptError(
        status=status,
        message=message if message is not None else f"Emulated error (HTTP {status})",
        type=err_type,
        code=_opt_str(raw, "code", where),
        param=_opt_str(raw, "param", where),
        headers={str(k): str(v) for k, v in headers_raw.items()},
    )


def _parse_tool_calls(raw: Any, where: str) -> tuple[ScriptToolCall, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _fail(where, "'tool_calls' must be a list")
    calls: list[ScriptToolCall] = []
    for i, call in enumerate(raw):
        cwhere = f"{where}.tool_calls[{i}]"
        if not isinstance(call, Mapping):
            raise _fail(cwhere, "must be an object")
        unknown = set(call) - _TOOL_CALL_KEYS
        if unknown:
            raise _fail(cwhere, f"unknown keys {sorted(unknown)}; allowed: {sorted(_TOOL_CALL_KEYS)}")
        name = call.get("name")
        if not isinstance(name, str) or not name:
            raise _fail(cwhere, "'name' must be a non-empty string")
        arguments = call.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        calls.append(ScriptToolCall(name=name, arguments=arguments, id=_opt_str(call, "id", cwhere)))
    return tuple(calls)


def parse_item(raw: Any, where: str = "item") -> ScriptItem:
    """Validate one `responses` entry (a string or an object) and return it as a ScriptItem."""
    if isinstance(raw, ScriptItem):
        return raw
    if isinstance(raw, str):
        return ScriptItem(content=raw)
    if not isinstance(raw, Mapping):
        raise _fail(where, "must be a string or an object")
    unknown = set(raw) - _ITEM_KEYS
    if unknown:
        raise _fail(where, f"unknown keys {sorted(unknown)}; allowed: {sorted(_ITEM_KEYS)}")
    usage = raw.get("usage")
    if usage is not None and not isinstance(usage, Mapping):
        raise _fail(where, "'usage' must be an object")
    error = raw.get("error")
    return ScriptItem(
        content=_opt_str(raw, "content", where),
        tool_calls=_parse_tool_calls(raw.get("tool_calls"), where),
        finish_reason=_opt_str(raw, "finish_reason", where),
        usage=dict(usage) if usage is not None else None,
        error=_parse_error(error, where) if error is not None else None,
        delay_ms=_opt_number(raw, "delay_ms", where),
        chunk_delay_ms=_opt_number(raw, "chunk_delay_ms", where),
        chunks=_opt_int(raw, "chunks", where, 1),
        hang=_opt_bool(raw, "hang", where),
        disconnect_after_chunks=_opt_int(raw, "disconnect_after_chunks", where, 0),
        truncate_body=_opt_bool(raw, "truncate_body", where),
        no_usage=_opt_bool(raw, "no_usage", where),
        model=_opt_str(raw, "model", where),
    )
