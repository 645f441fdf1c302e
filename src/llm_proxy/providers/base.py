"""Contracts every provider implements; pure data in, pure data out, no I/O except in sign()."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..errors import ProxyError
from ..types import Usage

# The OpenAI-compatible client APIs the gateway serves.
Endpoint = Literal["chat.completions", "completions", "embeddings"]


@dataclass(frozen=True, slots=True)
class Target:
    """Where one request goes: a provider instance and the upstream's own model name."""

    provider_id: str
    upstream_model: str
    public_model: str


@dataclass(slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    stream: bool = False
    # Decoder to use for a streamed body: "sse" (text/event-stream) or "aws-eventstream".
    framing: str = "sse"
    extra: dict[str, Any] = field(default_factory=dict)


class StreamDecoder(Protocol):
    """Turns raw upstream stream bytes into OpenAI `chat.completion.chunk` SSE frames.

    Each returned frame is a complete SSE event, e.g. b'data: {...}\\n\\n'. The terminating
    b'data: [DONE]\\n\\n' is never returned: the web layer writes it. `usage` holds the token counts
    once the upstream has reported them (as far as known when the stream is cut short).

    `done`: True once the upstream has ended its answer (its end marker, a finish reason seen by close(), or
    an error event the decoder relayed), after which the gateway reads no more; False (or None) while it has
    not: a body that ends then was cut short.
    """

    usage: Usage | None
    done: bool | None
    # The upstream's in-stream error, once one was turned into the frame that ends the stream.
    error: ProxyError | None

    def feed(self, data: bytes) -> list[bytes]: ...

    def close(self) -> list[bytes]: ...


class Provider(Protocol):
    """One configured upstream (a provider instance from config)."""

    id: str
    type: str

    def missing_credentials(self) -> list[str]:
        """Names of credentials that are not set (empty list when ready)."""
        ...

    def secrets(self) -> list[str | None]:
        """The credentials this provider sends (current values, including credential-bearing configured headers):
        scrubbed from anything its upstream returns before it is relayed or logged."""
        ...

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        """Translate an OpenAI request body (already parsed) into the upstream's request, unsigned.

        Raise errors.BadRequest for input the provider cannot express."""
        ...

    async def sign(self, request: UpstreamRequest) -> None:
        """Add credentials to the request (bearer, api-key, x-api-key, SigV4...)."""
        ...

    def parse_response(self, endpoint: Endpoint, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        """Translate a successful non-streamed upstream body into OpenAI JSON bytes.

        The returned JSON's `model` must be target.public_model."""
        ...

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> StreamDecoder:
        """A fresh decoder for one streamed response.

        When client_wants_usage is False the usage-only chunk is removed from what the client sees
        (usage is still recorded)."""
        ...

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        """Map an upstream error response to a ProxyError with the right status and OpenAI type.

        A 429 keeps `retry-after`. Everything goes through upstream_errors.upstream_error, which scrubs credentials
        and relays the upstream's type/code/param only when they are plain tokens."""
        ...


class NativeProvider(Protocol):
    """What a provider that speaks a client API itself adds (optional: the core looks for `native_request`).

    `api` is the client API's name (an ingress's: "anthropic.messages"); `body` the client's request as it came."""

    def native_request(self, api: str, body: dict[str, Any], target: Target, stream: bool) -> UpstreamRequest | None:
        """The request as it came (the model renamed to target.upstream_model), unsigned; None: this provider does
        not take `api` as it is (not its API, or `native_client_api: false`), the neutral body goes instead."""
        ...

    def parse_native(self, api: str, raw: bytes, target: Target) -> tuple[bytes, Usage | None]:
        """A non-streamed reply in `api`'s shape, its model target.public_model, and its usage."""
        ...

    def native_decoder(self, api: str, target: Target) -> StreamDecoder:
        """A decoder that relays `api`'s own stream events (model renamed, errors rebuilt) and reads their usage."""
        ...
