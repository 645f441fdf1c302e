"""One request's use case: resolve the model, check policy, call the provider, translate back."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, Forbidden, ProxyError
from ..ports import Policy
from ..providers.base import Endpoint, StreamDecoder
from ..providers.http import UpstreamClient, UpstreamResponse
from ..types import Principal, Usage, UsageEvent
from .routing import Router


@dataclass(slots=True)
class RequestContext:
    """What is known about one request so far; becomes its UsageEvent when it ends."""

    request_id: str
    path: str
    started_wall: float
    started: float  # perf_counter
    principal: Principal | None = None
    endpoint: str | None = None
    model: str | None = None
    provider_id: str | None = None
    upstream_model: str | None = None
    streamed: bool = False
    status: int = 0
    error_type: str | None = None
    usage: Usage | None = None
    first_token_at: float | None = None
    upstream_started: float | None = None
    upstream_ended: float | None = None
    attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_event(self) -> UsageEvent:
        now = time.perf_counter()
        u = self.usage
        p = self.principal
        up_ms = None
        if self.upstream_started is not None:
            up_ms = ((self.upstream_ended or now) - self.upstream_started) * 1000.0
        return UsageEvent(
            request_id=self.request_id,
            started_at=self.started_wall,
            ended_at=self.started_wall + (now - self.started),
            endpoint=self.endpoint or self.path,
            status=self.status,
            subject=p.subject if p else None,
            username=p.username if p else None,
            model=self.model,
            provider_id=self.provider_id,
            upstream_model=self.upstream_model,
            streamed=self.streamed,
            error_type=self.error_type,
            prompt_tokens=u.prompt_tokens if u else None,
            completion_tokens=u.completion_tokens if u else None,
            total_tokens=u.total_tokens if u else None,
            cached_tokens=u.cached_tokens if u else None,
            latency_ms=(now - self.started) * 1000.0,
            ttft_ms=(self.first_token_at - self.started) * 1000.0 if self.first_token_at else None,
            upstream_latency_ms=up_ms,
            attempts=self.attempts,
            extra=self.extra,
        )


class StreamSession:
    """An upstream stream being relayed: yields OpenAI SSE frames as they arrive."""

    __slots__ = ("_ctx", "_decoder", "_resp")

    def __init__(self, resp: UpstreamResponse, decoder: StreamDecoder, ctx: RequestContext) -> None:
        self._resp = resp
        self._decoder = decoder
        self._ctx = ctx

    async def frames(self) -> AsyncIterator[bytes]:
        ctx = self._ctx
        decoder = self._decoder
        clean = False
        try:
            async for chunk in self._resp.chunks():
                out = decoder.feed(chunk)
                if out:
                    if ctx.first_token_at is None:
                        ctx.first_token_at = time.perf_counter()
                    for f in out:
                        yield f
            for f in decoder.close():
                yield f
            clean = True
        finally:
            ctx.upstream_ended = time.perf_counter()
            ctx.usage = decoder.usage
            if clean:
                self._resp.release()
            else:
                self._resp.close()  # cancels the upstream request (client gone, or error)


_STREAMABLE: frozenset[str] = frozenset({"chat.completions", "completions"})


class Gateway:
    def __init__(self, router: Router, client: UpstreamClient, policy: Policy) -> None:
        self.router = router
        self.client = client
        self.policy = policy

    async def handle(self, ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any]) -> bytes | StreamSession:
        ctx.endpoint = endpoint
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("'model' is required and must be a string", param="model", code="missing_model")
        ctx.model = model
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", param="stream")
        if stream and endpoint not in _STREAMABLE:
            raise BadRequest(f"streaming is not supported for {endpoint}", param="stream")
        if endpoint == "chat.completions":
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty array", param="messages")
        elif endpoint == "embeddings" and "input" not in body:
            raise BadRequest("'input' is required", param="input")
        ctx.streamed = stream

        route = self.router.resolve(model)
        principal = ctx.principal
        if principal is not None and not self.policy.may_use(principal, route.canonical):
            raise Forbidden(f"You are not allowed to use the model '{model}'", param="model")
        target = route.target
        provider = route.provider
        ctx.provider_id = target.provider_id
        ctx.upstream_model = target.upstream_model

        want_usage = False
        if stream:
            opts = body.get("stream_options")
            want_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        req = provider.build_request(endpoint, body, target, stream)
        await provider.sign(req)
        ctx.attempts += 1
        ctx.upstream_started = time.perf_counter()
        resp = await self.client.send(target.provider_id, req, route.timeouts)
        if resp.status >= 400:
            try:
                raw = await resp.read()
            finally:
                resp.release()
            ctx.upstream_ended = time.perf_counter()
            raise provider.parse_error(resp.status, resp.headers, raw)
        if not stream:
            try:
                raw = await resp.read()
            except ProxyError:
                resp.close()
                raise
            ctx.upstream_ended = time.perf_counter()
            resp.release()
            try:
                out, usage = provider.parse_response(endpoint, raw, target)
            except ProxyError:
                raise
            except Exception:
                raise ProxyError(
                    f"Upstream provider '{target.provider_id}' returned a body that could not be read",
                    status=502, type="api_error", code="bad_upstream_response",
                ) from None
            ctx.usage = usage
            return out
        return StreamSession(resp, provider.stream_decoder(endpoint, target, want_usage), ctx)
