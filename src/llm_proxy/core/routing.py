"""Resolves a public model id (or alias) to its provider and upstream model name."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelSettings, Settings, TimeoutSettings
from ..errors import ModelNotFound, ServiceUnavailable
from ..providers.base import Provider, Target


@dataclass(frozen=True, slots=True)
class Route:
    target: Target
    provider: Provider
    timeouts: TimeoutSettings
    model_type: str
    canonical: str  # the configured model id (policy is checked against it, not the alias)


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
        self._disabled = disabled
        self._providers = providers
        self._provider_settings = {p.id: p for p in settings.providers}
        self.models: list[ModelInfo] = []
        for m in settings.models:
            self._add(m, providers, created)
        self._passthrough = {p.id for p in settings.providers if p.passthrough_models}

    def _add(self, m: ModelSettings, providers: dict[str, Provider], created: int) -> None:
        self.models.append(ModelInfo(m.id, m.provider, created, tuple(m.aliases), m.type))
        provider = providers.get(m.provider)
        if provider is None:
            return
        ps = self._provider_settings[m.provider]
        timeouts = m.timeouts or ps.timeouts
        route = Route(Target(m.provider, m.upstream_model, m.id), provider, timeouts, m.type, m.id)
        self._routes[m.id] = route
        for alias in m.aliases:
            # The response carries the id the client asked for, alias included.
            self._routes[alias] = Route(Target(m.provider, m.upstream_model, alias), provider, timeouts, m.type, m.id)

    def resolve(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is not None:
            return route
        pid, sep, upstream = model.partition("/")
        if sep and upstream and pid in self._passthrough and pid in self._providers:
            ps = self._provider_settings[pid]
            return Route(Target(pid, upstream, model), self._providers[pid], ps.timeouts, "llm", model)
        owner = self._owner(model)
        if owner is not None and owner in self._disabled:
            raise ServiceUnavailable(
                f"Model '{model}' is unavailable: provider '{owner}' is disabled ({self._disabled[owner]})",
                code="provider_disabled",
            )
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    def _owner(self, model: str) -> str | None:
        for m in self.models:
            if model == m.id or model in m.aliases:
                return m.owned_by
        pid = model.partition("/")[0]
        return pid if pid in self._disabled else None

    def find(self, model: str) -> ModelInfo | None:
        for m in self.models:
            if model == m.id or model in m.aliases:
                return m
        return None
