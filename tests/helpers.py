"""Test helpers: run the proxy and the emulator on real loopback ports in background threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from llm_proxy.app import create_app
from llm_proxy.config import LoadedConfig, load_config_text
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.web.server import serve
from llm_proxy.web.state import SERVICES, Services

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; run coroutines on it from sync test code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def _c() -> T:
            return fn()

        return self.run(_c())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ProxyServer:
    """The proxy app served on 127.0.0.1:<free port> in its own loop thread."""

    def __init__(self, loaded: LoadedConfig, *, drain: bool = False, **app_kwargs: Any) -> None:
        # An in-memory usage sink unless the test passes usage=... (e.g. a UsageLedger): tests that do not
        # look at the ledger must not write ./var/llm-proxy.db and ./var/spool in the working directory.
        app_kwargs.setdefault("usage", MemoryUsageSink())
        if not drain:
            # No load balancer to wait for in tests: stop at once unless the test is about draining.
            loaded.settings.server.drain_delay_seconds = 0
        self.lt = LoopThread("proxy")
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None
        ready: asyncio.Future[int] = self.lt.loop.create_future()

        async def _start() -> None:
            self._stop = asyncio.Event()
            app = create_app(loaded, **app_kwargs)
            self.app = app
            self.services: Services = app[SERVICES]

            def on_listening(port: int) -> None:
                ready.set_result(port)

            async def _run() -> None:
                try:
                    await serve(app, "127.0.0.1", 0, on_listening=on_listening, stop=self._stop)
                except BaseException as exc:  # surface startup failures to the test
                    if not ready.done():
                        ready.set_exception(exc)
                    raise

            self._task = asyncio.ensure_future(_run())

        self.lt.run(_start())
        self.port = self.lt.run(asyncio.wait_for(asyncio.shield(ready), 15))
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"

    def stop(self) -> None:
        async def _shutdown() -> None:
            assert self._stop is not None
            self._stop.set()
            await self._task

        self.lt.run(_shutdown(), timeout=60)
        self.lt.stop()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def native_config(text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return load_config_text(text, env=env or {}, path="<test>")
