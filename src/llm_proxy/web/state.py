"""The services one running app holds (built by app.py, read by handlers)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..config import LoadedConfig, Settings
from ..core.gateway import Gateway, RequestContext
from ..core.metrics import NullMetrics
from ..core.pricing import PriceTable
from ..core.routing import Router
from ..core.usage import UsageLedger
from ..ingress.base import StoredResponses
from ..logs import AccessLog
from ..ports import Authenticator, Limiter, MetricsSink, Policy, UsageSink
from .hosts import HostCheck, allowed_hosts_for, is_local_request

if TYPE_CHECKING:
    from ..core.tracing import Tracing


@dataclass
class Services:
    loaded: LoadedConfig
    router: Router
    gateway: Gateway
    authenticator: Authenticator
    policy: Policy
    usage: UsageSink
    provider_status: dict[str, dict[str, Any]]
    prices: PriceTable
    limiter: Limiter | None = None  # None: no limit rules configured
    started_at: float = field(default_factory=time.time)
    draining: bool = False
    started: bool = False
    metrics: MetricsSink = field(default_factory=NullMetrics)
    tracing: Tracing | None = None  # tracing.enabled (core/tracing.py is imported only then)

    def __post_init__(self) -> None:
        s = self.loaded.settings
        self.max_body_bytes = s.server.max_body_bytes
        self.access_log: AccessLog | None = AccessLog() if s.server.access_log else None
        self.store_completions = s.usage.enabled and s.usage.store_completions
        # The responses a Responses request may continue (previous_response_id): the ledger's database.
        self.responses: StoredResponses | None = None
        if self.store_completions and isinstance(self.usage, UsageLedger):
            self.responses = self.usage
        self.body_timeout = s.server.body_timeout_seconds
        self.max_json_depth = s.server.max_json_depth
        unauthenticated = s.auth.mode == "none"
        # A page in a browser can send a body without a type (or text/plain) anywhere without a preflight.
        self.require_content_type = unauthenticated
        allowed = allowed_hosts_for(s.server.allowed_hosts, s.auth.mode, s.server.allow_non_loopback_unauthenticated)
        self.host_check: HostCheck | None = HostCheck(allowed) if allowed is not None else None
        # Paths the Host check skips: kubelet probes and Prometheus scrapes use the pod's address.
        self.host_exempt: tuple[str, ...] = ("/v1/health", s.server.metrics.path) if s.server.metrics.enabled \
            else ("/v1/health",)
        # Who sees readiness details without a token; tests replace it to play a remote caller.
        self.is_local: Callable[[web.Request], bool] = is_local_request

    def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        checks["config"] = {"ok": True, "source": self.loaded.source, "warnings": len(self.loaded.warnings)}
        checks["started"] = {"ok": self.started}
        checks["draining"] = {"ok": not self.draining}
        auth = self.authenticator.health()
        checks["auth"] = auth
        checks["usage"] = self.usage.health()
        if self.limiter is not None:  # reported; a store that is away follows limits.on_store_error instead
            checks["limits"] = self.limiter.health()
        checks["providers"] = {
            "ok": any(p["ok"] for p in self.provider_status.values()) if self.provider_status else False,
            "providers": self.provider_status,
        }
        # The ledger spools when the database is away, so it never blocks readiness; providers with
        # missing keys are reported (APIKeysConfigured) but one usable provider is enough to serve.
        required = ("config", "started", "draining", "auth", "providers")
        ok = all(bool(checks[k].get("ok")) for k in required)
        failing = [k for k in required if not checks[k].get("ok")]
        return {"status": "OK" if ok else "NOT_READY", "failing": failing, "checks": checks}

    def client_config(self) -> dict[str, str]:
        return client_config_for(self.loaded.settings)


def client_config_for(s: Settings) -> dict[str, str]:
    """What IDE clients read (the seed's llm-proxy-client ConfigMap): the model id, and "enabled" as a string."""
    model = s.default_model or next((m.id for m in s.models if m.type == "llm"), "")
    return {"model": model, "enabled": "true" if model else "false"}


SERVICES = web.AppKey("services", Services)
CTX = web.RequestKey("ctx", RequestContext)  # the request's context, set by the middleware
