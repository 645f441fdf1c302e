"""The client APIs this build serves, by name (like providers/registry.py): web/exchange.py mounts each one's paths.

An ingress not in this table (a test's, a plug-in's) is handed to app.create_app(ingresses=...) instead."""

from __future__ import annotations

from . import openai, translated
from .base import Ingress

REGISTRY: dict[str, Ingress] = {i.name: i for i in (
    openai.CHAT, openai.COMPLETIONS, openai.EMBEDDINGS, translated.RESPONSES, translated.MESSAGES,
)}


def ingresses(extra: tuple[Ingress, ...] = ()) -> list[Ingress]:
    """Every registered ingress, then `extra` (one whose name is registered replaces it)."""
    table = dict(REGISTRY)
    for ingress in extra:
        table[ingress.name] = ingress
    return list(table.values())
