"""The provider types the config accepts, their aliases, and each type's default base URL and key variables."""

from __future__ import annotations

import re

# --------------------------------------------------------------------------------------------------
# Provider types. The registry in providers/ must implement every canonical type listed here.
# --------------------------------------------------------------------------------------------------

CANONICAL_PROVIDER_TYPES: tuple[str, ...] = (
    "openai",
    "openai_compat",
    "vllm",
    "ollama",
    "groq",
    "together",
    "fireworks",
    "azure",
    "anthropic",
    "gemini",
    "bedrock",
)

PROVIDER_TYPE_ALIASES: dict[str, str] = {
    **{t: t for t in CANONICAL_PROVIDER_TYPES},
    **{f"remote::{t}": t for t in CANONICAL_PROVIDER_TYPES},
    "openai-compat": "openai_compat",
    "remote::openai-compat": "openai_compat",
    "remote::passthrough": "openai_compat",
    "azure-openai": "azure",
    "azure_openai": "azure",
    "remote::azure-openai": "azure",
    "google": "gemini",
    "remote::google": "gemini",
}

# Types that cannot work without a credential; the others (local servers) may run keyless.
KEYED_TYPES = frozenset({"openai", "azure", "anthropic", "gemini", "groq", "together", "fireworks"})

DEFAULT_KEY_ENV: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "azure": ("AZURE_OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "groq": ("GROQ_API_KEY",),
    "together": ("TOGETHER_API_KEY",),
    "fireworks": ("FIREWORKS_API_KEY",),
}

DEFAULT_BASE_URL: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "vllm": "http://localhost:8000/v1",
    "ollama": "http://localhost:11434/v1",
    "groq": "https://api.groq.com/openai/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


def normalize_provider_type(raw: str) -> str | None:
    return PROVIDER_TYPE_ALIASES.get(raw.strip().lower())


def provider_key_env_name(provider_id: str) -> str:
    """`<PROVIDER_ID>_API_KEY`, made a valid environment variable name."""
    return re.sub(r"[^A-Z0-9_]", "_", provider_id.upper()) + "_API_KEY"
