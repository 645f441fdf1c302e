"""Configs and clients for the limits tests."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import openai

from llm_proxy.config import load_config
from llm_proxy.core.limits import build_store, snapshot

SECRET = "s3cret-limits-test"


def limits_config(base_url: str, limits: str, *, db_url: str | None = None, spool: str | None = None,
                  extra: str = "") -> str:
    """The emulator behind an `openai` provider; users come in trusted headers (x-forwarded-user, -groups)."""
    ledger = ""
    if db_url is not None:
        ledger = f'database: {{url: "{db_url}"}}\nusage: {{spool_dir: "{spool}", flush_interval_seconds: 0.05}}\n'
    return f"""
providers:
  - {{id: openai, type: openai, base_url: "{base_url}", api_key: sk-upstream}}
  - {{id: local, type: openai_compat, base_url: "{base_url}"}}
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}
  - id: local/priced
    provider: local
    upstream_model: gpt-4o-mini
    price: {{input_per_million: 1000, output_per_million: 2000}}
  - {{id: local/unpriced, provider: local, upstream_model: gpt-4o}}
auth:
  mode: trusted_header
  trusted_header: {{secret: {SECRET}}}
server: {{port: 0, drain_delay_seconds: 0, access_log: false}}
{ledger}{limits}
{extra}
"""


def headers(user: str, groups: str = "") -> dict[str, str]:
    h = {"x-forwarded-user": user, "x-llm-proxy-secret": SECRET}
    if groups:
        h["x-forwarded-groups"] = groups
    return h


def client(port: int, user: str, groups: str = "", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0,
                              default_headers=headers(user, groups), **kw)


CHAT: dict[str, Any] = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hello there"}]}


async def counters(cfg: Path, user: str | None = None) -> list[dict[str, Any]]:
    """What `llm-proxy limits show` reports, read from the config's store."""
    settings = load_config(cfg, env={}).settings.limits
    store = build_store(settings)
    try:
        return await snapshot(settings, store, user=user)
    finally:
        await store.close()


async def wait_used(cfg: Path, rule: str, at_least: float, seconds: float = 10.0) -> float:
    """Wait (polling, with a deadline) until a counter of `rule` holds at least `at_least`: charges are made
    after the answer, off the request path."""
    end = time.monotonic() + seconds
    while True:
        used = max((r["used"] for r in await counters(cfg) if r["rule"] == rule), default=0)
        if used >= at_least:
            return float(used)
        if time.monotonic() > end:
            raise AssertionError(f"{rule}: {used} used, waited for {at_least}")
        await asyncio.sleep(0.02)
