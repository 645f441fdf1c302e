"""OpenAI's Responses API (`POST /v1/responses`) over the neutral chat form, both ways.

- `prepare(body, scope)` (async, the exchange's step before parse): a request naming `previous_response_id` gets
  the stored conversation of that response (its input items, then its output items) before its own `input`; the
  result is a `Prepared` body. Stored responses are read through `scope.store`; none (usage.store_completions
  off) is a 400, an id the caller did not make a 404.
- `to_chat(body)`: a Responses request -> a neutral chat/completions body (a new dict; the request is never
  mutated).
- `render(req, raw)`: a neutral `chat.completion` -> a Response object.
- `ResponsesFramer`: neutral `chat.completion.chunk` frames -> the Responses event sequence (`response.created`,
  `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
  `response.output_text.delta`..., the matching `.done` events, `response.function_call_arguments.delta` / `.done`
  for tool calls, and `response.completed` (or `response.incomplete`) with usage), each with its `sequence_number`.
- `capture(req)`: what the usage ledger stores (`usage.store_completions`) when the client said `store: true`:
  the input items (the whole conversation, instructions apart) and the Response, under the response's id.
- `native_body` / `render_native` / `ResponsesNativeFramer`: the same API passed through to an upstream that
  speaks it (Call.native): the request without `previous_response_id`, the reply and events with it put back.

Pure but for `prepare`'s read of the store. Only function tools are served; OpenAI's built-in tools (web search,
file search, computer use, code interpreter, MCP...) run inside OpenAI, so asking for one is a 400 naming it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import BadRequest, NotFound, ProxyError
from .base import Scope
from .neutral import (
    ChunkFramer,
    image_part,
    new_id,
    obj,
    read_reply,
    require_object,
    require_str,
    sse_event,
    string,
    token_counts,
)
from .schema import MAX_TOKENS

NAME = "openai.responses"
PATHS: tuple[str, ...] = ("/v1/responses", "/v1/openai/v1/responses")

# Request fields that ask for something this proxy does not do (rather than something it may ignore).
_UNSUPPORTED_FIELDS = {
    "background": "background responses are not supported",
    "conversation": "conversations are not supported; pass the history in 'input' or use 'previous_response_id'",
    "prompt": "prompt templates are not supported",
}
_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


class Prepared(dict[str, Any]):
    """A request after `prepare`: its `input` is the whole conversation when it continued a stored response
    (`previous`, the id it named); `keep` stores its Response (`store: true` and a ledger that keeps them)."""

    __slots__ = ("keep", "previous")

    def __init__(self, body: Mapping[str, Any], previous: str | None,
                 keep: Callable[[dict[str, Any]], None] | None) -> None:
        super().__init__(body)
        self.previous = previous
        self.keep = keep


@dataclass(slots=True)
class ResponsesRequest:
    """What rendering the reply needs from the request: its id and time, and the fields a Response echoes."""

    id: str
    created_at: int
    body: Mapping[str, Any]  # the client's request after prepare() (read only)
    previous: str | None = None  # the previous_response_id it continued (its conversation is in body["input"])
    keep: Callable[[dict[str, Any]], None] | None = None  # stores the final Response of a stream (Scope.keep)
    response: dict[str, Any] | None = None  # the Response the client got, once rendered

    @property
    def model(self) -> str:
        return str(self.body["model"])

    @property
    def store(self) -> bool:
        return self.body.get("store") is True


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------


def _text_parts(content: Any, where: str, kinds: frozenset[str]) -> str:
    """The text of a content that may hold text only (instructions, system/assistant messages, tool output)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts", param=where)
    out: list[str] = []
    for j, p in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(p, dict) or not isinstance(p.get("type"), str) or p["type"] not in kinds:
            kind = p.get("type") if isinstance(p, dict) else None
            raise BadRequest(f"{at}: content type '{kind}' is not allowed here", param=at)
        text = p.get("refusal") if p.get("type") == "refusal" else p.get("text")
        out.append(require_str(text, f"{at}.text", empty=True))
    return "".join(out)


