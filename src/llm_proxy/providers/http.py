"""The only place that does upstream I/O: pooled aiohttp sessions, timeouts, exception mapping."""

from __future__ import annotations

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
    connect, first_byte, idle, total = t
    # Non-streamed answers arrive in one piece after the whole generation: the read gap is first_byte.
    # Streams must keep flowing: the gap between chunks (and before the first) is bounded by idle.
    return aiohttp.ClientTimeout(
        total=total, sock_connect=connect, sock_read=min(idle, first_byte) if stream else first_byte
    )


class UpstreamResponse:
    """A response whose headers have arrived; the body is read or streamed by the caller."""

    __slots__ = ("_provider_id", "_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, provider_id: str) -> None:
        self._resp = resp
        self._provider_id = provider_id
        self.status = resp.status
        self.headers = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except _IO_ERRORS as exc:
            raise _map(exc, self._provider_id, "mid-response") from None

    async def chunks(self) -> AsyncIterator[bytes]:
        """Raw body chunks as they arrive."""
        content = self._resp.content
        try:
            while True:
                data = await content.readany()
                if not data:
                    return
                yield data
        except _IO_ERRORS as exc:
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

    async def send(self, provider_id: str, req: UpstreamRequest, timeouts: TimeoutSettings) -> UpstreamResponse:
        """Send the request and wait for the response headers."""
        timeout = _client_timeout((timeouts.connect, timeouts.first_byte, timeouts.idle, timeouts.total), req.stream)
        try:
            resp = await self._sessions[provider_id].request(
                req.method, req.url, data=req.body, headers=req.headers, timeout=timeout
            )
        except _IO_ERRORS as exc:
            raise _map(exc, provider_id, "connecting") from None  # includes the wait for headers
        return UpstreamResponse(resp, provider_id)
