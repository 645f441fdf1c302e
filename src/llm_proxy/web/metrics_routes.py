"""GET /metrics (server.metrics): the Prometheus text exposition, optionally only for some networks."""

from __future__ import annotations

import ipaddress

from aiohttp import web

from ..config import MetricsSettings
from ..errors import Forbidden
from .state import SERVICES

# prometheus-client's CONTENT_TYPE_LATEST for the text format it writes (not imported: that module loads the
# client library, which only a scrape needs).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def add_metrics_route(app: web.Application, settings: MetricsSettings) -> None:
    networks = [ipaddress.ip_network(n, strict=False) for n in settings.allow]

    async def metrics(request: web.Request) -> web.StreamResponse:
        if networks:
            try:
                peer = ipaddress.ip_address((request.remote or "").split("%", 1)[0])
            except ValueError:
                peer = None
            if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
                peer = peer.ipv4_mapped
            if peer is None or not any(peer in n for n in networks):
                raise Forbidden("Metrics are not served to this address", code="metrics_not_allowed")
        body = request.app[SERVICES].metrics.render()
        return web.Response(body=body, headers={"content-type": CONTENT_TYPE})

    app.router.add_get(settings.path, metrics)