_TEXT_KINDS = frozenset({"input_text", "output_text", "text"})
_ASSISTANT_KINDS = frozenset({"output_text", "input_text", "text", "refusal"})


def _user_content(content: Any, where: str) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRequest(f"{where} must be a string or an array of content parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        at = f"{where}[{j}]"
        p = require_object(p, at)
        kind = string(p.get("type"))
        if kind in _TEXT_KINDS:
            parts.append({"type": "text", "text": require_str(p.get("text"), f"{at}.text", empty=True)})
        elif kind == "input_image":
            if p.get("image_url") is None and p.get("file_id") is not None:
                raise BadRequest(f"{at}: images by file_id are not supported; send image_url (a URL or a data URL)",
                                 param=at)
            parts.append(image_part(p.get("image_url"), p.get("detail"), at))
        elif kind == "input_file":
            data = p.get("file_data")
            if not isinstance(data, str) or not data:
                raise BadRequest(f"{at}: only files given inline as file_data are supported", param=at)
            file: dict[str, Any] = {"file_data": data}
            if isinstance(p.get("filename"), str):
                file["filename"] = p["filename"]
            parts.append({"type": "file", "file": file})
        else:
            raise BadRequest(f"{at}: content type '{kind}' is not supported", param=at)
    return parts


def _tool_output(output: Any, where: str) -> str:
    if isinstance(output, str):
        return output
    return _text_parts(output, where, _TEXT_KINDS)


def input_messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The neutral chat messages of a request's `input` (a string, or an array of items)."""
    items = body.get("input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise BadRequest("'input' must be a string or an array of input items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        at = f"input[{i}]"
        item = require_object(item, at)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            content = item.get("content")
            if role == "user":
                out.append({"role": "user", "content": _user_content(content, f"{at}.content")})
            elif role in ("system", "developer"):
                out.append({"role": "system", "content": _text_parts(content, f"{at}.content", _TEXT_KINDS)})
            elif role == "assistant":
                out.append({"role": "assistant", "content": _text_parts(content, f"{at}.content", _ASSISTANT_KINDS)})
            else:
                raise BadRequest(f"{at}.role must be 'user', 'assistant', 'system' or 'developer'", param=f"{at}.role")
        elif kind == "function_call":
            call = {
                "id": require_str(item.get("call_id"), f"{at}.call_id"),
                "type": "function",
                "function": {
                    "name": require_str(item.get("name"), f"{at}.name"),
                    "arguments": require_str(item.get("arguments"), f"{at}.arguments", empty=True),
                },
            }
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                # One assistant turn: its text and every call it made (parallel calls come as consecutive items).
                last["tool_calls"] = [*last.get("tool_calls", ()), call]
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({
                "role": "tool",
                "tool_call_id": require_str(item.get("call_id"), f"{at}.call_id"),
                "content": _tool_output(item.get("output"), f"{at}.output"),
            })
        elif kind == "reasoning":
            continue  # another model's reasoning (often encrypted): nothing a translated upstream can read
        else:
            raise BadRequest(f"{at}: input item type '{kind}' is not supported", param=f"{at}.type")
    return out


def _tools(body: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array", param="tools")
    out: list[dict[str, Any]] = []
    for i, t in enumerate(tools):
        at = f"tools[{i}]"
        t = require_object(t, at)
        kind = t.get("type")
        if kind != "function":
            raise BadRequest(f"{at}: the built-in tool '{kind}' is not supported here; only 'function' tools are",
                             param=f"{at}.type", code="unsupported_tool")
        fn: dict[str, Any] = {"name": require_str(t.get("name"), f"{at}.name")}
        if isinstance(t.get("description"), str):
            fn["description"] = t["description"]
        if t.get("parameters") is not None:
            fn["parameters"] = require_object(t["parameters"], f"{at}.parameters")
        if isinstance(t.get("strict"), bool):
            fn["strict"] = t["strict"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(tc: Any) -> Any:
    if tc in ("auto", "none", "required"):
        return tc
    if isinstance(tc, dict) and tc.get("type") == "function":
        return {"type": "function", "function": {"name": require_str(tc.get("name"), "tool_choice.name")}}
    kind = tc.get("type") if isinstance(tc, dict) else tc
    raise BadRequest(f"'tool_choice' {kind!r} is not supported; use 'auto', 'none', 'required' or a function",
                     param="tool_choice")


def _response_format(text: Any) -> dict[str, Any] | None:
    fmt = require_object(text, "text").get("format")
    if fmt is None:
        return None
    fmt = require_object(fmt, "text.format")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        schema: dict[str, Any] = {
            "name": require_str(fmt.get("name"), "text.format.name"),
            "schema": require_object(fmt.get("schema"), "text.format.schema"),
        }
        for key in ("description", "strict"):
            if fmt.get(key) is not None:
                schema[key] = fmt[key]
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest(f"'text.format.type' {kind!r} is not supported", param="text.format.type")


def _number(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadRequest(f"Invalid type for '{name}': expected a number", param=name, code="invalid_type")
    if not lo <= v <= hi:
        raise BadRequest(f"Invalid '{name}': expected a number between {lo:g} and {hi:g}", param=name,
                         code="invalid_value")
    return v


def to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses request -> the neutral chat body. `previous_response_id` only after `prepare` resolved it."""
    model = require_str(body.get("model"), "model")
    for name, why in _UNSUPPORTED_FIELDS.items():
        if body.get(name):
            raise BadRequest(f"'{name}': {why}", param=name)
    if "input" not in body:
        raise BadRequest("'input' is required", param="input", code="missing_input")
    if body.get("previous_response_id") is not None and not isinstance(body, Prepared):
        raise _not_kept()
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        text = _text_parts(instructions, "instructions", _TEXT_KINDS)
        if text:
            messages.append({"role": "system", "content": text})
    messages.extend(input_messages(body))
    if not messages:
        raise BadRequest("'input' is empty", param="input")
    out: dict[str, Any] = {"model": model, "messages": messages}
    tools = _tools(body)
    if tools:
        out["tools"] = tools
        if body.get("tool_choice") is not None:
            out["tool_choice"] = _tool_choice(body["tool_choice"])
        if isinstance(body.get("parallel_tool_calls"), bool):
            out["parallel_tool_calls"] = body["parallel_tool_calls"]
    elif body.get("tool_choice") not in (None, "auto", "none"):
        raise BadRequest("'tool_choice' names a tool but 'tools' is empty", param="tool_choice")
    max_out = body.get("max_output_tokens")
    if max_out is not None:
        if isinstance(max_out, bool) or not isinstance(max_out, int):
            raise BadRequest("Invalid type for 'max_output_tokens': expected an integer", param="max_output_tokens",
                             code="invalid_type")
        if not 1 <= max_out <= MAX_TOKENS:
            raise BadRequest(f"Invalid 'max_output_tokens': expected an integer between 1 and {MAX_TOKENS}",
                             param="max_output_tokens", code="invalid_value")
        out["max_completion_tokens"] = max_out
    for name, lo, hi in (("temperature", 0, 2), ("top_p", 0, 1)):
        v = _number(body, name, lo, hi)
        if v is not None:
            out[name] = v
    if body.get("text") is not None:
        rf = _response_format(body["text"])
        if rf is not None:
            out["response_format"] = rf
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and string(reasoning.get("effort")) in _EFFORTS:
        out["reasoning_effort"] = reasoning["effort"]
    for name in ("user", "safety_identifier"):
        if isinstance(body.get(name), str) and body[name]:
            out["user"] = body[name]
            break
    if body.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}  # response.completed carries the usage
    return out


def parse(body: Mapping[str, Any]) -> tuple[dict[str, Any], ResponsesRequest]:
    """The neutral body and what rendering its reply needs."""
    chat = to_chat(body)
    if isinstance(body, Prepared):
        return chat, ResponsesRequest(new_id("resp_"), int(time.time()), body, body.previous, body.keep)
    return chat, ResponsesRequest(new_id("resp_"), int(time.time()), body)


def _not_kept() -> BadRequest:
    return BadRequest(
        "'previous_response_id' is not supported: this server keeps no responses to continue from "
        "(usage.store_completions is off). Send the whole conversation in 'input' (the earlier output items "
        "included) instead.",
        param="previous_response_id", code="previous_response_not_found",
    )


def input_items(value: Any) -> list[Any]:
    """A request's `input` as a list of input items (a string is one user message)."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list):
        return value
    raise BadRequest("'input' must be a string or an array of input items", param="input")


def history_of(stored: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The conversation a stored response continues, as input items: its input items, then its output items as
    input: a message as an assistant message with its text, a function call without its item id (both name items
    of this proxy, which an upstream never saw)."""
    items = [i for i in stored.get("input_messages") or () if isinstance(i, dict)]
    response = stored.get("response")
    output = response.get("output") if isinstance(response, dict) else None
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, dict):
            continue
        if item.get("type") == "message":
            parts = [p for p in item.get("content") or () if isinstance(p, dict)]
            text = "".join(string(p.get("text")) or string(p.get("refusal")) for p in parts)
            items.append({"type": "message", "role": "assistant", "content": text})
        elif item.get("type") == "function_call":
            items.append({k: v for k, v in item.items() if k != "id"})
    return items


async def prepare(body: dict[str, Any], scope: Scope) -> dict[str, Any]:
    """The exchange's step before parse: resolves `previous_response_id` (the stored conversation goes before
    `input`), and hands `scope.keep` on when the response is to be stored."""
    previous = body.get("previous_response_id")
    keep = scope.keep if body.get("store") is True else None
    if previous is None:
        return Prepared(body, None, keep) if keep is not None else body
    if not isinstance(previous, str) or not previous:
        raise BadRequest("Invalid type for 'previous_response_id': expected a non-empty string",
                         param="previous_response_id", code="invalid_type")
    if scope.store is None:
        raise _not_kept()
    if "input" not in body:
        raise BadRequest("'input' is required", param="input", code="missing_input")
    items = input_items(body["input"])
    stored = await scope.store.stored_response(previous, scope.principal.subject)
    if stored is None:
        raise NotFound(f"Previous response with id '{previous}' not found.", param="previous_response_id",
                       code="previous_response_not_found")
    return Prepared({**body, "input": [*history_of(stored), *items]}, previous, keep)


# --------------------------------------------------------------------------------------------------
# Reply
# --------------------------------------------------------------------------------------------------


def usage_json(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI chat usage -> Responses usage."""
    if usage is None:
        return None
    prompt, completion, cached, reasoning = token_counts(usage)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached or 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning or 0},
        "total_tokens": prompt + completion,
    }


def _status(finish: str | None) -> tuple[str, dict[str, Any] | None]:
    if finish == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if finish == "content_filter":
        return "incomplete", {"reason": "content_filter"}
    return "completed", None


def _echo_tools(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = []
    for t in body.get("tools") or ():
        if isinstance(t, dict):
            out.append({"type": "function", "name": t.get("name"), "description": t.get("description"),
                        "parameters": t.get("parameters"), "strict": t.get("strict")})
    return out


def response_json(req: ResponsesRequest, status: str, output: list[dict[str, Any]],
                  usage: dict[str, Any] | None = None, incomplete: dict[str, Any] | None = None,
                  error: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Response object: the request's echoed fields, and the given state."""
    b = req.body
    tool_choice = b.get("tool_choice")
    text = obj(b.get("text"))
    return {
        "id": req.id,
        "object": "response",
        "created_at": req.created_at,
        "status": status,
        "error": error,
        "incomplete_details": incomplete,
        "instructions": b.get("instructions") if isinstance(b.get("instructions"), str) else None,
        "max_output_tokens": b.get("max_output_tokens"),
        "metadata": b.get("metadata") if isinstance(b.get("metadata"), dict) else {},
        "model": req.model,
        "output": output,
        "parallel_tool_calls": b.get("parallel_tool_calls") is not False,
        "previous_response_id": req.previous,
        "reasoning": {"effort": None, "summary": None},
        "temperature": b.get("temperature"),
        "text": {"format": text.get("format") or {"type": "text"}},
        "tool_choice": tool_choice if tool_choice is not None else "auto",
        "tools": _echo_tools(b),
        "top_p": b.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": b.get("user") if isinstance(b.get("user"), str) else None,
    }


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}


def render_response(req: ResponsesRequest, raw: bytes) -> dict[str, Any]:
    """A neutral chat.completion -> the Response object (a dict)."""
    reply = read_reply(raw)
    status, incomplete = _status(reply.finish_reason)
    item_status = "incomplete" if status == "incomplete" else "completed"
    output: list[dict[str, Any]] = []
    if reply.refusal is not None and not reply.text:
        output.append({"id": new_id("msg_"), "type": "message", "role": "assistant", "status": item_status,
                       "content": [{"type": "refusal", "refusal": reply.refusal}]})
    elif reply.text or not reply.tool_calls:
        output.append(_message_item(new_id("msg_"), reply.text, item_status))
    for tc in reply.tool_calls:
        output.append(_call_item(new_id("fc_"), tc["id"], tc["name"], tc["arguments"], "completed"))
    return response_json(req, status, output, usage_json(reply.usage), incomplete)


def render(req: ResponsesRequest, raw: bytes) -> bytes:
    req.response = render_response(req, raw)
    return orjson.dumps(req.response)


def capture(req: ResponsesRequest) -> dict[str, Any] | None:
    """The stored completion of the response the client got (None when it did not ask to store it, or no
    response was made): the input items, the whole conversation without the instructions (as OpenAI, a later
    `previous_response_id` does not carry them on), and the Response object, whose id is the row's."""
    if not req.store or req.response is None:
        return None
    return {"input_messages": input_items(req.body["input"]), "response": req.response}


def error_body(exc: ProxyError) -> bytes:
    """The Responses API answers errors in OpenAI's usual envelope."""
    return exc.body()


# --------------------------------------------------------------------------------------------------
# Stream
# --------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Item:
    index: int  # output_index
    id: str
    kind: str  # "message" | "function_call"
    text: str = ""  # the message's text, or the call's arguments
    call_id: str = ""
    name: str = ""
    open: bool = True

    def json(self, status: str) -> dict[str, Any]:
        if self.kind == "message":
            return _message_item(self.id, self.text, status)
        return _call_item(self.id, self.call_id, self.name, self.text, status)


class ResponsesFramer(ChunkFramer):
    """Neutral chat.completion.chunk frames -> Responses stream events.

    The final event (`response.completed`, or `response.incomplete` after a `length` / `content_filter` finish)
    waits for the usage chunk that follows the finish reason (the neutral stream always carries one: the ingress
    asks for it), or for `end()`. No `[DONE]`: a Responses stream ends with its final event."""

    def __init__(self, req: ResponsesRequest) -> None:
        super().__init__()
        self.req = req
        self._seq = 0
        self._items: list[_Item] = []
        self._message: _Item | None = None  # the message item text goes to, while open
        self._calls: dict[int, _Item] = {}  # tool-call index -> its item
        self.response: dict[str, Any] | None = None  # the final Response object, once sent

    def _event(self, out: list[bytes], kind: str, **fields: Any) -> None:
        out.append(sse_event(kind, {"type": kind, "sequence_number": self._seq, **fields}))
        self._seq += 1

    def _begin(self, out: list[bytes]) -> None:
        snapshot = response_json(self.req, "in_progress", [])
        self._event(out, "response.created", response=snapshot)
        self._event(out, "response.in_progress", response=snapshot)

    def _finished(self, out: list[bytes]) -> None:
        self._close_all(out)

    def _text(self, text: str, out: list[bytes]) -> None:
        item = self._message
        if item is None:
            item = self._message = _Item(len(self._items), new_id("msg_"), "message")
            self._items.append(item)
            self._event(out, "response.output_item.added", output_index=item.index,
                        item={**item.json("in_progress"), "content": []})
            self._event(out, "response.content_part.added", item_id=item.id, output_index=item.index,
                        content_index=0, part=_text_part(""))
        item.text += text
        self._event(out, "response.output_text.delta", item_id=item.id, output_index=item.index, content_index=0,
                    delta=text, logprobs=[])

    def _tool(self, tc: dict[str, Any], out: list[bytes]) -> None:
        index = tc.get("index", len(self._calls))
        fn = obj(tc.get("function"))
        item = self._calls.get(index)
        if item is None:
            if self._message is not None:  # the text before a call is a message of its own, finished
                self._close(self._message, out)
                self._message = None
            call_id = string(tc.get("id")) or new_id("call_")
            name = string(fn.get("name"))
            item = _Item(len(self._items), new_id("fc_"), "function_call", call_id=call_id, name=name)
            self._items.append(item)
            self._calls[index] = item
            self._event(out, "response.output_item.added", output_index=item.index, item=item.json("in_progress"))
        args = fn.get("arguments")
        if isinstance(args, str) and args and item.open:
            item.text += args
            self._event(out, "response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                        delta=args)

    def _close(self, item: _Item, out: list[bytes]) -> None:
        if not item.open:
            return
        item.open = False
        if item.kind == "message":
            status = "incomplete" if _status(self._finish)[0] == "incomplete" else "completed"
            self._event(out, "response.output_text.done", item_id=item.id, output_index=item.index,
                        content_index=0, text=item.text, logprobs=[])
            self._event(out, "response.content_part.done", item_id=item.id, output_index=item.index,
                        content_index=0, part=_text_part(item.text))
        else:
            status = "completed"
            self._event(out, "response.function_call_arguments.done", item_id=item.id, output_index=item.index,
                        arguments=item.text)
        self._event(out, "response.output_item.done", output_index=item.index, item=item.json(status))

    def _close_all(self, out: list[bytes]) -> None:
        for item in self._items:
            self._close(item, out)
        self._message = None

    def _output(self) -> list[dict[str, Any]]:
        incomplete = _status(self._finish)[0] == "incomplete"
        return [i.json("incomplete" if incomplete and i.kind == "message" else "completed") for i in self._items]

    def _last(self, out: list[bytes]) -> None:
        self._close_all(out)
        status, incomplete = _status(self._finish)
        req = self.req
        req.response = self.response = response_json(req, status, self._output(), usage_json(self._usage),
                                                     incomplete)
        if req.keep is not None:  # the stream's row is recorded before its end: stored on it
            stored = capture(req)
            if stored is not None:
                req.keep(stored)
        self._event(out, "response.completed" if status == "completed" else "response.incomplete",
                    response=self.response)

    def error(self, exc: ProxyError) -> bytes:
        """An error after the stream began: an `error` event, then `response.failed` with what had come."""
        out: list[bytes] = []
        if self._ended:
            return b""
        self._start(out)
        self._ended = True
        self._event(out, "error", code=exc.code or exc.type, message=exc.message, param=exc.param)
        code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
        items = [i.json("incomplete" if i.open else "completed") for i in self._items]
        self._event(out, "response.failed", response=response_json(
            self.req, "failed", items, usage_json(self._usage), error={"code": code, "message": exc.message}))
        return b"".join(out)


# --------------------------------------------------------------------------------------------------
# Passed through (a provider that speaks the Responses API itself: Call.native)
# --------------------------------------------------------------------------------------------------


def native_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The request as such an upstream gets it: the whole conversation in `input` (prepare put the stored one
    there) instead of `previous_response_id`, which names a response of this proxy's, and `store: false`: the
    proxy keeps what is to be kept."""
    out = {k: v for k, v in body.items() if k != "previous_response_id"}
    out["store"] = False
    return out


def render_native(req: ResponsesRequest, raw: bytes) -> bytes:
    """Such an upstream's Response (its model already the public one): `previous_response_id` put back."""
    data = orjson.loads(raw)
    data["previous_response_id"] = req.previous
    req.response = data
    return orjson.dumps(data)


class ResponsesNativeFramer:
    """Such an upstream's events, relayed one by one: `previous_response_id` put back into the Response snapshots,
    the final Response kept (`store: true`), and an error after the headers as `error` + `response.failed` with
    the output items so far, as a translated stream ends."""

    identity = False

    def __init__(self, req: ResponsesRequest) -> None:
        self.req = req
        self._buf = b""
        self._seq = 0
        self._snapshot: dict[str, Any] | None = None
        self._items: dict[int, tuple[dict[str, Any], bool]] = {}  # output_index -> (item, done)
        self._ended = False

    def _track(self, kind: str, ev: dict[str, Any]) -> None:
        """The output items so far (for `response.failed`): added, their text, done."""
        index, item = ev.get("output_index"), ev.get("item")
        if not isinstance(index, int):
            return
        if kind in ("response.output_item.added", "response.output_item.done") and isinstance(item, dict):
            self._items[index] = (item, kind.endswith(".done"))
        elif kind == "response.output_text.delta" and index in self._items:
            item = self._items[index][0]
            if not item.get("content"):
                item["content"] = [_text_part("")]
            part = item["content"][-1]
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                part["text"] += string(ev.get("delta"))

    def feed(self, blob: bytes) -> bytes:
        buf = self._buf + blob if self._buf else blob
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return b""
        self._buf = buf[end + 2:]
        out: list[bytes] = []
        for event in buf[:end].split(b"\n\n"):
            at = event.find(b"data:")
            try:
                ev = orjson.loads(event[at + 5:]) if at >= 0 else None
            except orjson.JSONDecodeError:
                ev = None
            if not isinstance(ev, dict) or not isinstance(ev.get("type"), str):
                out.append(event + b"\n\n")
                continue
            kind = ev["type"]
            if isinstance(ev.get("sequence_number"), int):
                self._seq = ev["sequence_number"] + 1
            if kind.startswith("response.output_"):
                self._track(kind, ev)
            response = ev.get("response")
            if isinstance(response, dict):
                response["previous_response_id"] = self.req.previous
                self._snapshot = response
                if kind in ("response.completed", "response.incomplete"):
                    self.req.response = response
                    if self.req.keep is not None:
                        stored = capture(self.req)
                        if stored is not None:
                            self.req.keep(stored)
            if kind in ("response.completed", "response.incomplete", "response.failed", "error"):
                self._ended = True
            out.append(sse_event(kind, ev))
        return b"".join(out)

    def end(self) -> bytes:
        return b""

    def error(self, exc: ProxyError) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        seq = self._seq
        snapshot = self._snapshot or response_json(self.req, "in_progress", [])
        code = "rate_limit_exceeded" if exc.status == 429 else "server_error"
        output = [item if done else {**item, "status": "incomplete"} for _, (item, done) in sorted(self._items.items())]
        failed = {**snapshot, "status": "failed", "output": output, "error": {"code": code, "message": exc.message}}
        return (sse_event("error", {"type": "error", "sequence_number": seq, "code": exc.code or exc.type,
                                    "message": exc.message, "param": exc.param})
                + sse_event("response.failed", {"type": "response.failed", "sequence_number": seq + 1,
                                                "response": failed}))
