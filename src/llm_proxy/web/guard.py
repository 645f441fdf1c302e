"""Authentication of protected routes: one place that asks the Authenticator, once per request.

The exchange (every ingress route) calls `authenticate` with its ingress's view of the headers; the other
protected routes (models, usage, stored completions) are wrapped by `protected` when they are added."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from ..core.gateway import RequestContext
from ..types import Principal
from .state import CTX, SERVICES, Services

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def authenticate(request: web.Request, headers: Mapping[str, str] | None = None, *,
                       services: Services | None = None, ctx: RequestContext | None = None) -> Principal:
    """The request's principal (also kept on its context), or Unauthorized / AuthUnavailable.

    `services` and `ctx`: the request's, when the caller has them at hand (the exchange: two lookups less)."""
    svc = request.app[SERVICES] if services is None else services
    principal = await svc.authenticator.authenticate(request.headers if headers is None else headers, request.remote)
    (request[CTX] if ctx is None else ctx).principal = principal
    return principal


def protected(handler: Handler) -> Handler:
    """The route marker: `handler` runs only for an authenticated caller, its principal on `request[CTX]`."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        await authenticate(request)
        return await handler(request)

    guarded.__name__ = guarded.__qualname__ = getattr(handler, "__name__", "guarded")
    guarded.__doc__ = handler.__doc__
    return guarded
