"""The upstream client callers use: request encoding, TLS contexts, `UpstreamResponse` and `UpstreamClient`."""

from __future__ import annotations

import asyncio
import logging
import ssl
import zlib
from collections.abc import AsyncGenerator, Coroutine
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from ...config import ProviderSettings, TimeoutSettings
from ...errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from ..base import UpstreamRequest
from ..upstream_errors import safe_token
from . import INFLATE_PIECE, _Conn
from .exceptions import BadResponse, TooLarge, _Closed, _map
from .pool import _Pool
from .proxy_env import ProxyEnv

log = logging.getLogger("llm_proxy.upstream")

_TARGETS_PER_PROVIDER = 1024  # URLs whose pool and request line a provider keeps (UpstreamClient._pool)


def _ssl_context(settings: ProviderSettings) -> ssl.SSLContext:
    if not settings.verify_tls:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    # create_default_context honours SSL_CERT_FILE / SSL_CERT_DIR: the deployment's CA bundle.
    return ssl.create_default_context(cafile=settings.tls_cafile or None)


@lru_cache(maxsize=1024)
def _origin(url: str) -> tuple[str, str, int, str, bytes]:
    """(scheme, host, port, origin key, request-target + Host header prefix) of an upstream URL."""
    u = urlsplit(url)
    scheme = u.scheme.lower()
    if scheme not in ("http", "https") or not u.hostname:
        raise ProxyError(f"Upstream URL scheme must be http or https: {scheme or '(none)'}", code="bad_upstream_url")
    port = u.port or (443 if scheme == "https" else 80)
    host_hdr = u.netloc.rpartition("@")[2]
    if (scheme == "https" and host_hdr.endswith(":443")) or (scheme == "http" and host_hdr.endswith(":80")):
        host_hdr = host_hdr.rsplit(":", 1)[0]
    target = (u.path or "/") + ("?" + u.query if u.query else "")
    if any(c in target for c in " \r\n") or any(c in host_hdr for c in " \r\n"):
        raise ProxyError("Upstream URL contains whitespace", code="bad_upstream_url")
    line = f" {target} HTTP/1.1\r\nhost: {host_hdr}\r\n".encode()
    return scheme, u.hostname, port, f"{scheme}://{u.hostname}:{port}", line


# The request header lines encoded before, by (name, value): most of a request's headers are the provider's own
# and repeat on every request (content type, credentials). Bounded like the parser's caches (emptied when full);
# the ids the gateway stamps on each request are never kept (each is new).
_CACHED_LINE = 256
_CACHED_LINES = 256
_REQUEST_LINES: dict[tuple[str, str], bytes] = {}
_PER_REQUEST = frozenset({"x-request-id", "x-client-request-id", "traceparent"})
_METHODS = {"POST": b"POST", "GET": b"GET"}


def _header(item: tuple[str, str]) -> bytes:
    """One request header line, or b"" for the ones the client writes itself (Host, Content-Length)."""
    k, v = item
    if "\r" in k or "\n" in k or "\0" in k or "\r" in v or "\n" in v or "\0" in v:
        # Never let a header value (a key read from a Secret with a trailing newline, say) split the request.
        raise ProxyError("An upstream request header contains a line break", code="bad_upstream_header")
    lk = k.lower()
    if lk == "host" or lk == "content-length":
        return b""
    out = f"{k}: {v}\r\n".encode("latin-1")
    if lk not in _PER_REQUEST and len(out) <= _CACHED_LINE:
        if len(_REQUEST_LINES) >= _CACHED_LINES:
            _REQUEST_LINES.clear()
        _REQUEST_LINES[item] = out
    return out


def _payload(req: UpstreamRequest, line: bytes) -> bytes:
    method = req.method
    parts = [_METHODS.get(method) or method.encode("ascii"), line]
    known = _REQUEST_LINES.get
    for item in req.headers.items():
        got = known(item)
        parts.append(got if got is not None else _header(item))
    body = req.body
    parts.append(b"content-length: %d\r\n\r\n" % len(body))
    if body:
        parts.append(body)
    return b"".join(parts)


