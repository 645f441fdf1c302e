"""The explicit table of provider implementations, keyed by canonical provider type."""

from __future__ import annotations

from collections.abc import Callable

from ..config import ProviderSettings
from . import openai_compat
from .base import Provider

Factory = Callable[[ProviderSettings], Provider]


# The translators for other wire formats load on first use, so a worker pays (in memory and start-up
# time) only for the providers it is configured with.
def _azure(s: ProviderSettings) -> Provider:
    from . import azure_openai

    return azure_openai.create(s)


def _anthropic(s: ProviderSettings) -> Provider:
    from . import anthropic

    return anthropic.create(s)


def _gemini(s: ProviderSettings) -> Provider:
    from . import gemini

    return gemini.create(s)


def _bedrock(s: ProviderSettings) -> Provider:
    from . import bedrock

    return bedrock.create(s)


REGISTRY: dict[str, Factory] = {
    "openai": openai_compat.create,
    "openai_compat": openai_compat.create,
    "vllm": openai_compat.create,
    "ollama": openai_compat.create,
    "groq": openai_compat.create,
    "together": openai_compat.create,
    "fireworks": openai_compat.create,
    "azure": _azure,
    "anthropic": _anthropic,
    "gemini": _gemini,
    "bedrock": _bedrock,
}


def build_provider(settings: ProviderSettings) -> Provider:
    try:
        factory = REGISTRY[settings.type]
    except KeyError:
        raise ValueError(
            f"provider '{settings.id}': type '{settings.type}' is not available in this build; "
            f"available: {', '.join(sorted(REGISTRY))}"
        ) from None
    return factory(settings)
