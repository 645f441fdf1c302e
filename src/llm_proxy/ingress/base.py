"""What a client API is to the rest of the proxy: an ingress turns its own request into a neutral Call, and the
neutral reply (OpenAI JSON bytes, OpenAI `chat.completion.chunk` SSE frames) into its own reply.

The neutral form is the one every provider translates from and to (providers/*: build_request / parse_response /
stream_decoder), so a new client API needs an ingress module (and its translators), nothing in other layers:
web/exchange.py mounts every registered ingress (ingress/registry.py) on one exchange handler.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ProxyError
from ..types import Principal


@dataclass(slots=True)
class Call:
    """What an ingress hands to the core: a neutral request. Never mutated after parse(), but for served_natively."""

    model: str
    endpoint: str  # the backend operation: "chat.completions" | "completions" | "embeddings"
    body: dict[str, Any]  # the neutral (OpenAI-shaped) body
    stream: bool
    want_usage: bool  # the client asked for usage in the stream (the core adds an estimate if none comes)
    state: Any = None  # the ingress's own (say the original request, for rendering the reply)
    # The client's own API (the ingress's name) and its request, for a deployment that speaks that API itself
    # (Provider.native_request): it gets the request as it came. None: every deployment gets `body`.
    native: str | None = None
    native_body: dict[str, Any] | None = None
    # Set by the core when the deployment that answered took `native_body`: the reply is then in the client's API
    # already (render and the framer pass it on). The one field written after parse().
    served_natively: bool = False


class Framer(Protocol):
    """One stream's framing in the client's API.

    `identity`: feed() returns its argument unchanged (the OpenAI ingresses); the exchange then skips the call
    per frame, so an identity framer costs nothing on the streaming loop. end() and error() are called once."""

    identity: bool

    def feed(self, blob: bytes) -> bytes:
        """Neutral SSE frames (one or more, whole) -> the bytes to write (b"": nothing to write yet)."""
        ...

    def end(self) -> bytes:
        """The terminator, after the last frame (OpenAI: b"data: [DONE]\\n\\n")."""
        ...

    def error(self, exc: ProxyError) -> bytes:
        """An in-band error after the headers went out (the stream ends after it)."""
        ...


class StoredResponses(Protocol):
    """The responses the ledger keeps (usage.store_completions): what an ingress's prepare step may read."""

    async def stored_response(self, response_id: str, subject: str) -> dict[str, Any] | None:
        """The stored completion (`input_messages`, `response`) of the response `response_id` that `subject`
        made, or None (none such, or another caller's: the two are not told apart)."""
        ...


@dataclass(slots=True)
class Scope:
    """What an ingress's optional prepare step gets: the caller, the stored responses (None: nothing is kept,
    usage.store_completions is off) and `keep`, which puts a stored completion on the request's usage row (None:
    nothing is kept); a streamed reply has no `capture` step, so its framer calls `keep` before the stream ends."""

    principal: Principal
    store: StoredResponses | None
    keep: Callable[[dict[str, Any]], None] | None


class Ingress(Protocol):
    """One client API (say OpenAI's chat completions), mounted on `paths`.

    It may also have `async prepare(body, scope) -> body`, which the exchange awaits after authentication and
    before parse() (say to read a stored conversation the request continues); an ingress without it (the OpenAI
    ones) costs the request nothing for it."""

    name: str  # "openai.chat", "openai.completions", "openai.embeddings": the usage row's client API
    endpoint: str  # the usage row's endpoint, also for requests refused before parse() (401, 413, bad JSON)
    paths: tuple[str, ...]  # where it is mounted (POST), e.g. ("/v1/chat/completions", ...)

    def credentials(self, headers: Mapping[str, str]) -> Mapping[str, str]:
        """The headers as the authenticator should see them (Anthropic's x-api-key -> Authorization)."""
        ...

    def parse(self, body: dict[str, Any]) -> Call:
        """Validate (raise BadRequest, ...) and build the neutral Call. `body` is a parsed JSON object."""
        ...

    def render(self, call: Call, raw: bytes) -> bytes:
        """The neutral JSON reply -> this API's JSON reply."""
        ...

    def framer(self, call: Call) -> Framer:
        """The framing of one streamed reply."""
        ...

    def error_body(self, exc: ProxyError) -> bytes:
        """This API's error envelope (a JSON body; the status and headers are the exception's)."""
        ...

    def capture(self, call: Call, raw: bytes) -> dict[str, Any] | None:
        """The stored completion for the ledger (usage.store_completions on), or None: nothing to store."""
        ...


def as_sent(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Ingress.credentials of the APIs whose clients send `Authorization` as the authenticator reads it."""
    return headers
