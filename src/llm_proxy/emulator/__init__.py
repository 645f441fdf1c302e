"""Scriptable OpenAI-compatible fake upstream LLM server for tests, benchmarks and CI.

By job: `script` (the scripted answer items), `state` (queues, recorded requests, counters), `answers` (the
OpenAI bodies and events), `server` (the aiohttp app and running it). The public names are re-exported here.
"""

from __future__ import annotations

from .answers import embedding_vector
from .script import ScriptError, ScriptItem, ScriptToolCall, parse_item
from .server import EmulatorServer, create_app, main, start_emulator
from .state import DEFAULT_MODELS, STATE_KEY, EmulatorState

__all__ = [
    "DEFAULT_MODELS",
    "STATE_KEY",
    "EmulatorServer",
    "EmulatorState",
    "ScriptError",
    "ScriptItem",
    "ScriptToolCall",
    "create_app",
    "embedding_vector",
    "main",
    "parse_item",
    "start_emulator",
]
