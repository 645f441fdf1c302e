"""The ingresses whose API is translated to and from chat completions: OpenAI's Responses and Anthropic's
Messages (their translators: ingress/responses_api.py, ingress/anthropic_messages.py), put together as the
exchange calls them. Pure, like the translators."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from . import anthropic_messages, responses_api
from .base import Call, Framer, Scope, as_sent


@dataclass(slots=True)
class TranslatedIngress:
    """`to_chat(body) -> (neutral chat body, state)`; the state is what `render` and `framer` get back. Streams
    always ask for usage: the translated stream's last event carries it. The usage row's endpoint is the backend
    operation (chat.completions), its client API the ingress's name."""

    name: str
    paths: tuple[str, ...]
    to_chat: Callable[[dict[str, Any]], tuple[dict[str, Any], Any]]
    render_reply: Callable[[Any, bytes], bytes]
    new_framer: Callable[[Any], Framer]
    error_envelope: Callable[[ProxyError], bytes]
    headers: Callable[[Mapping[str, str]], Mapping[str, str]] = as_sent
    endpoint: str = "chat.completions"
    # The exchange's step before parse (Ingress.prepare), and the stored completion of a rendered reply (its state).
    prepare: Callable[[dict[str, Any], Scope], Awaitable[dict[str, Any]]] | None = None
    keeps: Callable[[Any], dict[str, Any] | None] | None = None
    # How the API goes to a provider that speaks it (Call.native); None: it always goes translated.
    native: NativeSide | None = None

    def credentials(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return self.headers(headers)

    def parse(self, body: dict[str, Any]) -> Call:
        # Translated even when a deployment may take it as it came: another may be tried after it.
        chat, state = self.to_chat(body)
        native = self.native
        if native is None:
            return Call(chat["model"], "chat.completions", chat, chat.get("stream") is True, True, state)
        return Call(chat["model"], "chat.completions", chat, chat.get("stream") is True, True, state,
                    native=self.name, native_body=native.body(body))

    def render(self, call: Call, raw: bytes) -> bytes:
        if call.served_natively and self.native is not None:  # already this API's reply, the public model in it
            return self.native.render(call.state, raw)
        return self.render_reply(call.state, raw)

    def framer(self, call: Call) -> Framer:
        if call.served_natively and self.native is not None:
            return self.native.framer(call.state)
        return self.new_framer(call.state)

    def error_body(self, exc: ProxyError) -> bytes:
        return self.error_envelope(exc)

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        # After render(): the reply as the client got it is in the state.
        return self.keeps(call.state) if self.keeps is not None else None


@dataclass(frozen=True, slots=True)
class NativeSide:
    """How an API goes to a provider that speaks it itself: the request as that upstream gets it, its reply
    (state, raw) -> the client's, and the framer of its stream (state)."""

    body: Callable[[dict[str, Any]], dict[str, Any]]
    render: Callable[[Any, bytes], bytes]
    framer: Callable[[Any], Framer]


class NativeFramer:
    """A stream the upstream sent in the client's API: relayed as it is (identity), no terminator of ours (its
    own last event ends it), an error after the headers in the API's own event."""

    __slots__ = ("_error",)
    identity = True

    def __init__(self, error: Callable[[ProxyError], bytes]) -> None:
        self._error = error

    def feed(self, blob: bytes) -> bytes:
        return blob

    def end(self) -> bytes:
        return b""

    def error(self, exc: ProxyError) -> bytes:
        return self._error(exc)


def _as_sent(body: dict[str, Any]) -> dict[str, Any]:
    return body


def _reply_as_sent(state: Any, raw: bytes) -> bytes:
    return raw


_MESSAGES_FRAMER = NativeFramer(anthropic_messages.error_event)  # no state: one for every stream


# Responses are kept (`store: true`, usage.store_completions on) for previous_response_id and GET /v1/responses/{id};
# Messages have nothing of the kind.
RESPONSES = TranslatedIngress(responses_api.NAME, responses_api.PATHS, responses_api.parse, responses_api.render,
                              responses_api.ResponsesFramer, responses_api.error_body,
                              prepare=responses_api.prepare, keeps=responses_api.capture,
                              native=NativeSide(responses_api.native_body, responses_api.render_native,
                                                responses_api.ResponsesNativeFramer))
MESSAGES = TranslatedIngress(anthropic_messages.NAME, anthropic_messages.PATHS, anthropic_messages.parse,
                             anthropic_messages.render, anthropic_messages.MessagesFramer,
                             anthropic_messages.error_body, anthropic_messages.credentials,
                             native=NativeSide(_as_sent, _reply_as_sent, lambda state: _MESSAGES_FRAMER))
