"""The single middleware (request id, Host check, error envelope, access log) and the routes: every ingress's
(through web/exchange.py) and the proxy's own."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import orjson
from aiohttp import hdrs, web

from .. import __version__
from ..core.gateway import RequestContext, new_request_id
from ..errors import ModelNotFound, ProxyError, ledger_error_type
from ..ingress import registry
from ..ingress.base import Ingress
from ..ingress.openai import PREFIXES
from ..ingress.openapi import document
from .errors import as_proxy_error, error_response
from .exchange import mount
from .guard import Handler, protected
from .response import Reply
from .state import CTX, SERVICES, Services

log = logging.getLogger("llm_proxy.access")


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
    path = request.path
    headers = request.headers
    ctx = RequestContext(rid, path, time.time(), time.perf_counter())
    cid = _client_request_id(headers)
    if cid is not None:
        ctx.client_request_id = cid
    request[CTX] = ctx
    resp: web.StreamResponse
    try:
        host_check = svc.host_check
        if host_check is not None and not host_check(headers.get(hdrs.HOST)) \
                and not path.startswith(svc.host_exempt):  # probes and scrapes send the pod's address
            raise ProxyError("Host not allowed on this server (see server.allowed_hosts)", status=421,
                             type="invalid_request_error", code="host_not_allowed")
        resp = await handler(request)
        if not ctx.status:
            ctx.status = resp.status
    except asyncio.CancelledError:
        ctx.status, ctx.error_type = 499, "client_disconnected"
        raise
    except Exception as exc:
        err = as_proxy_error(exc, rid, path)
        ctx.status, ctx.error_type = err.status, ledger_error_type(err)
        resp = error_response(err, rid)
    finally:
        # (A proxied request's usage row is the exchange's: web/exchange.py records it.)
        access = svc.access_log
        if access is not None and not path.startswith("/v1/health"):  # probes would flood the log
            principal = ctx.principal
            # Milliseconds to 3 decimals (whole microseconds), as round(ms, 3) gives them at a third of the cost.
            access.request(rid, request.method, path, ctx.status,
                           int((time.perf_counter() - ctx.started) * 1e6 + 0.5) / 1000.0, ctx.model,
                           principal.subject if principal is not None else None, ctx.error_type)
    if not resp.prepared:
        if isinstance(resp, Reply):  # (its headers are not a CIMultiDict unless someone asks for them)
            resp.request_id = rid
        else:
            resp.headers["x-request-id"] = rid
    return resp


async def list_models(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    principal = request[CTX].principal
    assert principal is not None  # protected
    data = [
        {"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by}
        for m in svc.router.models
        if svc.policy.may_use(principal, m.id)
    ]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.StreamResponse:
    svc = request.app[SERVICES]
    principal = request[CTX].principal
    assert principal is not None  # protected
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


def add_routes(app: web.Application, services: Services, ingresses: tuple[Ingress, ...] = ()) -> None:
    """Every registered ingress (and `ingresses`, say a test's) through the exchange, then the proxy's own routes."""
    for ingress in registry.ingresses(ingresses):
        mount(app, ingress)
    for prefix in PREFIXES:
        app.router.add_get(prefix + "/models", protected(list_models))
        app.router.add_get(prefix + "/models/{model:.+}", protected(get_model))
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
    from .token_count import add_token_count_routes

    add_token_count_routes(app)
