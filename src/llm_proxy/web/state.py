"""The services one running app holds (built by app.py, read by handlers)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..config import LoadedConfig, Settings
from ..core.gateway import Gateway
from ..core.pricing import PriceTable
from ..core.routing import Router
from ..logs import AccessLog
from ..ports import Authenticator, Limiter, Policy, UsageSink


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

    def __post_init__(self) -> None:
        s = self.loaded.settings
        self.max_body_bytes = s.server.max_body_bytes
        self.access_log: AccessLog | None = AccessLog() if s.server.access_log else None
        self.store_completions = s.usage.enabled and s.usage.store_completions

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
