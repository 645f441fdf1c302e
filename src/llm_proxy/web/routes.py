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
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from .. import __version__
from ..core.gateway import RequestContext, new_request_id
from ..errors import BadRequest, ModelNotFound, PayloadTooLarge, ProxyError, internal_error, ledger_error_type
from ..ingress.openapi import document
from ..providers.base import Endpoint
from ..providers.sse import DONE, frame
from ..types import Usage
from .errors import error_response, from_http_exception
from .json_depth import deeper_than
from .protocol import BodyTimeout
from .state import CTX, SERVICES, Services

log = logging.getLogger("llm_proxy.access")
errlog = logging.getLogger("llm_proxy.web")

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


def _record(svc: Services, ctx: RequestContext) -> None:
    """The request's usage event (with its cost) goes to the ledger and to the metrics, once per request; its
    usage and cost are charged to its limits."""
    ctx.recorded = True
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
        host_check = svc.host_check
        if host_check is not None and not host_check(request.headers.get(hdrs.HOST)) \
                and not request.path.startswith(svc.host_exempt):  # probes and scrapes send the pod's address
            raise ProxyError("Host not allowed on this server (see server.allowed_hosts)", status=421,
                             type="invalid_request_error", code="host_not_allowed")
        resp = await handler(request)
        if not ctx.status:
            ctx.status = resp.status
    except ProxyError as exc:
        ctx.status, ctx.error_type = exc.status, ledger_error_type(exc)
        resp = error_response(exc, rid)
    except web.HTTPException as exc:
        err = from_http_exception(exc)
        ctx.status, ctx.error_type = err.status, ledger_error_type(err)
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


_JSON = "application/json"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


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


async def _read_json(request: web.Request, svc: Services) -> dict[str, Any]:
    _check_content_type(request.headers.get(hdrs.CONTENT_TYPE), svc)
    limit = svc.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge("Request body is larger than the configured limit")
    if request.headers.get(hdrs.EXPECT) is not None and request.version == HttpVersion11:
        # Asked for only now: after authentication and the size check (see _expect).
        await request.writer.write(_CONTINUE)
        request.writer.output_size = 0
    try:
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


async def _expect(request: web.Request) -> web.StreamResponse | None:
    """Expect handler of the POST routes: runs before the middleware; sends nothing for 100-continue.

    aiohttp's default sends "100 Continue" at once, so a client announcing a body over the limit (or
    without a valid token) was invited to send it before its 413 (401). _read_json sends it instead."""
    if request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        return None
    rid = new_request_id()
    err = ProxyError("Only 'Expect: 100-continue' is supported", status=417, type="invalid_request_error",
                     code="expectation_failed")
    return error_response(err, rid)


def _proxy(endpoint: Endpoint) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        svc = request.app[SERVICES]
        ctx = request[CTX]
        ctx.endpoint = endpoint
        if svc.tracing is not None:
            ctx.trace = svc.tracing.request(request.headers, endpoint)
        if svc.draining:
            ctx.extra["draining"] = True
        ctx.principal = await svc.authenticator.authenticate(request.headers, request.remote)
        body = await _read_json(request, svc)
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
            ctx.status, ctx.error_type = exc.status, ledger_error_type(exc)
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
    status = 200 if report["status"] == "OK" else 503
    if not await _may_see_details(request, svc):
        # Issuer URLs, provider ids and their last errors are for operators: probes need the status only.
        report = {"status": report["status"], "failing": report["failing"], "details": "hidden"}
    return _json(report, status=status)


async def _may_see_details(request: web.Request, svc: Services) -> bool:
    if svc.is_local(request):
        return True
    try:
        principal = await svc.authenticator.authenticate(request.headers, request.remote)
    except ProxyError:
        return False
    return principal.auth_method != "none"


async def client_config(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    return _json(svc.client_config())


def add_routes(app: web.Application, services: Services) -> None:
    for prefix in ("/v1", "/v1/openai/v1"):
        app.router.add_post(prefix + "/chat/completions", _proxy("chat.completions"), expect_handler=_expect)
        app.router.add_post(prefix + "/completions", _proxy("completions"), expect_handler=_expect)
        app.router.add_post(prefix + "/embeddings", _proxy("embeddings"), expect_handler=_expect)
        app.router.add_get(prefix + "/models", list_models)
        app.router.add_get(prefix + "/models/{model:.+}", get_model)
    app.router.add_get("/v1/version", version)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/health/live", live)
    app.router.add_get("/v1/health/ready", ready)
    app.router.add_get("/v1/client-config", client_config)
    # The OpenAPI document (ingress/openapi.py), built from the schemas the handlers validate against.
    openapi = orjson.dumps(document())

    async def openapi_json(request: web.Request) -> web.StreamResponse:
        return web.Response(body=openapi, content_type="application/json")

    app.router.add_get("/openapi.json", openapi_json)
    from .usage_routes import add_usage_routes

    add_usage_routes(app)
