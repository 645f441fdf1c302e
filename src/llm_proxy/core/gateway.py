"""One request's use case: resolve the model, check policy, call the provider, translate back."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import BadRequest, Forbidden, ProxyError, ledger_error_code, ledger_error_type
from ..ports import Policy
from ..providers.base import Endpoint, StreamDecoder, Target
from ..providers.http import UpstreamClient, UpstreamResponse
from ..providers.upstream_errors import scrub_error
from ..types import Principal, Usage, UsageEvent
from .resilience import ELSEWHERE, NEVER, Deployment, retry_after_seconds, retry_scope
from .routing import Route, Router

_log = logging.getLogger("llm_proxy.upstream")


def log_withheld(ctx: RequestContext, exc: ProxyError) -> None:
    """What an upstream said that the client was not shown (internals, a credential rejection), scrubbed."""
    if exc.detail is not None:
        _log.warning("upstream error detail withheld from the client", extra={
            "request_id": ctx.request_id, "provider": ctx.provider_id, "status": exc.status,
            "upstream_message": exc.detail})


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
    recorded: bool = False  # the usage event was already handed to the ledger
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


def unreadable(provider_id: str | None, exc: Exception, what: str = "a stream event") -> ProxyError:
    """A translator failed on what the upstream sent. Its exception may quote the upstream's bytes (say
    `int('<value>')`), so only its class is logged."""
    _log.warning("unreadable upstream response", extra={"provider": provider_id, "exc_type": type(exc).__name__})
    return ProxyError(f"Upstream provider '{provider_id}' sent {what} that could not be read", status=502,
                      type="api_error", code="bad_upstream_response")


class StreamSession:
    """An upstream stream being relayed: yields OpenAI SSE frames as they arrive.

    The gateway has read the upstream up to its first frame (`pending`) before handing the session
    over, so a stream that fails before anything could reach the client is retried instead.
    """

    __slots__ = ("_chunks", "_ctx", "_decoder", "_dep", "_done", "_finished", "_pending", "_resp")

    def __init__(
        self,
        resp: UpstreamResponse,
        decoder: StreamDecoder,
        ctx: RequestContext,
        chunks: AsyncIterator[bytes] | None = None,
        pending: list[bytes] | None = None,
        dep: Deployment | None = None,
        done: bool = False,
    ) -> None:
        self._resp = resp
        self._decoder = decoder
        self._ctx = ctx
        self._chunks = chunks if chunks is not None else resp.chunks()
        self._pending = pending
        self._dep = dep  # tracked for least_busy and the circuit breaker (None: single deployment)
        self._done = done  # upstream ended and decoder closed during the pre-read
        self._finished = False

    async def frames(self) -> AsyncGenerator[bytes, None]:
        ctx = self._ctx
        decoder = self._decoder
        clean = failed = False
        try:
            # Frames decoded from one upstream read go out in one write: one syscall, not one per event.
            pending = self._pending
            if pending:
                self._pending = None
                yield pending[0] if len(pending) == 1 else b"".join(pending)
            if not self._done:
                async for chunk in self._chunks:
                    out = decoder.feed(chunk)
                    if out:
                        if ctx.first_token_at is None:
                            ctx.first_token_at = time.perf_counter()
                        yield out[0] if len(out) == 1 else b"".join(out)
                out = decoder.close()
                if out:
                    yield b"".join(out)
            clean = True
        except ProxyError:
            failed = True  # the upstream broke the stream (not the client)
            raise
        except Exception as exc:  # a translator choked on the upstream's bytes
            failed = True
            raise unreadable(ctx.provider_id, exc) from None
        finally:
            self._finish(clean, failed)

    def close(self) -> None:
        """Drop the upstream if the frames were not relayed to the end (idempotent)."""
        self._finish(False, False)

    def _finish(self, clean: bool, failed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        ctx = self._ctx
        ctx.upstream_ended = time.perf_counter()
        ctx.usage = self._decoder.usage
        err = self._decoder.error  # the upstream's own error event, relayed (rebuilt) as the last frame
        if err is not None:
            ctx.status, ctx.error_type = err.status, ledger_error_type(err)
            log_withheld(ctx, err)
        if clean:
            self._resp.release()
        else:
            self._resp.close()  # cancels the upstream request (client gone, or error)
        dep = self._dep
        if dep is not None:
            dep.in_flight -= 1
            if failed:
                try:
                    dep.failed(asyncio.get_running_loop().time())
                except RuntimeError:  # no running loop (finalised outside it): nothing to time
                    pass


_STREAMABLE: frozenset[str] = frozenset({"chat.completions", "completions"})


def _attempt_entry(ctx: RequestContext, target: Target, status: int, error: str | None) -> dict[str, Any]:
    started = ctx.upstream_started
    ms = (time.perf_counter() - started) * 1000.0 if started is not None else 0.0
    return {
        "provider": target.provider_id,
        "upstream_model": target.upstream_model,
        "status": status,
        "error": error,
        "ms": round(ms, 1),
    }


class Gateway:
    def __init__(self, router: Router, client: UpstreamClient, policy: Policy) -> None:
        self.router = router
        self.client = client
        self.policy = policy

    def _sanitize(self, ctx: RequestContext, exc: ProxyError) -> None:
        """Last pass over a failed attempt's error (error path only): every provider's credentials scrubbed from
        what the client and the log will see, then the withheld upstream detail logged."""
        scrub_error(exc, [s for p in self.router.providers.values() for s in p.secrets()])
        log_withheld(ctx, exc)

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

        want_usage = False
        if stream:
            opts = body.get("stream_options")
            want_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
        if route.pool.single_shot:
            # One deployment, one attempt: no health bookkeeping, no clock, nothing allocated for retries.
            target = route.target
            ctx.provider_id = target.provider_id
            ctx.upstream_model = target.upstream_model
            ctx.attempts += 1
            try:
                return await self._attempt(
                    ctx, endpoint, body, stream, want_usage, route.pool.deployments[0], target, None, None
                )
            except ProxyError as exc:
                self._sanitize(ctx, exc)
                ctx.extra["attempts"] = [_attempt_entry(ctx, target, exc.status, ledger_error_code(exc))]
                raise
        return await self._with_retries(ctx, endpoint, body, route, stream, want_usage)

    async def _with_retries(
        self,
        ctx: RequestContext,
        endpoint: Endpoint,
        body: dict[str, Any],
        route: Route,
        stream: bool,
        want_usage: bool,
    ) -> bytes | StreamSession:
        """Attempts on the route's deployments until one answers, within the pool's retry budget.

        Nothing has reached the client while this runs (a stream is returned only once its first frame
        is in hand), so every attempt may be retried; the request's own faults (4xx) never are.
        """
        pool = route.pool
        targets = route.targets
        multi = pool.multi
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = None if pool.deadline is None else now + pool.deadline
        tried = banned = retried = 0
        log: list[dict[str, Any]] | None = None
        dep = pool.pick(now)
        assert dep is not None
        while True:
            target = targets[dep.index]
            ctx.provider_id = target.provider_id
            ctx.upstream_model = target.upstream_model
            ctx.attempts += 1
            probe = dep.begin(now)
            try:
                result = await self._attempt(
                    ctx, endpoint, body, stream, want_usage, dep, target, deadline, dep if multi else None
                )
            except ProxyError as exc:
                self._sanitize(ctx, exc)
                dep.in_flight -= 1
                now = loop.time()
                scope = retry_scope(exc)
                if scope == NEVER:
                    dep.abandoned(probe)
                else:
                    dep.failed(now, retry_after_seconds(exc.headers))
                if log is None:
                    log = []
                log.append(_attempt_entry(ctx, target, exc.status, ledger_error_code(exc)))
                tried |= 1 << dep.index
                if scope == ELSEWHERE:
                    banned |= 1 << dep.index
                nxt = pool.pick(now, tried, banned) if scope != NEVER and ctx.attempts < pool.max_attempts else None
                delay = 0.0
                if nxt is not None:
                    if (tried >> nxt.index) & 1:  # again on a deployment that already failed this request
                        retried += 1
                        delay = pool.backoff(retried)
                        if nxt.not_before - now > delay:  # it asked us to wait (retry-after)
                            delay = nxt.not_before - now
                    if deadline is not None and now + delay >= deadline:
                        nxt = None
                if nxt is None:
                    ctx.extra["attempts"] = log
                    raise
                if delay > 0:
                    try:
                        await asyncio.sleep(delay)
                    except asyncio.CancelledError:
                        log.append({"provider": None, "status": 499, "error": "client_disconnected", "ms": 0.0})
                        ctx.extra["attempts"] = log
                        raise
                    now = loop.time()
                dep = nxt
                continue
            except BaseException as exc:
                dep.in_flight -= 1
                dep.abandoned(probe)
                if log is not None:
                    gone = isinstance(exc, asyncio.CancelledError)
                    log.append(_attempt_entry(ctx, target, 499 if gone else 500,
                                              "client_disconnected" if gone else "server_error"))
                    ctx.extra["attempts"] = log
                raise
            if not multi or not isinstance(result, StreamSession):
                dep.in_flight -= 1  # a stream leaves the count when it ends (StreamSession)
            dep.succeeded()
            if log is not None:
                log.append(_attempt_entry(ctx, target, 200, None))
                ctx.extra["attempts"] = log
            return result

    async def _attempt(
        self,
        ctx: RequestContext,
        endpoint: Endpoint,
        body: dict[str, Any],
        stream: bool,
        want_usage: bool,
        dep: Deployment,
        target: Target,
        deadline: float | None,
        track: Deployment | None,
    ) -> bytes | StreamSession:
        """One request to one deployment. Returns once the answer is complete (non-streamed) or the
        stream's first frame is in hand; raises ProxyError otherwise, with the upstream connection closed."""
        provider = dep.provider
        ctx.upstream_started = time.perf_counter()
        ctx.upstream_ended = None
        req = provider.build_request(endpoint, body, target, stream)
        await provider.sign(req)
        resp = await self.client.send(target.provider_id, req, dep.timeouts, deadline)
        try:
            if resp.status >= 400:
                raw = await resp.read()
                resp.release()
                ctx.upstream_ended = time.perf_counter()
                try:
                    err = provider.parse_error(resp.status, resp.headers, raw)
                except Exception as exc:
                    err = unreadable(target.provider_id, exc, "an error body")
                raise err
            if not stream:
                raw = await resp.read()
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
            decoder = provider.stream_decoder(endpoint, target, want_usage)
            chunks = resp.chunks()
            pending: list[bytes] = []
            done = False
            try:
                while not pending:
                    try:
                        chunk = await anext(chunks)
                    except StopAsyncIteration:
                        pending = decoder.close()
                        done = True
                        break
                    pending = decoder.feed(chunk)
            except ProxyError:
                raise
            except Exception as exc:
                raise unreadable(target.provider_id, exc) from None
            if decoder.error is not None:
                # The upstream's error event came before anything reached the client: answer with its status
                # (and retry it like any other failed attempt) instead of a 200 that ends in an error event.
                raise decoder.error
            if pending:
                ctx.first_token_at = time.perf_counter()
        except BaseException:
            resp.close()  # drops the connection: this is also how an upstream request is cancelled
            raise
        return StreamSession(resp, decoder, ctx, chunks, pending, track, done)
