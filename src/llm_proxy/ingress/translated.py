"""The ingresses whose API is translated to and from chat completions: OpenAI's Responses and Anthropic's
Messages (their translators: ingress/responses_api.py, ingress/anthropic_messages.py), put together as the
exchange calls them. Pure, like the translators."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ProxyError
from . import anthropic_messages, responses_api
from .base import Call, Framer, as_sent


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

    def credentials(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        return self.headers(headers)

    def parse(self, body: dict[str, Any]) -> Call:
        chat, state = self.to_chat(body)
        return Call(chat["model"], "chat.completions", chat, chat.get("stream") is True, True, state)

    def render(self, call: Call, raw: bytes) -> bytes:
        return self.render_reply(call.state, raw)

    def framer(self, call: Call) -> Framer:
        return self.new_framer(call.state)

    def error_body(self, exc: ProxyError) -> bytes:
        return self.error_envelope(exc)

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        # Nothing is kept: what the stored completions table holds is what GET /v1/chat/completions lists.
        return None


# Nothing is stored for Responses yet, `store: true` or not: nothing could read a stored response back (no
# previous_response_id lookup, no GET /v1/responses); responses_api.capture() / history_of() are the pieces that
# lookup will use.
RESPONSES = TranslatedIngress(responses_api.NAME, responses_api.PATHS, responses_api.parse, responses_api.render,
                              responses_api.ResponsesFramer, responses_api.error_body)
MESSAGES = TranslatedIngress(anthropic_messages.NAME, anthropic_messages.PATHS, anthropic_messages.parse,
                             anthropic_messages.render, anthropic_messages.MessagesFramer,
                             anthropic_messages.error_body, anthropic_messages.credentials)
