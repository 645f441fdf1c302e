"""The connections to one origin for one provider: LIFO reuse, a connection limit, waiters for a free slot."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque

from . import DEFAULT_MAX_BODY, _Conn
from .proxy_env import HttpProxy


class _Pool:
    """Connections to one origin for one provider: LIFO reuse, at most `limit` open at once."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        ssl_ctx: ssl.SSLContext | None,
        limit: int,
        proxy: HttpProxy | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ) -> None:
        self.loop = loop
        self.max_body = max_body
        self.host = host
        self.port = port
        self.ssl = ssl_ctx
        self.limit = limit
        self.proxy = proxy
        self.idle: list[_Conn] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[_Conn | None]] = deque()
        self.all: set[_Conn] = set()

    def take_idle(self) -> _Conn | None:
        idle = self.idle
        now = self.loop.time()
        while idle:
            conn = idle.pop()
            if conn.reusable_at(now):
                return conn
            conn.abort()
        return None

    async def acquire(self, connect_timeout: float, fresh: bool = False) -> tuple[_Conn, bool]:
        """A connection and whether it was reused from the pool."""
        if not fresh:
            conn = self.take_idle()
            if conn is not None:
                return conn, True
        async with asyncio.timeout(connect_timeout):
            while self.open >= self.limit:
                fut: asyncio.Future[_Conn | None] = self.loop.create_future()
                self.waiters.append(fut)
                try:
                    handed = await fut
                except BaseException:
                    if fut.done() and not fut.cancelled() and fut.result() is not None:
                        self.release(fut.result())  # type: ignore[arg-type]
                    raise
                if handed is not None:
                    return handed, True
                if not fresh and (conn := self.take_idle()) is not None:
                    return conn, True
            self.open += 1
            try:
                conn = await self._connect()
            except BaseException:
                self.open -= 1
                self._wake_one(None)
                raise
        self.all.add(conn)
        return conn, False

    async def _connect(self) -> _Conn:
        proxy = self.proxy
        if proxy is None:
            _, conn = await self.loop.create_connection(
                lambda: _Conn(self), self.host, self.port, ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
            return conn
        _, conn = await self.loop.create_connection(lambda: _Conn(self), proxy.host, proxy.port)
        if self.ssl is not None:
            try:
                await conn.tunnel(self.host, self.port, proxy.auth, self.ssl)
            except BaseException:
                conn.abort()
                raise
        return conn

    def release(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if not (conn.reusable and conn.complete) or conn.buffered:
            if conn.reusable and not conn.buffered and conn._linger is None and conn._exc is None:
                conn.linger()  # read up to the stream's end marker, the body's framing still to come
                return
            conn.abort()
            return
        conn.park()
        if self._wake_one(conn):  # handed straight to a request waiting for a connection
            return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)

    def lost(self, conn: _Conn) -> None:
        self.all.discard(conn)
        self.open -= 1
        self._wake_one(None)

    def _wake_one(self, value: _Conn | None) -> bool:
        """Wake the longest-waiting request (with a connection, or None: "a slot is free"); False if none waits."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(value)
                return True
        return False

    def close(self) -> None:
        for conn in list(self.all):
            conn.abort()
        self.idle.clear()
