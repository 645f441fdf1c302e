"""Runs an app on a socket with graceful shutdown: readiness 503, drain delay, grace period, flush."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .state import SERVICES

log = logging.getLogger("llm_proxy")


async def serve(
    app: web.Application,
    host: str,
    port: int,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    services = app[SERVICES]
    server = services.loaded.settings.server
    runner = web.AppRunner(
        app, handler_cancellation=True, access_log=None, shutdown_timeout=server.shutdown_grace_seconds
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None, backlog=2048)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise SystemExit(f"llm-proxy: cannot listen on {host}:{port}: {exc.strerror}") from None
    bound = port
    if runner.addresses:
        bound = int(runner.addresses[0][1])
    log.info("listening", extra={"host": host, "port": bound})
    if on_listening is not None:
        on_listening(bound)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    await stop.wait()
    services.draining = True
    log.info(
        "shutdown requested: readiness now 503",
        extra={"drain_delay_seconds": server.drain_delay_seconds, "grace_seconds": server.shutdown_grace_seconds},
    )
    if server.drain_delay_seconds:
        # Load balancers need a moment to see readiness fail before the listener goes away.
        await asyncio.sleep(server.drain_delay_seconds)
    await runner.cleanup()  # stops listening, waits for in-flight requests, then flushes the ledger
    log.info("stopped")