def _decoder_for(headers: dict[str, str]) -> zlib._Decompress | None:
    enc = headers.get("content-encoding")
    if enc is None or enc.strip().lower() in ("", "identity"):
        return None
    if enc.strip().lower() in ("gzip", "x-gzip", "deflate"):
        return zlib.decompressobj(47)  # 32 + 15: zlib or gzip header, detected
    # The upstream's value is named only when it is a plain token: a header may carry anything (a key, echoed).
    name = safe_token(enc.strip(), ())
    raise BadResponse(f"unsupported Content-Encoding {name!r}" if name else "unsupported Content-Encoding")


def _inflate(dec: zlib._Decompress, data: bytes, limit: int, final: bool) -> bytes:
    """At most `limit` bytes inflated from `data`; what did not fit stays in `dec.unconsumed_tail`."""
    try:
        out = dec.decompress(data, limit)
        if final and not dec.unconsumed_tail:
            out += dec.flush()
    except zlib.error:
        raise BadResponse("body does not match its Content-Encoding") from None
    return out


class UpstreamResponse:
    """A response whose headers have arrived; the body is read or streamed by the caller."""

    __slots__ = ("_conn", "_first_byte_at", "_idle", "_inflating", "_pool", "_provider_id", "_total_at", "headers",
                 "status")

    def __init__(
        self, conn: _Conn, pool: _Pool, provider_id: str, first_byte_at: float | None, idle: float, total_at: float
    ) -> None:
        self._conn = conn
        self._pool = pool
        self._provider_id = provider_id
        self._first_byte_at = first_byte_at  # loop time by which a stream's first chunk must arrive
        self._idle = idle
        self._total_at = total_at
        self.status = conn.status
        self.headers = conn.headers
        self._inflating = False

    async def read(self) -> bytes:
        conn = self._conn
        if not conn.complete or conn.flow:
            try:
                conn.whole()
                while not conn.complete:
                    await conn.wait(self._total_at, self._idle, False)
            except (OSError, TimeoutError, BadResponse) as exc:
                self.close()
                raise _map(exc, self._provider_id, "mid-response") from None
        return self.body()

    def body(self) -> bytes:
        """The body of a response that is all in (`complete`: a non-streamed one as send() returns it), without
        a coroutine; decoded if it came compressed. read() is this after waiting for the end."""
        conn = self._conn
        assert conn.complete
        try:
            raw = conn.take()
            dec = _decoder_for(self.headers)
            if dec is None:
                return raw
            cap = conn.cap
            out = _inflate(dec, raw, cap + 1, final=True)
            if len(out) > cap or dec.unconsumed_tail:
                raise TooLarge(f"over {cap} bytes once decoded")
            return out
        except (OSError, BadResponse) as exc:
            self.close()
            raise _map(exc, self._provider_id, "mid-response") from None

    @property
    def complete(self) -> bool:
        """The whole body is in (body() may be called)."""
        return self._conn.complete

    def chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive (what one socket read brought, or all that piled up meanwhile).

        The first chunk must arrive by the first-byte deadline and each later one within `idle` of the
        moment the consumer asked for it; `total` bounds the whole. Iterate it from one task."""
        return _Chunks(self)

    def finished(self) -> bool:
        """The body has ended and chunks() gave all of it (False while inflating: it may have pieces to come)."""
        conn = self._conn
        return conn.complete and not conn.buffered and not self._inflating

    def close(self) -> None:
        """Drop the connection: this is also how an upstream request is cancelled."""
        conn = self._conn
        conn.reusable = False
        conn.abort()

    def release(self) -> None:
        """Give the connection back to the pool (dropped instead unless the response was read whole)."""
        self._pool.release(self._conn)


class _Chunks(AsyncGenerator[bytes, None]):
    """UpstreamResponse.chunks(): an async iterator object rather than an async generator, which costs a stream
    the loop's first-iteration hook (a WeakSet entry), a finalizer, and a GeneratorExit thrown in to close it.
    It behaves as the generator did: it ends (StopAsyncIteration from then on) at the body's end, at aclose() and
    after raising; asend() ignores its value; athrow() ends it with the exception given."""

    __slots__ = ("_at", "_dec", "_done", "_first", "_resp", "_started")

    def __init__(self, resp: UpstreamResponse) -> None:
        self._resp = resp
        self._at = resp._first_byte_at
        self._first = True
        self._started = False  # the body's decoder is looked up at the first read (its errors are the read's)
        self._dec: zlib._Decompress | None = None
        self._done = False

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        resp = self._resp
        conn = resp._conn
        try:
            if not self._started:
                self._started = True
                self._dec = _decoder_for(resp.headers)
                resp._inflating = self._dec is not None
            dec = self._dec
            while True:
                if dec is not None and dec.unconsumed_tail:  # what the last piece left (in bounded pieces)
                    data = _inflate(dec, dec.unconsumed_tail, INFLATE_PIECE, final=False)
                    if data:
                        return data
                    continue
                if conn.buffered:
                    data = conn.take()
                    if dec is not None:  # in bounded pieces: a small read may inflate to a lot
                        data = _inflate(dec, data, INFLATE_PIECE, final=False)
                        if not data:
                            continue
                    self._first = False
                    return data
                if conn.complete:
                    self._done = True
                    raise StopAsyncIteration
                at = self._at
                total_at = resp._total_at
                if self._first and at is not None:
                    await conn.wait(at if at < total_at else total_at, None, True)
                else:
                    await conn.wait(total_at, resp._idle, True)
        except TimeoutError:
            self._done = True
            resp.close()
            pid = resp._provider_id
            total_at = resp._total_at
            if self._first and self._at is not None and conn.loop.time() < total_at:
                raise UpstreamTimeout(f"Upstream provider '{pid}' timed out waiting for the first byte") from None
            if conn.loop.time() >= total_at:
                raise UpstreamTimeout(f"Upstream provider '{pid}' timed out (total)") from None
            raise UpstreamTimeout(
                f"Upstream provider '{pid}' timed out after {resp._idle:g}s without data mid-stream"
            ) from None
        except (OSError, BadResponse) as exc:
            self._done = True
            resp.close()
            raise _map(exc, resp._provider_id, "mid-stream") from None
        except BaseException:  # cancelled (the caller's task): ended, as a generator would be
            self._done = True
            raise

    def asend(self, value: None) -> Coroutine[Any, Any, bytes]:
        return self.__anext__()

    async def athrow(self, typ: Any, val: Any = None, tb: Any = None) -> bytes:
        self._done = True
        raise typ if val is None else val

    async def aclose(self) -> None:
        self._done = True


class UpstreamClient:
    """Connection pools per provider and origin (each provider may have its own TLS trust and limit)."""

    def __init__(self) -> None:
        self._settings: dict[str, ProviderSettings] = {}
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._pools: dict[tuple[str, str], _Pool] = {}
        # provider -> URL -> its pool and request line (what _pool works out, kept until close())
        self._targets: dict[str, dict[str, tuple[_Pool, bytes]]] = {}
        self._closed = False
        self._proxies = ProxyEnv()

    def register(self, settings: ProviderSettings) -> None:
        self._settings[settings.id] = settings

    async def start(self) -> None:
        self._closed = False
        self._proxies = ProxyEnv.from_env()
        for name, p in (("HTTPS_PROXY", self._proxies.https), ("HTTP_PROXY", self._proxies.http)):
            if p is not None:
                log.info("upstream connections use the %s at %s:%d (NO_PROXY: %s)", name, p.host, p.port,
                         ",".join(self._proxies.no_proxy) or "-")
        for pid, s in self._settings.items():  # at start, so a bad CA file fails here, not on a request
            if not (s.base_url or "").lower().startswith("http:"):
                self._ssl[pid] = _ssl_context(s)

    async def close(self) -> None:
        self._closed = True
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._targets.clear()

    def _pool(self, provider_id: str, url: str) -> tuple[_Pool, bytes]:
        by_url = self._targets.get(provider_id)
        if by_url is not None:
            hit = by_url.get(url)
            if hit is not None:
                return hit
        else:
            by_url = self._targets[provider_id] = {}
        scheme, host, port, origin, line = _origin(url)
        key = (provider_id, origin)
        pool = self._pools.get(key)
        if pool is None:
            if self._closed:
                raise UpstreamUnreachable("The proxy is shutting down")
            s = self._settings[provider_id]
            ctx = None
            if scheme == "https":
                ctx = self._ssl.get(provider_id) or self._ssl.setdefault(provider_id, _ssl_context(s))
            proxy = self._proxies.for_url(scheme, host)
            pool = self._pools[key] = _Pool(
                asyncio.get_running_loop(), host, port, ctx, s.max_connections, proxy, s.max_response_bytes
            )
        if pool.proxy is not None and pool.ssl is None:  # plain http through the proxy: absolute-form target
            line = b" " + url.split("#", 1)[0].encode() + line[line.index(b" HTTP/1.1") :]
            if pool.proxy.auth:
                line += b"proxy-authorization: " + pool.proxy.auth.encode("latin-1") + b"\r\n"
        if len(by_url) >= _TARGETS_PER_PROVIDER:  # (passthrough providers may put the client's model in the URL)
            by_url.clear()
        by_url[url] = (pool, line)
        return pool, line

    async def send(
        self, provider_id: str, req: UpstreamRequest, timeouts: TimeoutSettings, deadline: float | None = None
    ) -> UpstreamResponse:
        """Send the request and wait for the response headers (a non-streamed response: the whole of it).

        `first_byte` bounds the wait for a non-streamed answer (as the longest silence) and for a stream's
        headers and first body bytes together; `deadline` (a loop time: the caller's overall budget) cuts
        those waits earlier when it comes first; `total` bounds everything, a stream's body included.
        """
        pool, line = self._pool(provider_id, req.url)
        payload = _payload(req, line)
        loop = pool.loop
        now = loop.time()
        total_at = now + timeouts.total
        if deadline is not None and deadline < total_at:
            total_at = deadline
        first_at: float | None = None
        if req.stream:
            first_at = now + timeouts.first_byte
            if first_at > total_at:
                first_at = total_at
        fresh = False
        while True:
            # An idle pooled connection without a coroutine (pool.acquire would take the same one first).
            conn = None if fresh else pool.take_idle()
            if conn is not None:
                reused = True
            else:
                try:
                    conn, reused = await pool.acquire(timeouts.connect, fresh)
                except (OSError, TimeoutError) as exc:
                    raise _map(exc, provider_id, "connecting") from None
            conn.start(payload, req.stream)
            try:
                if req.stream:
                    while not conn.head_done:
                        await conn.wait(first_at, None, False)
                else:
                    while not conn.complete:
                        await conn.wait(total_at, timeouts.first_byte, False)
            except _Closed as exc:
                conn.abort()
                if reused and not exc.got_bytes and not fresh:
                    fresh = True  # the server closed a kept-alive connection as we reused it: once more, new
                    continue
                raise _map(exc, provider_id, "before responding" if not exc.got_bytes else "mid-response") from None
            except TimeoutError:
                conn.abort()
                msg = f"Upstream provider '{provider_id}' timed out waiting for the first byte"
                raise UpstreamTimeout(msg) from None
            except (OSError, BadResponse) as exc:
                conn.abort()
                raise _map(exc, provider_id, "mid-response") from None
            except BaseException:
                conn.abort()  # cancelled: the client went away; so does the upstream request
                raise
            if conn.status == 408 and reused and not fresh:
                # A server's `408 Request Timeout` for a kept-alive connection it is closing, read as the answer
                # to the request we just sent on it: that request was never looked at; once more, new.
                conn.abort()
                fresh = True
                continue
            return UpstreamResponse(conn, pool, provider_id, first_at, timeouts.idle, total_at)
