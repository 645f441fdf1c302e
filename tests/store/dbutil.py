"""Helpers for the ledger tests: throwaway PostgreSQL databases, a TCP relay that cuts the database, auth."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg

from llm_proxy.types import Principal


def config_text(base_url: str, db_url: str, spool: Path, *, port: int = 0, flush_interval: float = 0.05,
                batch_size: int = 200) -> str:
    """A proxy config in front of the emulator, with the ledger on `db_url` and its journal in `spool`."""
    return f"""
providers:
  - {{id: openai, type: openai, base_url: "{base_url}", api_key: sk-upstream}}
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
    circuit_breaker: {{failure_threshold: 1000}}
  - {{id: openai/slow, provider: openai, upstream_model: slow-model}}
auth: {{mode: none, allow_unauthenticated: true}}
server: {{port: {port}, drain_delay_seconds: 0, access_log: false}}
database: {{url: "{db_url}"}}
usage: {{spool_dir: "{spool}", flush_interval_seconds: {flush_interval}, batch_size: {batch_size},
        store_completions: true}}
"""


PG_ADMIN_DSN = os.environ.get("LLM_PROXY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_HOST = "127.0.0.1"
PG_PORT = 5432


async def pg_available() -> bool:
    try:
        conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError):
        return False
    await conn.close()
    return True


async def create_pg_database(tag: str) -> str:
    name = f"llmp_{tag}_{os.getpid()}_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_pg_database(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def pg_url(name: str, port: int = PG_PORT) -> str:
    return f"postgresql+asyncpg://postgres@{PG_HOST}:{port}/{name}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpRelay:
    """127.0.0.1:<port> -> target. cut() drops every connection and refuses new ones; restore() reopens."""

    def __init__(self, host: str = PG_HOST, port: int = PG_PORT) -> None:
        self.target = (host, port)
        self.open = True
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    def cut(self) -> None:
        self.open = False
        for t in list(self._transports):
            t.abort()
        self._transports.clear()

    def restore(self) -> None:
        self.open = True

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        pair = {writer.transport, up_writer.transport}
        self._transports |= pair

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        tasks = [asyncio.ensure_future(pipe(reader, up_writer)), asyncio.ensure_future(pipe(up_reader, writer))]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            self._transports -= pair


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 20.0, every: float = 0.05) -> None:
    """Poll `check` until it is true (a bounded loop with a deadline, for rows written asynchronously)."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(every)


class HeaderAuth:
    """Test authenticator: `x-test-user: alice` is principal alice; `root` is an administrator; `x-test-groups: a,b`
    are the principal's groups."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        user = headers.get("x-test-user", "anonymous")
        groups = tuple(g for g in headers.get("x-test-groups", "").split(",") if g)
        return Principal(subject=user, username=f"{user}@example.com", groups=groups, auth_method="test",
                         is_admin=user == "root")

    def health(self) -> dict[str, Any]:
        return {"ok": True, "mode": "test"}


class RelayThread:
    """A TcpRelay on its own event loop thread, for a database client that lives in another thread (the
    proxy's) while the test's own loop may be blocked in ProxyServer start/stop."""

    def __init__(self, host: str = PG_HOST, port: int = PG_PORT) -> None:
        from ..helpers import LoopThread

        self.lt = LoopThread("db-relay")
        self.relay = TcpRelay(host, port)
        self.port = self.lt.run(self.relay.start())

    def cut(self) -> None:
        self.lt.call(self.relay.cut)

    def restore(self) -> None:
        self.lt.call(self.relay.restore)

    def close(self) -> None:
        self.lt.run(self.relay.close())
        self.lt.stop()
