"""One request's use case: resolve the model, check policy, call the provider, translate back."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..errors import (
    Forbidden,
    ProxyError,
    UpstreamTimeout,
    UpstreamUnreachable,
    ledger_error_code,
    ledger_error_type,
)
from ..ingress.base import Call
from ..ports import Policy
from ..providers.base import Endpoint, Provider, StreamDecoder, Target, UpstreamRequest
from ..providers.http import UpstreamClient, UpstreamResponse
from ..providers.sse import frame
from ..providers.upstream_errors import scrub_error
from ..types import Principal, Usage, UsageEvent
from .resilience import ELSEWHERE, NEVER, Deployment, retry_after_seconds, retry_scope
from .routing import Route, Router

log = logging.getLogger("llm_proxy.gateway")


_RID_PREFIX = "req_"
_RID_PREFIX_LEN = len(_RID_PREFIX)
_rid_stem = _RID_PREFIX + os.urandom(10).hex()
_rid_format = _rid_stem + "%012x"  # (the stem is hex digits: no other % in it; %-format is ~30% under an f-string's)
_rid_counter = itertools.count(1)


def new_request_id() -> str:
    """`req_` and 32 hex digits: unique per process (a random stem) and cheap (no syscall per request).

    Upstreams get the 32 hex digits alone as their `x-request-id`: request-id middlewares that insist on a UUID
    (llama-cpp-python's server answers any other value with an empty 400) take that form."""
    return _rid_format % next(_rid_counter)
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
    client_request_id: str | None = None  # the caller's own id (x-client-request-id / x-request-id), checked
    client_api: str | None = None  # the ingress's name ("openai.chat"): the usage row's client API
    draining: bool = False  # it came while the server was shutting down
    attempt_log: list[dict[str, Any]] | None = None  # one entry per upstream attempt (retries, or a failure)
    completion: dict[str, Any] | None = None  # the stored completion (Ingress.capture, usage.store_completions)
    trace: Any = None  # core/tracing.py's RequestTrace when tracing is on
    traceparent: str | None = None  # sent upstream with the current attempt (tracing on)
    # More for the row's `extra` (JSON); the typed fields above go there under their ledger names (to_event).
    extra: dict[str, Any] = field(default_factory=dict)
    limit: Any = None  # the Limiter's ticket (headers for the answer; settled when the request ends)
    native: Call | None = None  # a call a deployment may take in the client's own API (Call.native)
    # A stream cut short without usage, while token or dollar limits apply: its estimate, for those limits.
    partial_usage: Callable[[], Awaitable[Usage]] | None = None

    def to_event(self, cost_usd: float | None = None) -> UsageEvent:
        now = time.perf_counter()
        u = self.usage
        p = self.principal
        up_ms = None
        if self.upstream_started is not None:
            up_ms = ((self.upstream_ended or now) - self.upstream_started) * 1000.0
        extra = self.extra
        if self.client_request_id is not None or self.draining or self.attempt_log is not None \
                or self.completion is not None:
            # The ledger's (and the journal's) names for them, in the order they always had.
            extra = dict(extra)
            if self.client_request_id is not None:
                extra["client_request_id"] = self.client_request_id
            if self.draining:
                extra["draining"] = True
            if self.attempt_log is not None:
                extra["attempts"] = self.attempt_log
            if self.completion is not None:
                extra["completion"] = self.completion
        elapsed = now - self.started
        first = self.first_token_at
        # Positional, in UsageEvent's field order (checked below, at import): once per request, and 25 keywords
        # cost about 1 us more to match than the same values by position.
        if u is None:
            prompt = completion = total = cached = None
            estimated = False
        else:
            prompt, completion, total, cached, estimated = (u.prompt_tokens, u.completion_tokens, u.total_tokens,
                                                             u.cached_tokens, u.estimated)
        return UsageEvent(
            self.request_id, self.started_wall, self.started_wall + elapsed, self.endpoint or self.path,
            self.status, p.subject if p else None, p.username if p else None, self.model, self.provider_id,
            self.upstream_model, self.streamed, self.error_type, prompt, completion, total, cached, elapsed * 1000.0,
            (first - self.started) * 1000.0 if first else None, up_ms, self.attempts, extra, estimated, cost_usd,
            (p.groups or None) if p else None, self.client_api,
        )


# to_event() passes UsageEvent's fields by position: it must learn of any change to them.
if tuple(f.name for f in dataclasses.fields(UsageEvent)) != (
    "request_id", "started_at", "ended_at", "endpoint", "status", "subject", "username", "model", "provider_id",
    "upstream_model", "streamed", "error_type", "prompt_tokens", "completion_tokens", "total_tokens",
    "cached_tokens", "latency_ms", "ttft_ms", "upstream_latency_ms", "attempts", "extra", "usage_estimated",
    "cost_usd", "groups", "client_api",
):
    raise RuntimeError("UsageEvent changed: update RequestContext.to_event()")


# Frames a stream keeps for an estimate of its completion when the upstream reports no usage; past this the
# count of the kept part is scaled by the bytes relayed in all.
_KEEP_BYTES = 1 << 20
# (provider id, upstream model) -> whether its last complete stream reported usage; bounded (passthrough
# providers take model names from clients).
_REPORTS_MAX = 4096


class UsageEstimate:
    """What a stream needs to estimate its usage if the upstream reports none (core/usage_estimate.py).

    `keep`: whether the stream keeps (references to) its frames for that. An upstream whose last stream for this
    model reported usage is trusted to again, so normal upstreams hold no frames; if one then does not, that
    row has no counts (NULL, reported as such) and the next streams are estimated."""

    __slots__ = ("_known", "body", "endpoint", "keep", "reports", "target", "want_usage")

    def __init__(self, endpoint: str, body: dict[str, Any], target: Target, want_usage: bool,
                 reports: dict[tuple[str, str], bool]) -> None:
        self.endpoint = endpoint
        self.body = body
        self.target = target
        self.want_usage = want_usage
        self.reports = reports
        self._known = known = reports.get((target.provider_id, target.upstream_model))
        self.keep = known is not True

    def reported(self, yes: bool) -> None:
        if yes is self._known:  # what the last stream said (the usual case): nothing to write
            return
        reports = self.reports
        if len(reports) >= _REPORTS_MAX:
            reports.clear()
        reports[(self.target.provider_id, self.target.upstream_model)] = yes

    async def stream_usage(self, frames: list[bytes], relayed: int, kept: int) -> tuple[Usage, bytes | None]:
        """The estimated usage, and the usage chunk for a client that asked for one."""
        from . import usage_estimate

        texts, head = usage_estimate.stream_texts(frames)
        prompt, framing = usage_estimate.prompt_texts(self.endpoint, self.body)
        scale = relayed / kept if kept else 1.0
        usage = await usage_estimate.estimate(self.target.upstream_model, prompt, framing, texts, scale)
        if not self.want_usage:
            return usage, None
        chunk = {
            "id": head.get("id", ""),
            "object": head.get("object", "chat.completion.chunk"),
            "created": head.get("created", int(time.time())),
            "model": self.target.public_model,
            "choices": [],
            "usage": usage.to_openai(),
        }
        return usage, frame(orjson.dumps(chunk))


async def _estimate_response(endpoint: str, body: dict[str, Any], model: str, out: bytes) -> tuple[bytes, Usage]:
    """A non-streamed answer without `usage`: estimated, and added to the answer the client gets."""
    from . import usage_estimate

    data = orjson.loads(out)
    prompt, framing = usage_estimate.prompt_texts(endpoint, body)
    completion = usage_estimate.response_texts(data) if endpoint != "embeddings" else []
    usage = await usage_estimate.estimate(model, prompt, framing if endpoint == "chat.completions" else 0,
                                          completion)
    if isinstance(data, dict):
        data["usage"] = usage.to_openai() if endpoint != "embeddings" else {
            "prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens}
        out = orjson.dumps(data)
    return out, usage


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

    The end: the decoder's `done` (OpenAI's `data: [DONE]`) ends the relay at once, the connection going back
    to the pool only if its body ends properly soon after. A body that ends while `done` is False (the
    upstream's answer was cut short: no end marker, no finish reason) is an error in-band
    (`upstream_stream_truncated`); so is an upstream that hangs up, unless what came had ended the answer.
    """

    __slots__ = ("_chunks", "_ctx", "_decoder", "_dep", "_done", "_estimate", "_estimated", "_finished", "_kept",
                 "_pending", "_relayed", "_resp", "_seen", "final")

    def __init__(
        self,
        resp: UpstreamResponse,
        decoder: StreamDecoder,
        ctx: RequestContext,
        chunks: AsyncGenerator[bytes, None] | None = None,
        pending: list[bytes] | None = None,
        dep: Deployment | None = None,
        done: bool = False,
        estimate: UsageEstimate | None = None,
    ) -> None:
        self._resp = resp
        self._decoder = decoder
        self._ctx = ctx
        self._chunks = chunks if chunks is not None else resp.chunks()
        self._pending = pending
        self._dep = dep  # tracked for least_busy and the circuit breaker (None: single deployment)
        self._done = done  # upstream ended and decoder closed during the pre-read
        self._finished = False
        # The relayed frames (references, up to _KEEP_BYTES), for an estimate if no usage arrives; only while the
        # upstream is not known to report it (UsageEstimate.keep), None otherwise.
        self._estimate = estimate
        self._estimated: Usage | None = None
        self._seen: list[bytes] | None = [] if estimate is not None and estimate.keep else None
        self._kept = self._relayed = 0
        self.final = False  # the upstream has finished: the blob frames() yields now is the last

    @property
    def whole(self) -> bool:
        """The upstream's answer came whole with the pre-read (and was not cut short): finish() has its bytes,
        with no generator to run."""
        return self._done and not (self._decoder.done is False and self._decoder.error is None)

    async def finish(self) -> bytes:
        """All the stream's bytes when it is `whole`, usage settled and the upstream released (`final` set)."""
        pending = self._pending
        self._pending = None
        blob = (pending[0] if len(pending) == 1 else b"".join(pending)) if pending else b""
        seen = self._seen
        try:
            if seen is not None and self._decoder.usage is None:  # (no usage: estimated)
                if blob:
                    self._keep(seen, blob)
                return await self._end(blob, seen)
            return self._ended(blob)
        except BaseException:
            self._finish(False, False)
            raise

    async def frames(self) -> AsyncGenerator[bytes, None]:
        """The frames as they come, a blob per upstream read. The last blob is held until the upstream has
        finished (its end checked, usage known, the upstream released) and comes with `final` set, so the
        caller can record usage before the client gets its end (and write that blob and the end in one go);
        it may be b"". A stream cut short ends in a ProxyError after its last frames instead."""
        ctx = self._ctx
        decoder = self._decoder
        seen = self._seen  # frames kept (references) for an estimate in case no usage arrives
        clean = failed = False
        try:
            # Frames decoded from one upstream read go out in one write: one syscall, not one per event.
            pending = self._pending
            blob = b""
            if pending:
                self._pending = None
                blob = pending[0] if len(pending) == 1 else b"".join(pending)
                if seen is not None:
                    self._keep(seen, blob)
            if not self._done:
                if blob:
                    yield blob
                    blob = b""
                chunks = self._chunks
                finished = self._resp.finished
                try:
                    async for chunk in chunks:
                        out = decoder.feed(chunk)
                        if out:
                            if ctx.first_token_at is None:
                                ctx.first_token_at = time.perf_counter()
                            got = out[0] if len(out) == 1 else b"".join(out)
                            if seen is not None:
                                self._keep(seen, got)
                            blob = blob + got if blob else got
                        if decoder.done:
                            # Closed here, not by the loop's finalizer hook (a task and a self-pipe write).
                            await chunks.aclose()
                            break
                        if blob and not finished():  # (the body's last read: held for the end)
                            yield blob
                            blob = b""
                except (UpstreamUnreachable, UpstreamTimeout):
                    out = decoder.close()  # the upstream left or stalled: fine if the answer had ended
                    if not decoder.done:
                        if blob:
                            yield blob
                        raise
                else:
                    out = decoder.close()
                if out:
                    tail = b"".join(out)
                    if seen is not None:
                        self._keep(seen, tail)
                    blob = blob + tail if blob else tail
            if decoder.done is False and decoder.error is None:  # (an error event of the upstream's ended it)
                if blob:
                    yield blob
                raise ProxyError(
                    f"Upstream provider '{ctx.provider_id}' ended the stream before the answer was complete",
                    status=502, type="api_error", code="upstream_stream_truncated",
                )
            blob = await self._end(blob, seen)
            clean = True
            yield blob
        except ProxyError:
            failed = True  # the upstream broke the stream (not the client)
            raise
        except Exception as exc:  # a translator choked on the upstream's bytes
            failed = True
            raise unreadable(ctx.provider_id, exc) from None
        finally:
            self._finish(clean, failed)

    async def _end(self, blob: bytes, seen: list[bytes] | None) -> bytes:
        """The upstream has finished: an estimate of its usage if it reported none, then its release."""
        decoder = self._decoder
        est = self._estimate
        if est is not None and decoder.error is None and decoder.usage is None and seen is not None:
            # The upstream reported no usage (llama.cpp, no stream_options support): estimate it.
            est.reported(False)
            self._seen = None
            try:
                self._estimated, usage_frame = await est.stream_usage(seen, self._relayed, self._kept)
            except Exception:  # an estimate must never break an answer that is complete
                log.exception("usage estimate failed", extra={"request_id": self._ctx.request_id})
                usage_frame = None
            if usage_frame is not None:
                blob += usage_frame
            self._finish(True, False)
            self.final = True
            return blob
        return self._ended(blob)

    def _ended(self, blob: bytes) -> bytes:
        """_end when nothing is to be estimated (the upstream reported usage, or no frames were kept)."""
        est = self._estimate
        decoder = self._decoder
        if est is not None and decoder.error is None:
            est.reported(decoder.usage is not None)
        self._finish(True, False)
        self.final = True
        return blob

    def _keep(self, seen: list[bytes], blob: bytes) -> None:
        n = len(blob)
        self._relayed += n
        if self._kept < _KEEP_BYTES:
            seen.append(blob)
            self._kept += n

    def close(self) -> None:
        """Drop the upstream if the frames were not relayed to the end (idempotent)."""
        self._finish(False, False)

    def _finish(self, clean: bool, failed: bool) -> None:
        if self._finished:
            return
        self._finished = True
        ctx = self._ctx
        ctx.upstream_ended = time.perf_counter()
        ctx.usage = self._decoder.usage or self._estimated
        if ctx.usage is None and not clean and self._seen and ctx.limit is not None:
            # Cut short (client gone, upstream broke) before any usage came: the limits charge an estimate of
            # what was relayed (the row keeps no counts: it records what the upstream reported).
            est, seen, relayed, kept = self._estimate, self._seen, self._relayed, self._kept
            assert est is not None and seen is not None

            async def partial() -> Usage:
                return (await est.stream_usage(seen, relayed, kept))[0]

            ctx.partial_usage = partial
        self._seen = None
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


def _stamp(ctx: RequestContext, req: UpstreamRequest) -> None:
    """The request's ids and trace context on a signed upstream request (after signing, so SigV4 never covers
    them: AWS accepts unsigned headers that are not x-amz-*)."""
    headers = req.headers
    headers["x-request-id"] = ctx.request_id[_RID_PREFIX_LEN:]  # see new_request_id
    if ctx.client_request_id is not None:
        headers["x-client-request-id"] = ctx.client_request_id
    if ctx.traceparent is not None:
        headers["traceparent"] = ctx.traceparent


async def _first_frames(decoder: StreamDecoder, chunks: AsyncGenerator[bytes, None], provider_id: str
                        ) -> tuple[list[bytes], bool]:
    """A stream read up to its first frames (pending) before anything goes to the client, and whether the
    upstream's body already ended (done)."""
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
            if decoder.done:  # the whole answer was in the first reads
                await chunks.aclose()
                pending.extend(decoder.close())
                done = True
                break
    except ProxyError:
        raise
    except Exception as exc:
        raise unreadable(provider_id, exc) from None
    if decoder.error is not None:
        # The upstream's error event came before anything reached the client: answer with its status (and retry
        # it like any other failed attempt) instead of a 200 that ends in an error event.
        raise decoder.error
    return pending, done


async def _error_status(ctx: RequestContext, provider: Provider, target: Target, resp: UpstreamResponse
                        ) -> ProxyError:
    """An upstream's error status (>= 400) as the ProxyError to raise; the body read, the connection released."""
    raw = await resp.read()
    resp.release()
    ctx.upstream_ended = time.perf_counter()
    try:
        return provider.parse_error(resp.status, resp.headers, raw)
    except Exception as exc:
        return unreadable(target.provider_id, exc, "an error body")


def _native_request(provider: Any, call: Call, target: Target, stream: bool) -> UpstreamRequest | None:
    """The client's own request for `provider`, if it speaks the client's API (providers/base.py NativeProvider)."""
    build = getattr(provider, "native_request", None)
    if build is None:
        return None
    assert call.native is not None and call.native_body is not None
    req: UpstreamRequest | None = build(call.native, call.native_body, target, stream)
    return req


# What a stream's body must be, by UpstreamRequest.framing (no Content-Type at all is let through).
_STREAM_TYPES: dict[str, str] = {"sse": "text/event-stream", "aws-eventstream": "application/vnd.amazon.eventstream"}


_MEDIA_TYPE = re.compile(r"[a-z0-9.+-]{1,40}/[a-z0-9.+-]{1,60}")


def _media_type(ctype: str) -> str:
    """The upstream's media type, named only when it is a plain `type/subtype` (it is upstream text)."""
    media = ctype.split(";", 1)[0].strip()
    return f"'{media}'" if _MEDIA_TYPE.fullmatch(media) else "another content type"


def _not_a_stream(provider: Provider, provider_id: str, headers: Mapping[str, str], ctype: str, raw: bytes
                  ) -> ProxyError:
    """A 200 to a stream request whose body is not a stream (an error object in JSON, an HTML page...)."""
    if ctype.startswith("application/json"):
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            data = None
        if isinstance(data, dict) and "error" in data:  # an error object sent with 200: its message, as a 502
            exc = provider.parse_error(502, headers, raw)
            exc.status = 502
            if exc.code is None:
                exc.code = "bad_upstream_response"
            return exc
    return ProxyError(
        f"Upstream provider '{provider_id}' answered a stream request with {_media_type(ctype)} instead of an "
        "event stream",
        status=502, type="api_error", code="bad_upstream_response",
    )


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
    """The core of one request: resolve its model, check policy (resolve), then call the route's deployments with
    retries and translate the answer back to the neutral form (handle). The exchange (web/exchange.py) runs
    both, with the limiter's admit between them."""

    def __init__(self, router: Router, client: UpstreamClient, policy: Policy, *, traced: bool = False) -> None:
        self.router = router
        self.client = client
        self.policy = policy
        self._reports_usage: dict[tuple[str, str], bool] = {}  # see UsageEstimate
        if traced:  # a span per attempt; untraced, the attempt path is left exactly as it is
            self._attempt = self._traced_attempt  # type: ignore[method-assign,assignment]

    def _sanitize(self, ctx: RequestContext, exc: ProxyError) -> None:
        """Last pass over a failed attempt's error (error path only): every provider's credentials scrubbed from
        what the client and the log will see, then the withheld upstream detail logged."""
        scrub_error(exc, [s for p in self.router.providers.values() for s in p.secrets()])
        log_withheld(ctx, exc)

    def resolve(self, ctx: RequestContext, call: Call) -> Route:
        """The call's route, if its principal may use the model (ModelNotFound / Forbidden otherwise)."""
        route = self.router.resolve(call.model)
        principal = ctx.principal
        if principal is not None and not self.policy.may_use(principal, route.canonical):
            raise Forbidden(f"You are not allowed to use the model '{call.model}'", param="model")
        return route

    async def handle(self, ctx: RequestContext, call: Call, route: Route) -> bytes | StreamSession:
        """The neutral answer (JSON bytes), or the stream with its first frame in hand (StreamSession)."""
        endpoint: Endpoint = call.endpoint  # type: ignore[assignment]  # an ingress names a backend operation
        body = call.body
        if call.native is not None:
            ctx.native = call
        stream = call.stream
        want_usage = call.want_usage
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
                ctx.attempt_log = [_attempt_entry(ctx, target, exc.status, ledger_error_code(exc))]
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
                    ctx.attempt_log = log
                    raise
                if delay > 0:
                    try:
                        await asyncio.sleep(delay)
                    except asyncio.CancelledError:
                        log.append({"provider": None, "status": 499, "error": "client_disconnected", "ms": 0.0})
                        ctx.attempt_log = log
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
                    ctx.attempt_log = log
                raise
            if not multi or not isinstance(result, StreamSession):
                dep.in_flight -= 1  # a stream leaves the count when it ends (StreamSession)
            dep.succeeded()
            if log is not None:
                log.append(_attempt_entry(ctx, target, 200, None))
                ctx.attempt_log = log
            return result

    async def _send(self, ctx: RequestContext, provider: Provider, req: UpstreamRequest, dep: Deployment,
                    target: Target, deadline: float | None) -> UpstreamResponse:
        """Sign and send one attempt's request; an upstream error status is raised as its ProxyError."""
        await provider.sign(req)
        _stamp(ctx, req)
        resp = await self.client.send(target.provider_id, req, dep.timeouts, deadline)
        if resp.status >= 400:
            try:
                err = await _error_status(ctx, provider, target, resp)
            except BaseException:
                resp.close()
                raise
            raise err
        return resp

    async def _native_attempt(self, ctx: RequestContext, provider: Any, req: UpstreamRequest, call: Call,
                              stream: bool, dep: Deployment, target: Target, deadline: float | None,
                              track: Deployment | None) -> bytes | StreamSession:
        """An attempt in the client's own API (Call.native): the reply is in that API's shape, its usage read from
        it (no estimate: the estimator reads the neutral form). Errors as in _attempt."""
        api = call.native
        assert api is not None
        resp = await self._send(ctx, provider, req, dep, target, deadline)
        try:
            if not stream:
                raw = await resp.read()
                ctx.upstream_ended = time.perf_counter()
                resp.release()
                out: bytes
                try:
                    out, ctx.usage = provider.parse_native(api, raw, target)
                except ProxyError:
                    raise
                except Exception as exc:
                    raise unreadable(target.provider_id, exc, "a body") from None
                call.served_natively = True
                return out
            ctype = (resp.headers.get("content-type") or "text/event-stream").lower()
            if not ctype.startswith("text/event-stream"):
                raw = await resp.read()
                ctx.upstream_ended = time.perf_counter()
                raise _not_a_stream(provider, target.provider_id, resp.headers, ctype, raw)
            decoder = provider.native_decoder(api, target)
            chunks = resp.chunks()
            pending, done = await _first_frames(decoder, chunks, target.provider_id)
            if not pending:
                raise ProxyError(
                    f"Upstream provider '{target.provider_id}' ended the stream without sending anything",
                    status=502, type="api_error", code="upstream_stream_empty",
                )
            ctx.first_token_at = time.perf_counter()
        except BaseException:
            resp.close()
            raise
        call.served_natively = True
        return StreamSession(resp, decoder, ctx, chunks, pending, track, done, None)

    async def _traced_attempt(self, ctx: RequestContext, endpoint: Endpoint, body: dict[str, Any], stream: bool,
                              want_usage: bool, dep: Deployment, target: Target, *rest: Any) -> bytes | StreamSession:
        """_attempt in a child span of the request's (tracing on); the upstream gets the span's traceparent."""
        trace = ctx.trace
        if trace is None:
            return await Gateway._attempt(self, ctx, endpoint, body, stream, want_usage, dep, target, *rest)
        span, ctx.traceparent = trace.attempt(target, getattr(dep.provider, "base_url", "") or "")
        try:
            result = await Gateway._attempt(self, ctx, endpoint, body, stream, want_usage, dep, target, *rest)
        except BaseException as exc:
            trace.attempt_failed(span, exc)
            raise
        span.set_attribute("http.response.status_code", 200)
        span.end()
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
        native = ctx.native
        if native is not None:  # the client's own API, to a deployment that may speak it
            native.served_natively = False  # (an earlier attempt's)
            req = _native_request(provider, native, target, stream)
            if req is not None:
                return await self._native_attempt(ctx, provider, req, native, stream, dep, target, deadline, track)
        req = provider.build_request(endpoint, body, target, stream)
        await provider.sign(req)
        _stamp(ctx, req)
        resp = await self.client.send(target.provider_id, req, dep.timeouts, deadline)
        try:
            if resp.status >= 400:
                raise await _error_status(ctx, provider, target, resp)
            if not stream:
                raw = resp.body() if resp.complete else await resp.read()  # (send() returns it whole)
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
                if usage is None:  # the upstream reported none: estimate it (off the usual path)
                    try:
                        out, usage = await _estimate_response(endpoint, body, target.upstream_model, out)
                    except Exception:  # an estimate must never break an answer
                        log.exception("usage estimate failed", extra={"request_id": ctx.request_id})
                ctx.usage = usage
                return out
            ctype = resp.headers.get("content-type")
            if ctype is not None:
                ctype = ctype.lower()
                if not ctype.startswith(_STREAM_TYPES.get(req.framing, "text/event-stream")):
                    raw = await resp.read()
                    ctx.upstream_ended = time.perf_counter()
                    raise _not_a_stream(provider, target.provider_id, resp.headers, ctype, raw)
            decoder = provider.stream_decoder(endpoint, target, want_usage)
            chunks = resp.chunks()
            pending, done = await _first_frames(decoder, chunks, target.provider_id)
            if pending:
                ctx.first_token_at = time.perf_counter()
            elif done and not decoder.done:
                # A 200 with nothing in it (llama.cpp's answer to a prompt over its context window, say).
                raise ProxyError(
                    f"Upstream provider '{target.provider_id}' ended the stream without sending anything",
                    status=502, type="api_error", code="upstream_stream_empty",
                )
        except BaseException:
            resp.close()  # drops the connection: this is also how an upstream request is cancelled
            raise
        estimate = UsageEstimate(endpoint, body, target, want_usage, self._reports_usage)
        if ctx.limit is not None and ctx.limit.charges:
            estimate.keep = True  # token or dollar limits: a stream cut short is charged an estimate of its part
        return StreamSession(resp, decoder, ctx, chunks, pending, track, done, estimate)
