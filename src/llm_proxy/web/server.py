"""Runs an app on a socket with graceful shutdown: readiness 503, drain delay, grace period, flush."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .protocol import ConnectionLimits, GatewayRunner
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
    runner = GatewayRunner(
        app,
        limits=ConnectionLimits.from_settings(server),
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=server.shutdown_grace_seconds,
    )
    # Handle SIGTERM/SIGINT from before startup: a signal arriving while the app starts (migrations, key
    # fetches) or just after "listening" is logged must drain, not kill the process with a default handler.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    try:
        await _run(runner, app, host, port, reuse_port, on_listening, stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def _run(
    runner: GatewayRunner,
    app: web.Application,
    host: str,
    port: int,
    reuse_port: bool,
    on_listening: Callable[[int], None] | None,
    stop: asyncio.Event,
) -> None:
    services = app[SERVICES]
    server = services.loaded.settings.server
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
    # Everything allocated so far (modules, config, clients) lives as long as the process: move it out of
    # the collector's view so full collections under load only scan per-request garbage.
    gc.collect()
    gc.freeze()
    log.info("listening", extra={"host": host, "port": bound})
    if on_listening is not None:
        on_listening(bound)
    await stop.wait()
    services.draining = True
    log.info(
        "shutdown requested: readiness now 503",
        extra={"drain_delay_seconds": server.drain_delay_seconds, "grace_seconds": server.shutdown_grace_seconds},
    )
    if server.drain_delay_seconds:
        # Load balancers need a moment to see readiness fail before the listener goes away.
        await asyncio.sleep(server.drain_delay_seconds)
    open_connections = len(runner.server.connections) if runner.server is not None else 0
    log.info(
        "listener closing: waiting for in-flight requests",
        extra={"open_connections": open_connections, "grace_seconds": server.shutdown_grace_seconds},
    )
    # Stops listening (new connections are refused), closes idle keep-alive connections, waits up to the
    # grace period for in-flight requests and streams, cancels what is left, then runs the app's cleanup,
    # which flushes the usage ledger last.
    await runner.cleanup()
    log.info("stopped")
