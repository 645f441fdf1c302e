"""The only place that does upstream I/O: pooled aiohttp sessions, timeouts, exception mapping."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from functools import lru_cache

import aiohttp

from ..config import ProviderSettings, TimeoutSettings
from ..errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .base import UpstreamRequest


def _map(exc: BaseException, provider_id: str, stage: str) -> ProxyError:
    """Every foreign exception from upstream I/O becomes a ProxyError here, and nowhere else."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return UpstreamUnreachable(f"Upstream provider '{provider_id}' connection timed out")
    if isinstance(exc, TimeoutError):  # socket read timeout or total timeout
        return UpstreamTimeout(f"Upstream provider '{provider_id}' timed out {stage}")
    if stage == "connecting":
        return UpstreamUnreachable(f"Upstream provider '{provider_id}' is unreachable")
    return UpstreamUnreachable(f"Upstream provider '{provider_id}' closed the connection {stage}")


_IO_ERRORS = (aiohttp.ClientError, OSError, TimeoutError)


def _ssl_context(settings: ProviderSettings) -> ssl.SSLContext | bool:
    if not settings.verify_tls:
        return False
    if settings.tls_cafile:
        return ssl.create_default_context(cafile=settings.tls_cafile)
    return True


@lru_cache(maxsize=256)
def _client_timeout(t: tuple[float, float, float, float], stream: bool) -> aiohttp.ClientTimeout:
    connect, first_byte, _idle, total = t
    # Non-streamed answers arrive in one piece after the whole generation: the read gap is first_byte.
    # Streams: UpstreamResponse.chunks() bounds the first chunk by first_byte and each later gap by idle.
    # `total` bounds everything, a stream's body included.
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=None if stream else first_byte)


class UpstreamResponse:
    """A response whose headers have arrived; the body is read or streamed by the caller."""

    __slots__ = ("_first_byte_at", "_idle", "_provider_id", "_resp", "headers", "status")

    def __init__(
        self, resp: aiohttp.ClientResponse, provider_id: str, first_byte_at: float | None = None, idle: float = 0.0
    ) -> None:
        self._resp = resp
        self._provider_id = provider_id
        self._first_byte_at = first_byte_at  # loop time by which a stream's first chunk must arrive
        self._idle = idle
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _IO_ERRORS as exc:
            raise _map(exc, self._provider_id, "mid-response") from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw body chunks as they arrive.

        For a stream, the first chunk must arrive by the first-byte deadline and each later one within
        `idle` of the previous (the clock stops while the consumer holds a chunk). Iterate it from one task.
        """
        content = self._resp.content
        at = self._first_byte_at
        if at is None:
            try:
                while True:
                    data = await content.readany()
                    if not data:
                        return
                    yield data
            except _IO_ERRORS as exc:
                raise _map(exc, self._provider_id, "mid-stream") from None
        loop = asyncio.get_running_loop()
        idle = self._idle
        first = True
        cm = asyncio.timeout_at(at)
        try:
            async with cm:
                while True:
                    data = await content.readany()
                    if not data:
                        return
                    cm.reschedule(None)
                    first = False
                    yield data
                    cm.reschedule(loop.time() + idle)
        except _IO_ERRORS as exc:
            if cm.expired():
                what = "waiting for the first byte" if first else f"after {idle:g}s without data mid-stream"
                raise UpstreamTimeout(f"Upstream provider '{self._provider_id}' timed out {what}") from None
            raise _map(exc, self._provider_id, "mid-stream") from None

    def close(self) -> None:
        """Drop the connection: this is also how an upstream request is cancelled."""
        self._resp.close()

    def release(self) -> None:
        self._resp.release()


class UpstreamClient:
    """One pooled session per provider (each may have its own TLS trust and connection limit)."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._settings: dict[str, ProviderSettings] = {}

    def register(self, settings: ProviderSettings) -> None:
        self._settings[settings.id] = settings

    async def start(self) -> None:
        for pid, s in self._settings.items():
            connector = aiohttp.TCPConnector(
                limit=s.max_connections,
                limit_per_host=s.max_connections,
                ssl=_ssl_context(s),
                keepalive_timeout=30,
                ttl_dns_cache=300,
            )
            self._sessions[pid] = aiohttp.ClientSession(
                connector=connector,
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        for sess in self._sessions.values():
            await sess.close()
        self._sessions.clear()

    async def send(
        self, provider_id: str, req: UpstreamRequest, timeouts: TimeoutSettings, deadline: float | None = None
    ) -> UpstreamResponse:
        """Send the request and wait for the response headers.

        A stream's headers and first body chunk together must arrive within `first_byte`. `deadline` (a
        loop time: the caller's overall budget) cuts the wait for the headers, and a stream's first chunk,
        earlier when it comes first.
        """
        timeout = _client_timeout((timeouts.connect, timeouts.first_byte, timeouts.idle, timeouts.total), req.stream)
        session = self._sessions[provider_id]
        if not req.stream and deadline is None:  # the common non-streamed case: aiohttp's timeouts suffice
            try:
                resp = await session.request(req.method, req.url, data=req.body, headers=req.headers, timeout=timeout)
            except _IO_ERRORS as exc:
                raise _map(exc, provider_id, "connecting") from None  # includes the wait for headers
            return UpstreamResponse(resp, provider_id)
        at = deadline
        if req.stream:
            at = asyncio.get_running_loop().time() + timeouts.first_byte
            if deadline is not None and deadline < at:
                at = deadline
        cm = asyncio.timeout_at(at)
        try:
            async with cm:
                resp = await session.request(req.method, req.url, data=req.body, headers=req.headers, timeout=timeout)
        except _IO_ERRORS as exc:
            if cm.expired():
                msg = f"Upstream provider '{provider_id}' timed out waiting for the first byte"
                raise UpstreamTimeout(msg) from None
            raise _map(exc, provider_id, "connecting") from None
        return UpstreamResponse(resp, provider_id, at if req.stream else None, timeouts.idle)
