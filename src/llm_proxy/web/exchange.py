"""The exchange: the one owner of a proxied request's life, for every client API (ingress) alike.

    authenticate (the ingress's view of the headers) -> read the JSON body -> ingress.parse -> Call
    -> Gateway.resolve (model, policy) -> Limiter.admit -> Gateway.handle (attempts, retries; core/)
    -> the reply: ingress.render (and ingress.capture for the ledger), or the stream relayed through the
       ingress's Framer (its terminator, its in-band error)
    -> record, exactly once: cost -> UsageSink.record -> MetricsSink.observe -> trace -> Limiter.settle

The Limiter and MetricsSink ports are called here and nowhere else on the request path. Errors before the
headers go out are answered in the ingress's envelope (ingress.error_body), with the error's status.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict, istr

from ..core.gateway import RequestContext, new_request_id
from ..errors import BadRequest, PayloadTooLarge, ProxyError, ledger_error_type
from ..ingress.base import Ingress, Scope
from ..types import Principal, Usage
from .errors import as_proxy_error
from .guard import Handler, authenticate
from .json_depth import deeper_than
from .protocol import BodyTimeout
from .response import JSON, SSE, Reply
from .state import CTX, SERVICES, Services

_JSON = "application/json"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# A relayed stream's headers, the same as a whole stream's Reply gets (the response copies them; a CIMultiDict's
# copy is cheaper than building one from a dict).
_SSE_HEADERS: CIMultiDict[str] = CIMultiDict(SSE.pairs)
_REQUEST_ID = istr("x-request-id")


class _HeldHeaders(web.StreamResponse):
    """A stream response whose headers go out with its first write (aiohttp's web.Response does this; a
    StreamResponse writes them alone at prepare() unless told not to): one syscall less per stream."""

    _send_headers_immediately = False


def record(svc: Services, ctx: RequestContext) -> None:
    """The request's usage event (with its cost) goes to the ledger and to the metrics; its usage and cost are
    charged to its limits. Called once per request, by the exchange."""
    cost = svc.prices.cost(ctx.provider_id, ctx.upstream_model, ctx.usage)
    event = ctx.to_event(cost)
    svc.usage.record(event)
    svc.metrics.observe(event)
    if ctx.trace is not None:
        ctx.trace.finish(event)
    ticket = ctx.limit
    if ticket is not None:
        ctx.limit = None
        partial = ctx.partial_usage
        estimate = None
        if partial is not None:
            async def estimate() -> tuple[Usage, float | None]:
                usage = await partial()
                return usage, svc.prices.cost(ctx.provider_id, ctx.upstream_model, usage)

        svc.limiter.settle(ticket, ctx.usage, cost, estimate)  # type: ignore[union-attr]  # a ticket comes from it


def _check_content_type(value: str | None, svc: Services) -> None:
    if value == _JSON:
        return
    if value is None:
        if not svc.require_content_type:
            return
    else:
        mime = value.partition(";")[0].strip().lower()
        if mime == _JSON or (mime.startswith("application/") and mime.endswith("+json")):
            return
    # A page in a browser can POST text/plain (or a body with no type) to any address without a CORS
    # preflight; application/json needs one. Unauthenticated servers therefore take only that.
    raise ProxyError("Content-Type must be application/json", status=415, type="invalid_request_error",
                     code="unsupported_media_type")


async def read_json(request: web.Request, svc: Services) -> dict[str, Any]:
    """The request's body, a JSON object (Content-Type, size, arrival time and nesting depth checked)."""
    _check_content_type(request.headers.get(hdrs.CONTENT_TYPE), svc)
    limit = svc.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge("Request body is larger than the configured limit")
    if request.headers.get(hdrs.EXPECT) is not None and request.version == HttpVersion11:
        # Asked for only now: after authentication and the size check (see expect_handler).
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0
    try:
        content = request.content
        if content.is_eof():
            # The whole body is in already (it came with the head: the usual case): taken as it is, without
            # request.read()'s loop of reads, bytearray and copy. Its size is checked as request.read() checks
            # it (a chunked body has no Content-Length). Only this function reads a proxied request's body.
            raw = content.read_nowait()
            if len(raw) > limit:
                raise PayloadTooLarge("Request body is larger than the configured limit")
        else:
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is larger than the configured limit") from None
    except BodyTimeout:
        raise ProxyError(
            f"Request body did not arrive within {svc.body_timeout:g} seconds", status=408,
            type="invalid_request_error", code="request_timeout",
        ) from None
    except web.RequestPayloadError:  # bad chunked framing, truncated or undecodable body
        raise BadRequest("Request body could not be read", code="invalid_body") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    if deeper_than(body, raw, svc.max_json_depth):
        raise BadRequest(f"Request body nests deeper than {svc.max_json_depth} levels", code="json_too_deep")
    return body


