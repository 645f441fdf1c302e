"""Route handlers and the single middleware (request id, error envelope, access log, usage event)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from .. import __version__
from ..core.gateway import RequestContext, new_request_id
from ..errors import BadRequest, ModelNotFound, PayloadTooLarge, ProxyError, internal_error
from ..providers.base import Endpoint
from ..providers.sse import DONE, frame
from ..types import Usage
from .errors import error_response, from_http_exception
from .state import SERVICES, Services

log = logging.getLogger("llm_proxy.access")
errlog = logging.getLogger("llm_proxy.web")

CTX = web.RequestKey("ctx", RequestContext)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_SSE_HEADERS = {"content-type": "text/event-stream", "cache-control": "no-cache", "x-accel-buffering": "no"}




# A caller's own request id is kept only when it is a short token of safe characters (it goes into headers
# upstream and into the ledger); anything else is ignored.
_CLIENT_RID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def _client_request_id(headers: Any) -> str | None:
    cid = headers.get("x-client-request-id") or headers.get("x-request-id")
    if cid is None or _CLIENT_RID.fullmatch(cid) is None:
        return None
    return str(cid)


def _json(data: Any, status: int = 200, request_id: str | None = None) -> web.Response:
    headers = {"x-request-id": request_id} if request_id else None
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json", headers=headers)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    svc = request.app[SERVICES]
    rid = new_request_id()
    ctx = RequestContext(rid, request.path, time.time(), time.perf_counter())
    cid = _client_request_id(request.headers)
    if cid is not None:
        ctx.client_request_id = ctx.extra["client_request_id"] = cid
    request[CTX] = ctx
    resp: web.StreamResponse
    try:
        resp = await handler(request)
        if not ctx.status:
            ctx.status = resp.status
    except ProxyError as exc:
        ctx.status, ctx.error_type = exc.status, exc.type
        resp = error_response(exc, rid)
    except web.HTTPException as exc:
        err = from_http_exception(exc)
        ctx.status, ctx.error_type = err.status, err.type
        resp = error_response(err, rid)
    except asyncio.CancelledError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
        raise
    except Exception:
        errlog.exception("unhandled error", extra={"request_id": rid, "path": request.path})
        ctx.status, ctx.error_type = 500, "server_error"
        resp = error_response(internal_error(rid), rid)
    finally:
        if ctx.endpoint is not None and not ctx.recorded:
            _record(svc, ctx)
        access = svc.access_log
        if access is not None and not request.path.startswith("/v1/health"):  # probes would flood the log
            access.log(
                {
                    "request_id": rid,
                    "method": request.method,
                    "path": request.path,
                    "status": ctx.status,
                    "latency_ms": round((time.perf_counter() - ctx.started) * 1000.0, 3),
                    "model": ctx.model,
                    "subject": ctx.principal.subject if ctx.principal else None,
                    "error_type": ctx.error_type,
                }
            )
    if not resp.prepared:
        resp.headers["x-request-id"] = rid
    return resp


def _record(svc: Services, ctx: RequestContext) -> None:
    """The request's usage row (with its cost) to the ledger, and its usage and cost charged to its limits."""
    ctx.recorded = True
    cost = svc.prices.cost(ctx.provider_id, ctx.upstream_model, ctx.usage)
    svc.usage.record(ctx.to_event(cost))
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


async def _read_json(request: web.Request, limit: int) -> dict[str, Any]:
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge("Request body is larger than the configured limit")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is larger than the configured limit") from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadRequest("Request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise BadRequest("Request body must be a JSON object", code="invalid_json")
    return body


def _proxy(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES]
        ctx = request[CTX]
        ctx.endpoint = endpoint
        if svc.draining:
            ctx.extra["draining"] = True
        ctx.principal = await svc.authenticator.authenticate(request.headers, request.remote)
        body = await _read_json(request, svc.max_body_bytes)
        result = await svc.gateway.handle(ctx, endpoint, body)
        if isinstance(result, bytes):
            ctx.status = 200
            if endpoint == "chat.completions" and svc.store_completions and body.get("store") is not False:
                # Picked up by the usage ledger (usage.store_completions); the reply is kept as raw JSON.
                ctx.extra["completion"] = {"input_messages": body.get("messages"), "response": orjson.Fragment(result)}
            return web.Response(body=result, content_type="application/json",
                                headers=ctx.limit.headers if ctx.limit is not None else None)
        headers = {**_SSE_HEADERS, "x-request-id": ctx.request_id}
        if ctx.limit is not None:
            headers.update(ctx.limit.headers)
        resp = web.StreamResponse(status=200, headers=headers)
        try:
            await resp.prepare(request)
        except ConnectionError:  # the client left before the headers went out (incl. "closing transport")
            result.close()
            ctx.status, ctx.error_type = 499, "client_disconnected"
            return resp
        except BaseException:
            result.close()  # the stream is already open upstream (its first frame was read): drop it
            raise
        ctx.status = 200
        try:
            # aclosing: the upstream is released the moment we stop, not when the generator is collected.
            async with aclosing(result.frames()) as frames:
                async for f in frames:
                    await resp.write(f)
            # Record before the last write: once the client has [DONE], a kill -9 must not lose the row.
            _record(svc, ctx)
            await resp.write(DONE)
        except ProxyError as exc:
            # Headers are gone: the status cannot change. Tell the client in-band and end the stream.
            ctx.status, ctx.error_type = exc.status, exc.type
            try:
                await resp.write(frame(exc.body()))
            except ConnectionError:
                pass
        except ConnectionError:
            ctx.status, ctx.error_type = 499, "client_disconnected"
            return resp
        try:
            await resp.write_eof()
        except ConnectionError:
            pass
        return resp

    return handle


async def list_models(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = request[CTX]
    principal = ctx.principal = await svc.authenticator.authenticate(request.headers, request.remote)
    data = [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
        for m in svc.router.models
        if svc.policy.may_use(principal, m.id)
    ]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    ctx = request[CTX]
    principal = ctx.principal = await svc.authenticator.authenticate(request.headers, request.remote)
    model_id = request.match_info["model"]
    m = svc.router.find(model_id)
    if m is None or not svc.policy.may_use(principal, m.id):
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return _json({"id": model_id, "object": "model", "created": m.created, "owned_by": m.owned_by})


async def version(request: web.Request) -> web.StreamResponse:
    return _json({"version": __version__})


async def health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "OK"})


async def live(request: web.Request) -> web.StreamResponse:
    return _json({"status": "OK"})


async def ready(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    report = svc.readiness()
    return _json(report, status=200 if report["status"] == "OK" else 503)


async def client_config(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    return _json(svc.client_config())


def add_routes(app: web.Application, services: Services) -> None:
    for prefix in ("/v1", "/v1/openai/v1"):
        app.router.add_post(prefix + "/chat/completions", _proxy("chat.completions"))
        app.router.add_post(prefix + "/completions", _proxy("completions"))
        app.router.add_post(prefix + "/embeddings", _proxy("embeddings"))
        app.router.add_get(prefix + "/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", get_model)
    app.router.add_get("/v1/version", version)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/health/live", live)
    app.router.add_get("/v1/health/ready", ready)
    app.router.add_get("/v1/client-config", client_config)
    from .usage_routes import add_usage_routes  # imports CTX from this module

    add_usage_routes(app)
