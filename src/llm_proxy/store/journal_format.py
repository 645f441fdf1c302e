"""The journal's line format: a UsageEvent as one JSON array line, and a line read back by field name."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson

from ..types import UsageEvent

# A journal line is a JSON array of a UsageEvent's fields in this order: positional, so no key names to
# write, store and send (177 instead of 449 bytes for a typical row, and orjson writes a tuple ~2 us faster
# than an object of 21 keys). New fields go at the end only: a shorter line (an older version's) leaves the
# missing ones NULL, a longer one (a newer version's) has its extra elements ignored. Lines written before
# this format are JSON objects keyed by field name; every reader takes both.
JOURNAL_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(UsageEvent))
_EVENT_FIELDS = frozenset(JOURNAL_FIELDS)
# Every field a journal line may carry; a line from another version may lack some (they become NULL).
_LINE_DEFAULTS: dict[str, Any] = dict.fromkeys(_EVENT_FIELDS)

_OPTS = orjson.OPT_APPEND_NEWLINE  # (OPT_NON_STR_KEYS halves the speed; _sanitized() covers such keys)
_INT_FIELDS = ("status", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "attempts")
_INT8_MAX = 2**63 - 1


def _default(value: Any) -> Any:
    return str(value)


def _journal_line(e: UsageEvent) -> bytes:
    """One journal line: the event's fields as a JSON array, in the order of JOURNAL_FIELDS."""
    return orjson.dumps(
        (e.request_id, e.started_at, e.ended_at, e.endpoint, e.status, e.subject, e.username, e.model, e.provider_id,
         e.upstream_model, e.streamed, e.error_type, e.prompt_tokens, e.completion_tokens, e.total_tokens,
         e.cached_tokens, e.latency_ms, e.ttft_ms, e.upstream_latency_ms, e.attempts, e.extra, e.usage_estimated,
         e.cost_usd, e.groups, e.client_api),
        default=_default,
        option=_OPTS,
    )  # fmt: skip


if len(JOURNAL_FIELDS) != 25:  # _journal_line() lists them by hand (a tuple: faster than a loop)
    raise RuntimeError("UsageEvent changed: update _journal_line() and append the new fields at the end")


def line_fields(data: Any) -> dict[str, Any]:
    """The fields of a parsed journal line (an array, or an object from an older version) by name."""
    if isinstance(data, list):
        return dict(zip(JOURNAL_FIELDS, data, strict=False))
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if k in _EVENT_FIELDS}
    raise ValueError("journal line is not a JSON array or object")


def event_from_line(line: bytes) -> UsageEvent:
    """The UsageEvent of one journal line; raises ValueError or TypeError when it is not one."""
    if b"\x00" in line:
        line = line.replace(b"\x00", b"")
    fields = line_fields(orjson.loads(line))
    if isinstance(fields.get("groups"), list):  # as the event had them (a tuple, from Principal.groups)
        fields["groups"] = tuple(fields["groups"])
    return UsageEvent(**fields)


def _as_array_line(line: bytes) -> bytes:
    """A journal line in the array form (a line of the older object form converted; anything else unchanged,
    for the database to reject)."""
    if line[:1] == b"[":
        return line
    try:
        data = orjson.loads(line)
    except orjson.JSONDecodeError:
        return line
    if not isinstance(data, dict):
        return line
    return orjson.dumps([data.get(f) for f in JOURNAL_FIELDS], default=str)


def _readable(line: bytes) -> Any:
    """A journal line as a JSON object keyed by field name (for logs and rejected.jsonl), else None."""
    try:
        return line_fields(orjson.loads(line))
    except (orjson.JSONDecodeError, ValueError):
        return None


def _clamp(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return max(-_INT8_MAX, min(value, _INT8_MAX))
    return value


def _sanitized(event: UsageEvent) -> UsageEvent:
    """A JSON-safe copy of an event orjson refused (an integer beyond 64 bits, an odd `extra`)."""
    changes: dict[str, Any] = {f: _clamp(getattr(event, f)) for f in _INT_FIELDS}
    try:
        extra = orjson.loads(orjson.dumps(event.extra, default=repr, option=orjson.OPT_NON_STR_KEYS))
    except (TypeError, orjson.JSONEncodeError):
        extra = {"unserializable": repr(event.extra)[:2000]}
    changes["extra"] = extra
    return dataclasses.replace(event, **changes)