def _error_response(ingress: Ingress, err: ProxyError, request_id: str) -> web.Response:
    return Reply(ingress.error_body(err), JSON, status=err.status, headers=err.headers, request_id=request_id)


def expect_handler(ingress: Ingress) -> Handler:
    """Expect handler of an ingress's routes: runs before the middleware; sends nothing for 100-continue.

    aiohttp's default sends "100 Continue" at once, so a client announcing a body over the limit (or
    without a valid token) was invited to send it before its 413 (401). read_json sends it instead."""

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
            return None
        err = ProxyError("Only 'Expect: 100-continue' is supported", status=417, type="invalid_request_error",
                         code="expectation_failed")
        return _error_response(ingress, err, new_request_id())

    return expect  # type: ignore[return-value]


def _scope(svc: Services, ctx: RequestContext, principal: Principal) -> Scope:
    """What an ingress's prepare step may use (ingress/base.py: Scope)."""
    if not svc.store_completions:
        return Scope(principal, None, None)

    def keep(completion: dict[str, Any]) -> None:
        ctx.completion = completion  # picked up by the ledger (its `extra`)

    return Scope(principal, svc.responses, keep)


def exchange_handler(ingress: Ingress) -> Handler:
    """The handler of every path of `ingress`."""
    endpoint = ingress.endpoint
    name = ingress.name
    prepare = getattr(ingress, "prepare", None)  # optional (ingress/base.py: Ingress)

    async def exchange(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES]
        ctx = request[CTX]
        ctx.endpoint = endpoint
        ctx.client_api = name
        if svc.tracing is not None:
            ctx.trace = svc.tracing.request(request.headers, endpoint)
        if svc.draining:
            ctx.draining = True
        recorded = False
        try:
            principal = await authenticate(request, ingress.credentials(request.headers), services=svc, ctx=ctx)
            body = await read_json(request, svc)
            model = body.get("model")
            if isinstance(model, str):  # on the row even when parse() refuses the body
                ctx.model = model
            if prepare is not None:
                body = await prepare(body, _scope(svc, ctx, principal))
            call = ingress.parse(body)
            ctx.model = call.model
            ctx.streamed = call.stream
            gateway = svc.gateway
            route = gateway.resolve(ctx, call)
            limiter = svc.limiter
            if limiter is not None:  # no rules configured: no limiter, nothing called
                ctx.limit = await limiter.admit(principal, route.canonical, call.endpoint, ctx.request_id)
            result = await gateway.handle(ctx, call, route)
            if isinstance(result, bytes):
                reply = ingress.render(call, result)
                ctx.status = 200
                if svc.store_completions:
                    ctx.completion = ingress.capture(call, result)  # picked up by the ledger (its `extra`)
                # (x-request-id: the middleware's.)
                return Reply(reply, JSON, headers=ctx.limit.headers if ctx.limit is not None else None)

            # A stream: its first frame is in hand (StreamSession); the upstream is open until it ends.
            framer = ingress.framer(call)
            if result.whole:
                # The upstream's whole answer came with its first read (usage known, the upstream released):
                # nothing to relay as it comes. It goes out as one plain response, content-length framed (an SSE
                # client reads the same events from it: the openai SDK iterates the body's lines whatever its
                # framing), headers and body in one write.
                ctx.status = 200
                try:
                    answer = await result.finish()
                    if answer and not framer.identity:
                        answer = framer.feed(answer)
                    answer += framer.end()
                except Exception as exc:  # a framer's fault (logged: a 500): the answer is its error event
                    err = as_proxy_error(exc, ctx.request_id, request.path)
                    ctx.status, ctx.error_type = err.status, ledger_error_type(err)
                    answer = framer.error(err)
                single = Reply(answer, SSE, headers=ctx.limit.headers if ctx.limit is not None else None,
                               request_id=ctx.request_id)
                # Recorded before the write: once the client has the answer, a kill -9 must not lose the row.
                recorded = True
                record(svc, ctx)
                try:
                    await single.prepare(request)  # (the head and the answer, in one write)
                except ConnectionError:  # the client left
                    ctx.status, ctx.error_type = 499, "client_disconnected"
                return single
            # Headers held back for the first write when that write comes at once: the first frames are in hand
            # and go out as they are (identity framer).
            resp = (_HeldHeaders if framer.identity else web.StreamResponse)(status=200, headers=_SSE_HEADERS)
            headers = resp.headers
            headers[_REQUEST_ID] = ctx.request_id
            if ctx.limit is not None:
                headers.update(ctx.limit.headers)
            try:
                writer = await resp.prepare(request)
            except ConnectionError:  # the client left before the headers went out (incl. "closing transport")
                result.close()
                ctx.status, ctx.error_type = 499, "client_disconnected"
                return resp
            except BaseException:
                result.close()  # the stream is already open upstream (its first frame was read): drop it
                raise
            ctx.status = 200
            try:
                last = b""
                # Frames go to the response's writer (what prepare() returns) itself: resp.write() only checks
                # that the response is prepared and not ended, which holds until write_eof below.
                assert writer is not None
                write = writer.write
                # aclosing: the upstream is released the moment we stop, not when the generator is collected.
                async with aclosing(result.frames()) as frames:
                    if framer.identity:  # the neutral frames are the client's: nothing called per frame
                        async for f in frames:
                            if result.final:
                                last = f
                            else:
                                await write(f)
                    else:
                        feed = framer.feed
                        async for f in frames:
                            if result.final:
                                last = f
                            else:
                                out = feed(f)
                                if out:
                                    await write(out)
                if last and not framer.identity:
                    last = framer.feed(last)
                # Record before the last write: once the client has the terminator, a kill -9 must not lose
                # the row. The upstream's last frames, the terminator and the body's end go in one write.
                recorded = True
                record(svc, ctx)
                await resp.write_eof(last + framer.end())
            except ConnectionError:
                ctx.status, ctx.error_type = 499, "client_disconnected"
            except Exception as exc:  # the upstream's (a ProxyError), or a framer's fault (logged: a 500)
                # Headers are gone: the status cannot change. Tell the client in-band and end the stream.
                err = as_proxy_error(exc, ctx.request_id, request.path)
                ctx.status, ctx.error_type = err.status, ledger_error_type(err)
                try:
                    await resp.write_eof(framer.error(err))
                except ConnectionError:
                    pass
            return resp
        except asyncio.CancelledError:  # the client left (aiohttp cancels the handler): the upstream call too
            ctx.status, ctx.error_type = 499, "client_disconnected"
            raise
        except Exception as exc:
            err = as_proxy_error(exc, ctx.request_id, request.path)
            ctx.status, ctx.error_type = err.status, ledger_error_type(err)
            return _error_response(ingress, err, ctx.request_id)
        finally:
            if not recorded:
                record(svc, ctx)

    return exchange


def mount(app: web.Application, ingress: Ingress) -> None:
    """Serve `ingress` (POST on each of its paths) through the exchange."""
    handler = exchange_handler(ingress)
    expect = expect_handler(ingress)
    for path in ingress.paths:
        app.router.add_post(path, handler, expect_handler=expect)
