"""The explicit table of provider implementations, keyed by canonical provider type."""

from __future__ import annotations

from collections.abc import Callable

from ..config import ProviderSettings
from . import anthropic, azure_openai, bedrock, gemini, openai_compat
from .base import Provider

Factory = Callable[[ProviderSettings], Provider]

REGISTRY: dict[str, Factory] = {
    "openai": openai_compat.create,
    "openai_compat": openai_compat.create,
    "vllm": openai_compat.create,
    "ollama": openai_compat.create,
    "groq": openai_compat.create,
    "together": openai_compat.create,
    "fireworks": openai_compat.create,
    "azure": azure_openai.create,
    "anthropic": anthropic.create,
    "gemini": gemini.create,
    "bedrock": bedrock.create,
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
