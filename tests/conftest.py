"""Shared fixtures: the emulator (fake upstream) and a proxy in front of it, on real loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.emulator import EmulatorServer, start_emulator

from .helpers import LoopThread, ProxyServer, native_config


class Emulator:
    """The emulator in its own loop thread, so sync SDK clients and async tests can both use it."""

    def __init__(self) -> None:
        self.lt = LoopThread("emulator")
        self.server: EmulatorServer = self.lt.run(start_emulator())
        self.base_url = self.server.base_url

    def script(self, spec: dict[str, Any]) -> Any:
        return self.lt.call(lambda: self.server.state.script(spec))

    def requests(self) -> list[dict[str, Any]]:
        return self.lt.call(lambda: list(self.server.state.requests))

    def stats(self) -> dict[str, Any]:
        return self.lt.call(self.server.state.stats)

    def wait_until(self, pred: Any, timeout: float = 5.0) -> None:
        self.lt.run(self.server.state.wait_until(pred, timeout), timeout + 5)

    def close(self) -> None:
        self.lt.run(self.server.close())
        self.lt.stop()


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    emu = Emulator()
    yield emu
    emu.close()


def basic_config(base_url: str, extra: str = "") -> str:
    return f"""
providers:
  - id: openai
    type: openai
    base_url: {base_url}
    api_key: sk-upstream-secret-0123456789
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o, aliases: [proxied-model]}}
  - {{id: openai/gpt-4o-mini, provider: openai, upstream_model: gpt-4o-mini}}
  - {{id: openai/text-embedding-3-small, provider: openai, upstream_model: text-embedding-3-small, type: embedding}}
default_model: openai/gpt-4o
auth: {{mode: none, allow_unauthenticated: true}}
{extra}
"""


@pytest.fixture(scope="session")
def proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    # An in-memory ledger so tests can read the usage events the proxy recorded.
    with ProxyServer(native_config(basic_config(emulator.base_url)), usage=MemoryUsageSink()) as px:
        yield px


@pytest.fixture(autouse=True)
def _reset_emulator(request: pytest.FixtureRequest) -> None:
    if "emulator" in request.fixturenames:
        emu: Emulator = request.getfixturevalue("emulator")
        emu.lt.call(emu.server.state.reset)
