"""Composition root: build every service from settings and wire them into one aiohttp app."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web

from .auth.none import NoAuth
from .auth.policy import RulePolicy
from .config import LoadedConfig
from .core.gateway import Gateway
from .core.limits import build_limiter
from .core.metrics import Metrics, NullMetrics, auth_failures, model_labels, usage_gauges
from .core.pricing import PriceTable
from .core.routing import Router
from .core.usage import UsageLedger
from .core.usage_memory import NullUsageSink
from .ingress.base import Ingress
from .ports import Authenticator, MetricsSink, UsageSink
from .providers.base import Provider
from .providers.http import UpstreamClient
from .providers.registry import build_provider
from .types import Principal
from .web.routes import add_routes, gateway_middleware
from .web.state import SERVICES, Services

if TYPE_CHECKING:
    from .auth.chain import BearerAuthenticator as BearerAuth
    from .core.tracing import Tracing
    from .web.ui import Dashboard

log = logging.getLogger("llm_proxy")


def build_authenticator(loaded: LoadedConfig) -> Authenticator:
    auth = loaded.settings.auth
    modes = auth.modes
    if modes == ("none",):
        return NoAuth()
    admin_check = RulePolicy(auth.policy).is_admin
    if modes == ("trusted_header",):
        from .auth.trusted_header import TrustedHeaderAuthenticator

        return TrustedHeaderAuthenticator(auth.trusted_header, admin_check=admin_check)
    members = [(mode, _bearer_authenticator(loaded, mode, admin_check)) for mode in modes]
    if len(members) == 1:
        return members[0][1]
    from .auth.chain import ChainAuthenticator

    return ChainAuthenticator(members)


def _bearer_authenticator(loaded: LoadedConfig, mode: str, admin_check: Callable[[Principal], bool]) -> BearerAuth:
    auth = loaded.settings.auth
    if mode == "oidc":
        from .auth.oidc import OIDCAuthenticator

        return OIDCAuthenticator(
            auth.oidc, cache_size=auth.token_cache_size, cache_seconds=auth.token_cache_seconds,
            admin_check=admin_check,
        )
    if mode == "hub":
        from .auth.hub import HubAuthenticator

        return HubAuthenticator(
            auth.hub, cache_size=auth.token_cache_size, cache_seconds=auth.token_cache_seconds,
            admin_check=admin_check,
        )
    if mode == "introspection":
        from .auth.introspection import IntrospectionAuthenticator

        return IntrospectionAuthenticator(auth.introspection, admin_check=admin_check)
    if mode == "api_keys":
        from .auth.api_keys import ApiKeyAuthenticator
        from .store.api_keys import ApiKeyStore

        db = loaded.settings.database
        store = ApiKeyStore(db.url, table_prefix=db.table_prefix)
        return ApiKeyAuthenticator(auth.api_keys, store, migrate=db.auto_migrate)
    raise ValueError(f"auth mode '{mode}' is not available in this build")


def build_usage_sink(loaded: LoadedConfig) -> UsageSink:
    if not loaded.settings.usage.enabled:
        return NullUsageSink()
    return UsageLedger.from_config(loaded)


def build_metrics(loaded: LoadedConfig, shared_dir: str | None = None) -> MetricsSink:
    if not loaded.settings.server.metrics.enabled:
        return NullMetrics()
    return Metrics(model_labels(loaded.settings.models), shared_dir=shared_dir)


# Set by `serve --workers N` for its workers: the one key they sign dashboard sessions with.
UI_SESSION_KEY_ENV = "LLM_PROXY_UI_SESSION_KEY"


def build_dashboard(loaded: LoadedConfig) -> Dashboard | None:
    settings = loaded.settings
    if not settings.ui.enabled:
        return None
    from .web.ui import Dashboard, session_key

    oidc = settings.auth.oidc
    issuer = oidc.issuers[0].issuer if oidc.issuers else None
    return Dashboard(settings.ui, issuer, session_key(settings.ui, os.environ.get(UI_SESSION_KEY_ENV)),
                     verify_tls=oidc.verify_tls, tls_cafile=oidc.tls_cafile)


def build_tracing(loaded: LoadedConfig) -> Tracing:
    try:
        from .core.tracing import Tracing
    except ImportError:
        raise ValueError("tracing.enabled needs OpenTelemetry: pip install 'llm-proxy[otel]'") from None
    return Tracing(loaded.settings.tracing)


def create_app(
    loaded: LoadedConfig,
    *,
    authenticator: Authenticator | None = None,
    usage: UsageSink | None = None,
    metrics_dir: str | None = None,
    tracing: Tracing | None = None,
    ingresses: tuple[Ingress, ...] = (),
) -> web.Application:
    """`metrics_dir`: where `serve --workers N` workers share their metrics totals (None: one process);
    `ingresses`: client APIs served besides the registered ones (ingress/registry.py), say a test's."""
    settings = loaded.settings
    providers: dict[str, Provider] = {}
    status: dict[str, dict[str, object]] = {}
    client = UpstreamClient()
    for ps in settings.providers:
        reason = loaded.disabled_providers.get(ps.id)
        if reason is None:
            provider = build_provider(ps)
            missing = provider.missing_credentials()
            if missing:
                reason = "missing credentials: " + ", ".join(missing)
            else:
                providers[ps.id] = provider
                client.register(ps)
        status[ps.id] = {"ok": reason is None, "type": ps.type, **({"reason": reason} if reason else {})}
    router = Router(settings, providers, {**loaded.disabled_providers, **{
        k: str(v["reason"]) for k, v in status.items() if not v["ok"]}}, int(time.time()))
    policy = RulePolicy(settings.auth.policy)
    if tracing is None and settings.tracing.enabled:
        tracing = build_tracing(loaded)
    prices = PriceTable(settings)
    prices.report()
    limiter = build_limiter(settings.limits)
    if limiter is not None and settings.limits.store == "memory" and settings.server.workers > 1:
        log.warning("limits.store is memory with %d workers: each worker counts on its own, so every limit is "
                    "multiplied by the number of workers; use a redis:// store", settings.server.workers)
    services = Services(
        loaded=loaded,
        router=router,
        gateway=Gateway(router, client, policy, traced=tracing is not None),
        authenticator=authenticator or build_authenticator(loaded),
        policy=policy,
        usage=usage or build_usage_sink(loaded),
        provider_status=status,
        metrics=build_metrics(loaded, metrics_dir),
        tracing=tracing,
        prices=prices,
        limiter=limiter,
    )
    app = web.Application(middlewares=[gateway_middleware], client_max_size=settings.server.max_body_bytes)
    app[SERVICES] = services
    add_routes(app, services, ingresses)
    if settings.server.metrics.enabled:
        from .web.metrics_routes import add_metrics_route

        metrics = services.metrics
        if isinstance(metrics, Metrics):
            metrics.add_gauges(usage_gauges(services.usage.health))
            metrics.add_gauges(auth_failures(services.authenticator.health))
        add_metrics_route(app, settings.server.metrics)
    dashboard = build_dashboard(loaded)
    if dashboard is not None:
        from .web.ui import add_ui_routes

        add_ui_routes(app, dashboard)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        await services.usage.start()
        await services.authenticator.start()
        await services.metrics.start()
        if limiter is not None:
            await limiter.start()
        services.started = True
        yield
        services.draining = True
        await services.authenticator.close()
        await client.close()
        if limiter is not None:
            await limiter.close()  # its last charges first
        await services.usage.close()  # last: flushes every event recorded by in-flight requests
        await services.metrics.close()
        if dashboard is not None:
            await dashboard.close()
        if services.tracing is not None:
            await asyncio.to_thread(services.tracing.shutdown)  # flushes the batch (blocking)
        if services.access_log is not None:
            services.access_log.flush()

    app.cleanup_ctx.append(lifecycle)
    return app
