"""USD cost of a request: a price per token for every (provider, upstream model), worked out once at start.

Prices come from a model's `price` in the config, else from the pinned `genai-prices` catalogue (pydantic's,
its data bundled: no network at run time). A model with neither has no price: its rows say `cost_usd: null`
(never $0, which would read as free) and it is reported at start. On the request path a cost is one dict
lookup and two or three multiplies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..config import ModelSettings, ProviderSettings, Settings
from ..types import Usage

log = logging.getLogger("llm_proxy.pricing")

# Our provider types -> the catalogue's provider ids. OpenAI-compatible servers are looked up by their URL
# (the catalogue knows OpenRouter's, say); a self-hosted one matches nothing, so it has a price only if the
# config gives one.
_CATALOGUE_PROVIDER: dict[str, str] = {
    "openai": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "gemini": "google",
    "bedrock": "aws",
    "groq": "groq",
    "together": "together",
    "fireworks": "fireworks",
}
_MILLION = 1_000_000
_LAZY_MAX = 4096  # passthrough models priced on first use, at most this many kept


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token."""

    input: float
    output: float
    cached_input: float
    source: str  # "config" | "genai-prices"

    def cost(self, usage: Usage) -> float:
        cached = usage.cached_tokens or 0
        if cached:
            fresh = max(usage.prompt_tokens - cached, 0)
            return fresh * self.input + cached * self.cached_input + usage.completion_tokens * self.output
        return usage.prompt_tokens * self.input + usage.completion_tokens * self.output


def _configured(m: ModelSettings) -> Price | None:
    p = m.price
    if p is None:
        return None
    cached = p.cached_input_per_million if p.cached_input_per_million is not None else p.input_per_million
    return Price(p.input_per_million / _MILLION, p.output_per_million / _MILLION, cached / _MILLION, "config")


def catalogue_price(provider: ProviderSettings | None, upstream_model: str) -> Price | None:
    """The catalogue's price for one upstream model of one provider, or None when it does not know it."""
    try:
        from genai_prices import Usage as GUsage
        from genai_prices import calc_price
    except ImportError:  # pragma: no cover - a dependency; absent only in a broken install
        return None
    kw: dict[str, Any] = {}
    if provider is not None:
        pid = _CATALOGUE_PROVIDER.get(provider.type)
        if pid is not None:
            kw["provider_id"] = pid
        elif provider.base_url:
            kw["provider_api_url"] = provider.base_url
        else:
            return None
    try:
        inp = calc_price(GUsage(input_tokens=_MILLION), upstream_model, **kw).input_price
        out = calc_price(GUsage(output_tokens=_MILLION), upstream_model, **kw).output_price
        cached = calc_price(GUsage(input_tokens=_MILLION, cache_read_tokens=_MILLION), upstream_model,
                            **kw).input_price
    except (LookupError, ValueError):
        return None
    return Price(float(inp) / _MILLION, float(out) / _MILLION, float(cached) / _MILLION, "genai-prices")


class PriceTable:
    """(provider id, upstream model) -> Price, for every configured deployment; built once."""

    def __init__(self, settings: Settings, *, catalogue: bool = True) -> None:
        self._providers = {p.id: p for p in settings.providers}
        self._catalogue = catalogue
        self._prices: dict[tuple[str, str], Price | None] = {}
        self.unpriced: list[str] = []  # model ids with no price (reported at start)
        for m in settings.models:
            own = _configured(m)
            missing = False
            for d in m.deployments:
                key = (d.provider, d.upstream_model)
                price = own if own is not None else self._look_up(key)
                if key not in self._prices or price is not None:
                    self._prices[key] = price
                missing = missing or price is None
            if missing:
                self.unpriced.append(m.id)

    def _look_up(self, key: tuple[str, str]) -> Price | None:
        if not self._catalogue:
            return None
        return catalogue_price(self._providers.get(key[0]), key[1])

    def get(self, provider_id: str | None, upstream_model: str | None) -> Price | None:
        if provider_id is None or upstream_model is None:
            return None
        key = (provider_id, upstream_model)
        try:
            return self._prices[key]
        except KeyError:  # a passthrough model, first seen now: priced once
            if len(self._prices) >= _LAZY_MAX:
                return None
            price = self._prices[key] = self._look_up(key)
            return price

    def cost(self, provider_id: str | None, upstream_model: str | None, usage: Usage | None) -> float | None:
        """USD for one answer; None when nothing was used that could be priced, or the model has no price."""
        if usage is None:
            return None
        price = self.get(provider_id, upstream_model)
        if price is None:
            return None
        return price.cost(usage)

    def report(self) -> None:
        for model_id in self.unpriced:
            log.warning(
                "model '%s' has no price (not in the genai-prices catalogue and no `price` in its config): "
                "its usage rows record cost_usd null and USD limits do not count it", model_id,
            )
