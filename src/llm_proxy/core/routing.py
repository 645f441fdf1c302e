"""Resolves a public model id (or alias) to its deployments: provider instances and upstream model names."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import DeploymentSettings, ModelSettings, Settings, TimeoutSettings
from ..errors import ModelNotFound, ServiceUnavailable
from ..providers.base import Provider, Target
from .resilience import Deployment, Pool

_TIMEOUT_FIELDS = frozenset(TimeoutSettings.model_fields)
_PASSTHROUGH_ROUTES_MAX = 4096  # passthrough model names whose routes are kept


def merge_timeouts(base: TimeoutSettings, *overrides: TimeoutSettings | None) -> TimeoutSettings:
    """`base` with the fields each override sets explicitly (later overrides win)."""
    out = base
    for o in overrides:
        if o is not None:
            fields = {k: getattr(o, k) for k in o.model_fields_set if k in _TIMEOUT_FIELDS}
            if fields:
                out = out.model_copy(update=fields)
    return out


@dataclass(frozen=True, slots=True)
class Route:
    """What a model name resolves to. `targets[i]` is how deployment `pool.deployments[i]` is addressed
    for this name (the response carries the name the client asked for, alias included)."""

    target: Target  # the primary deployment's (also `targets[0]`)
    provider: Provider
    timeouts: TimeoutSettings
    canonical: str  # the configured model id (policy is checked against it, not the alias)
    pool: Pool
    targets: tuple[Target, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int
    aliases: tuple[str, ...]
    type: str


class Router:
    def __init__(
        self, settings: Settings, providers: dict[str, Provider], disabled: dict[str, str], created: int
    ) -> None:
        self._routes: dict[str, Route] = {}
        self._unavailable: dict[str, str] = {}  # name -> why none of its deployments can be used
        self._disabled = disabled
        self._providers = providers
        self._provider_settings = {p.id: p for p in settings.providers}
        self.models: list[ModelInfo] = []
        self.pools: dict[str, Pool] = {}  # configured model id -> its deployments (health included)
        for m in settings.models:
            self._add(m, providers, created)
        # `<id>/<anything>` for providers that pass models through: one deployment per provider.
        self._passthrough: dict[str, Pool] = {}
        self._passthrough_routes: dict[str, Route] = {}
        for p in settings.providers:
            provider = providers.get(p.id)
            if p.passthrough_models and provider is not None:
                dep = Deployment(0, provider, p.id, "", p.timeouts, model_id=f"{p.id}/*")
                self._passthrough[p.id] = Pool((dep,))

    @property
    def providers(self) -> dict[str, Provider]:
        """The enabled providers by id."""
        return self._providers

    def _add(self, m: ModelSettings, providers: dict[str, Provider], created: int) -> None:
        specs = m.deployments
        if not specs and m.provider and m.upstream_model:  # built in code rather than loaded
            specs = [DeploymentSettings(provider=m.provider, upstream_model=m.upstream_model)]
        self.models.append(ModelInfo(m.id, m.provider or (specs[0].provider if specs else ""), created,
                                     tuple(m.aliases), m.type))
        deps: list[Deployment] = []
        off: list[str] = []
        for spec in specs:
            provider = providers.get(spec.provider)
            ps = self._provider_settings.get(spec.provider)
            if provider is None or ps is None:
                reason = self._disabled.get(spec.provider, "not configured")
                off.append(f"provider '{spec.provider}' is disabled ({reason})")
                continue
            timeouts = merge_timeouts(ps.timeouts, m.timeouts, spec.timeouts)
            deps.append(Deployment(len(deps), provider, spec.provider, spec.upstream_model, timeouts,
                                   spec.weight, m.circuit_breaker, m.id))
        names = (m.id, *m.aliases)
        if not deps:
            for name in names:
                self._unavailable[name] = "; ".join(off) or "no deployments"
            return
        pool = Pool(tuple(deps), m.strategy, m.retry)
        self.pools[m.id] = pool
        primary = deps[0]
        for name in names:
            targets = tuple(Target(d.provider_id, d.upstream_model, name) for d in deps)
            self._routes[name] = Route(targets[0], primary.provider, primary.timeouts, m.id, pool, targets)

    def resolve(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is not None:
            return route
        pid, sep, upstream = model.partition("/")
        if sep and upstream:
            pool = self._passthrough.get(pid)
            if pool is not None:
                # Kept per name (routes are immutable; a frozen dataclass costs ~1.3k instructions a field to build),
                # bounded: clients choose these names.
                route = self._passthrough_routes.get(model)
                if route is None:
                    dep = pool.deployments[0]
                    target = Target(pid, upstream, model)
                    route = Route(target, dep.provider, dep.timeouts, model, pool, (target,))
                    if len(self._passthrough_routes) >= _PASSTHROUGH_ROUTES_MAX:
                        self._passthrough_routes.clear()
                    self._passthrough_routes[model] = route
                return route
        why = self._unavailable.get(model)
        if why is None and pid in self._disabled:
            why = f"provider '{pid}' is disabled ({self._disabled[pid]})"
        if why is not None:
            raise ServiceUnavailable(f"Model '{model}' is unavailable: {why}", code="provider_disabled")
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    def find(self, model: str) -> ModelInfo | None:
        for m in self.models:
            if model == m.id or model in m.aliases:
                return m
        return None
