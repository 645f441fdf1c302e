"""The only place that does upstream I/O: a small pooled HTTP/1.1 client, timeouts, exception mapping.

Why our own client: on the upstream hop aiohttp's client cost more CPU per request than the whole rest of
the gateway (bench/RESULTS.md, "Server and HTTP client"). Upstreams are a handful of known origins that
speak HTTP/1.1 with keep-alive, so the client here does only that: one `asyncio.Protocol` per connection,
a strict response parser (status line, headers, Content-Length / chunked / read-to-close bodies), a LIFO
pool per provider and origin with a connection limit, TLS through the standard `ssl` module, and the
`HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` environment (CONNECT tunnels; plain-http upstreams in absolute
form). It has no cookies, redirects or compression negotiation (it never sends Accept-Encoding; a gzip or
deflate body is still decoded, within the same size cap as a plain one). A non-streamed body is capped at the
provider's `max_response_bytes`. Timers are lazy: one per wait, re-armed only if data arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import re
import ssl
import zlib
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote, urlsplit

from ..config import ProviderSettings, TimeoutSettings
from ..errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from .base import UpstreamRequest
from .upstream_errors import safe_token

log = logging.getLogger("llm_proxy.upstream")

KEEPALIVE_SECONDS = 30.0  # an idle pooled connection older than this is closed instead of reused
MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
MAX_BUFFERED = 1024 * 1024  # a stream's undelivered body bytes before reading from the socket pauses
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # ProviderSettings.max_response_bytes' default
INFLATE_PIECE = 1024 * 1024  # a compressed stream is inflated in pieces of at most this many bytes
LINGER_SECONDS = 1.0  # a stream read up to its end marker waits this long for its body's end to be reused

_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class BadResponse(Exception):
    """The upstream broke HTTP/1.1 framing (the connection is dropped)."""


class TooLarge(BadResponse):
    """A non-streamed body (or its inflated form) over the provider's `max_response_bytes`."""


class ProxyRefused(ConnectionError):
    """The HTTP proxy would not open a tunnel to the upstream."""

    def __init__(self, status: int) -> None:
        super().__init__(f"proxy answered {status} to CONNECT")
        self.status = status


class _Closed(ConnectionError):
    def __init__(self, got_bytes: bool) -> None:
        super().__init__("connection closed")
        self.got_bytes = got_bytes  # any byte of the response had arrived


def _map(exc: BaseException, provider_id: str, stage: str) -> ProxyError:
    """Every foreign exception from upstream I/O becomes a ProxyError here, and nowhere else."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TimeoutError):
        if stage == "connecting":
            return UpstreamUnreachable(f"Upstream provider '{provider_id}' connection timed out")
        return UpstreamTimeout(f"Upstream provider '{provider_id}' timed out {stage}")
    if isinstance(exc, TooLarge):
        return ProxyError(
            f"Upstream provider '{provider_id}' sent a response larger than the proxy accepts ({exc})",
            status=502, type="api_error", code="upstream_response_too_large",
        )
    if isinstance(exc, BadResponse):
        return UpstreamUnreachable(
            f"Upstream provider '{provider_id}' sent an invalid HTTP response ({exc})", code="bad_upstream_response"
        )
    if isinstance(exc, ProxyRefused):
        return UpstreamUnreachable(
            f"Upstream provider '{provider_id}' is unreachable: the HTTP proxy answered {exc.status} to CONNECT"
        )
    if stage == "connecting":
        return UpstreamUnreachable(f"Upstream provider '{provider_id}' is unreachable")
    return UpstreamUnreachable(f"Upstream provider '{provider_id}' closed the connection {stage}")


# Parser states
_IDLE, _HEAD, _LEN, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _EOF_BODY, _DONE = range(9)


class _Conn(asyncio.Protocol):
    """One upstream connection: writes a request, parses the response, hands body bytes to one reader."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.cap = pool.max_body  # a non-streamed body's limit
        self._soft = MAX_BUFFERED if MAX_BUFFERED < pool.max_body else pool.max_body
        self._linger: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.idle_since = 0.0
        self._state = _IDLE
        self._buf = b""
        self._left = 0
        self._got = False  # any byte of the current response
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_rx = 0.0
        self._paused = False
        self._tunnelling = False
        self.flow = False
        self.status = 0
        self.headers: dict[str, str] = {}
        self.head_done = False
        self.body: list[bytes] = []
        self.buffered = 0
        self.complete = False

    # -- asyncio.Protocol -------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_rx = self.loop.time()
        self._got = True
        if self._buf:
            data = self._buf + data
            self._buf = b""
        try:
            self._feed(data)
        except BadResponse as exc:
            self.reusable = False
            self._fail(exc)
            self.abort()

    def eof_received(self) -> bool:
        if self._state == _EOF_BODY:
            self._message_done()
        return False  # close the transport

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
        self.reusable = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._state == _EOF_BODY:
            self._message_done()
        elif self._state not in (_IDLE, _DONE):
            self._fail(_Closed(self._got))
        self._cancel_timer()

    def pause_writing(self) -> None:  # request bodies are written in one go; nothing to throttle
        pass

    def resume_writing(self) -> None:
        pass

    # -- request ----------------------------------------------------------------------------------------
    def start(self, payload: bytes, stream: bool) -> None:
        self.flow = stream  # a stream's reader takes bytes as they come: pause the socket if it falls behind
        self._state = _HEAD
        self._got = False
        self._exc = None
        self.status = 0
        self.headers = {}
        self.head_done = False
        self.body = []
        self.buffered = 0
        self.complete = False
        self.reusable = False
        self._last_rx = self.loop.time()
        self.transport.write(payload)  # type: ignore[union-attr]

    async def tunnel(self, host: str, port: int, auth: str | None, ctx: ssl.SSLContext | None) -> None:
        """Ask the HTTP proxy at the other end for a tunnel to host:port, then start TLS through it."""
        hp = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        head = f"CONNECT {hp} HTTP/1.1\r\nhost: {hp}\r\n" + (f"proxy-authorization: {auth}\r\n" if auth else "")
        self._tunnelling = True
        try:
            self.start((head + "\r\n").encode("latin-1"), False)
            while not self.head_done:
                await self.wait(None, None, False)  # bounded by the caller's connect timeout
        finally:
            self._tunnelling = False
        if self.status >= 300:
            self.abort()
            raise ProxyRefused(self.status)
        self.complete = False
        if ctx is not None:
            self.transport = await self.loop.start_tls(
                self.transport, self, ctx, server_hostname=host  # type: ignore[arg-type]
            )

    def park(self) -> None:
        """The response was read whole: the connection waits in the pool for the next request."""
        self._state = _IDLE

    def linger(self) -> None:
        """The reader stopped at the stream's own end marker (`data: [DONE]`) before the body's framing ended
        (the last chunk often comes in a later read): back to the pool once it has, dropped if it has not
        within LINGER_SECONDS, or if anything but the end of the body comes."""
        self._linger = self.loop.call_later(LINGER_SECONDS, self.abort)

    def whole(self) -> None:
        """The body is to be read whole (an error answer to a stream request): stop pausing, apply the cap."""
        self.flow = False
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if self.buffered > self.cap:
            raise TooLarge(f"over {self.cap} bytes")

    def reusable_at(self, now: float) -> bool:
        """Still fit for a request: not closed, closing or broken while idle (a server may send `408` before
        it hangs up), and not idle for longer than the keep-alive limit."""
        t = self.transport
        return (
            not self.closed
            and self._exc is None
            and t is not None
            and not t.is_closing()
            and now - self.idle_since < KEEPALIVE_SECONDS
        )

    def abort(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.abort()

    # -- parsing ----------------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        while pos < n:
            st = self._state
            if st == _LEN or st == _CHUNK_DATA:
                take = self._left if self._left < n - pos else n - pos
                self._sink(data if (pos == 0 and take == n) else data[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    if st == _LEN:
                        self._message_done()
                    else:
                        self._state = _CHUNK_CRLF
            elif st == _HEAD:
                idx = self._find(data, pos, b"\r\n\r\n", MAX_HEAD_BYTES, "response headers too large")
                if idx < 0:
                    return
                self._parse_head(data[pos:idx])
                pos = idx + 4
            elif st == _CHUNK_SIZE:
                idx = self._find(data, pos, b"\r\n", 1024, "bad chunk size line")
                if idx < 0:
                    return
                size_s = data[pos:idx].split(b";", 1)[0].strip(b" \t")
                if not _HEX.fullmatch(size_s):
                    raise BadResponse("bad chunk size")
                size = int(size_s, 16)
                pos = idx + 2
                if size == 0:
                    self._state = _TRAILER
                else:
                    self._left = size
                    self._state = _CHUNK_DATA
            elif st == _CHUNK_CRLF:
                if n - pos < 2:
                    self._buf = data[pos:]
                    return
                if data[pos : pos + 2] != b"\r\n":
                    raise BadResponse("chunk not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif st == _TRAILER:
                idx = self._find(data, pos, b"\r\n", MAX_HEAD_BYTES, "trailers too large")
                if idx < 0:
                    return
                line_empty = idx == pos
                pos = idx + 2
                if line_empty:
                    self._message_done()
            elif st == _EOF_BODY:
                self._sink(data if pos == 0 else data[pos:])
                return
            else:  # bytes nobody asked for (_IDLE / _DONE): never reuse this connection
                self.reusable = False
                if st == _DONE:
                    return
                raise BadResponse("data before any request")

    def _find(self, data: bytes, pos: int, sep: bytes, limit: int, what: str) -> int:
        """Index of `sep` at or after `pos`; -1 with the rest kept for the next read. Lines over `limit` fail."""
        idx = data.find(sep, pos)
        if idx < 0:
            if len(data) - pos > limit:
                raise BadResponse(what)
            self._buf = data[pos:]
        elif idx - pos > limit:
            raise BadResponse(what)
        return idx

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise BadResponse("bad status line")
        status = int(parts[1])
        if status < 100:
            raise BadResponse("bad status line")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.fullmatch(name):
                raise BadResponse("bad header line")
            k = name.decode("ascii").lower()
            v = value.strip(b" \t").decode("latin-1")
            if k in headers:
                if k == "content-length" and headers[k] != v:
                    raise BadResponse("conflicting Content-Length")
                headers[k] = headers[k] + ", " + v
            else:
                headers[k] = v
        if status < 200:  # 100 Continue, 103 Early Hints...: the real response follows
            if status == 101:
                raise BadResponse("unexpected protocol switch")
            return
        self.status = status
        self.headers = headers
        self.head_done = True
        if self._tunnelling and status < 300:  # CONNECT accepted: from here on the bytes are the upstream's
            self._state = _IDLE
            self._wake()
            return
        conn_tokens = headers.get("connection", "").lower()
        keep = parts[0] == b"HTTP/1.1" and "close" not in conn_tokens
        te = headers.get("transfer-encoding")
        if status == 204 or status == 304:
            self.reusable = keep
            self._message_done()
        elif te is not None:
            if te.rsplit(",", 1)[-1].strip().lower() != "chunked":
                raise BadResponse("unsupported Transfer-Encoding")
            self.reusable = keep and "content-length" not in headers
            self._state = _CHUNK_SIZE
        elif (cl := headers.get("content-length")) is not None:
            cl_b = cl.encode("latin-1").split(b",", 1)[0].strip()
            if not _DIGITS.fullmatch(cl_b):
                raise BadResponse("bad Content-Length")
            self.reusable = keep
            self._left = int(cl_b)
            if self._left > self.cap and not self.flow:
                raise TooLarge(f"Content-Length {self._left} over {self.cap} bytes")
            self._state = _LEN
            if self._left == 0:
                self._message_done()
        else:
            self._state = _EOF_BODY
        self._wake()

    def _sink(self, piece: bytes) -> None:
        self.body.append(piece)
        self.buffered += len(piece)
        if self.buffered > self._soft:
            if self.flow:
                if not self._paused:
                    self._paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]
            elif self.buffered > self.cap:
                raise TooLarge(f"over {self.cap} bytes")
        w = self._waiter
        if w is not None and self._wake_on_data:
            self._wake()

    def _message_done(self) -> None:
        self._state = _DONE
        self.complete = True
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            # After this read is parsed: bytes past the end of the body (if any) forbid the reuse first.
            self.loop.call_soon(self.pool.release, self)
        self._wake()

    # -- waiting ----------------------------------------------------------------------------------------
    _wake_on_data = False

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_exception(exc)

    def _cancel_timer(self) -> None:
        t = self._timer
        if t is not None:
            self._timer = None
            t.cancel()

    def _on_timer(self, at: float | None, gap: float | None, since: float) -> None:
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return
        now = self.loop.time()
        when = at
        if gap is not None:
            quiet_from = self._last_rx if self._last_rx > since else since
            if quiet_from + gap > now and (at is None or at > now):
                when = quiet_from + gap if at is None or quiet_from + gap < at else at
                self._timer = self.loop.call_at(when, self._on_timer, at, gap, since)
                return
        self._waiter = None
        w.set_exception(TimeoutError())

    async def wait(self, at: float | None, gap: float | None, on_data: bool) -> None:
        """Wait for the next event (headers, completion, and with on_data any body bytes).

        `at`: a loop time that must not pass; `gap`: the longest time without received data."""
        if self._exc is not None:
            raise self._exc
        loop = self.loop
        w = self._waiter = loop.create_future()
        self._wake_on_data = on_data
        if at is not None or gap is not None:
            now = loop.time()
            when = at
            if gap is not None and (when is None or now + gap < when):
                when = now + gap
            self._timer = loop.call_at(when, self._on_timer, at, gap, now)  # type: ignore[arg-type]
        try:
            await w
        finally:
            self._waiter = None
            self._cancel_timer()

    def take(self) -> bytes:
        """Body bytes received so far and not yet taken."""
        body = self.body
        if not body:
            return b""
        data = body[0] if len(body) == 1 else b"".join(body)
        self.body = []
        self.buffered = 0
        if self._paused:
            self._paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return data


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


def _payload(req: UpstreamRequest, line: bytes) -> bytes:
    hdrs = req.headers
    parts = [req.method.encode("ascii"), line]
    for k, v in hdrs.items():
        lk = k.lower()
        if lk == "host" or lk == "content-length":
            continue
        parts.append(f"{k}: {v}\r\n".encode("latin-1"))
    joined = "".join(hdrs.values()) + "".join(hdrs)
    if "\r" in joined or "\n" in joined or "\0" in joined:
        # Never let a header value (a key read from a Secret with a trailing newline, say) split the request.
        raise ProxyError("An upstream request header contains a line break", code="bad_upstream_header")
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


@dataclass(frozen=True, slots=True)
class HttpProxy:
    host: str
    port: int
    auth: str | None  # the Proxy-Authorization value (Basic, from the proxy URL's user:password)

    def __repr__(self) -> str:  # never the credentials
        return f"HttpProxy({self.host}:{self.port})"


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY as curl reads them (lower case wins; NO_PROXY takes host names,
    domain suffixes with or without a leading dot, IP addresses, CIDR ranges, and `*`)."""

    https: HttpProxy | None = None
    http: HttpProxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProxyEnv:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return (env.get(name.lower()) or env.get(name.upper()) or "").strip()

        def parse(name: str) -> HttpProxy | None:
            raw = get(name)
            if not raw:
                return None
            u = urlsplit(raw if "://" in raw else "http://" + raw)
            try:
                port = u.port or 80
            except ValueError:
                port = -1
            if u.scheme.lower() != "http" or not u.hostname or port < 0:
                # Not fatal (a bad variable must not crash the pod): say so, and connect directly.
                log.warning("ignoring %s: only http://host:port proxies are supported", name.upper())
                return None
            auth = None
            if u.username is not None:
                cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
                auth = "Basic " + base64.b64encode(cred).decode()
            return HttpProxy(u.hostname, port, auth)

        no = tuple(e.strip().lower() for e in get("no_proxy").split(",") if e.strip())
        return cls(parse("https_proxy"), parse("http_proxy"), no)

    def for_url(self, scheme: str, host: str) -> HttpProxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypass(host):
            return None
        return proxy

    def bypass(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        for entry in self.no_proxy:
            if entry == "*":
                return True
            if ip is not None:
                try:
                    if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                        return True
                except ValueError:
                    pass
                continue
            name = entry.lstrip(".").rsplit(":", 1)[0] if entry.count(":") == 1 else entry.lstrip(".")
            if host == name or host.endswith("." + name):
                return True
        return False


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

    __slots__ = ("_conn", "_first_byte_at", "_idle", "_pool", "_provider_id", "_total_at", "headers", "status")

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

    async def read(self) -> bytes:
        conn = self._conn
        try:
            conn.whole()
            while not conn.complete:
                await conn.wait(self._total_at, self._idle, False)
            raw = conn.take()
            dec = _decoder_for(self.headers)
            if dec is None:
                return raw
            cap = conn.cap
            out = _inflate(dec, raw, cap + 1, final=True)
            if len(out) > cap or dec.unconsumed_tail:
                raise TooLarge(f"over {cap} bytes once decoded")
            return out
        except (OSError, TimeoutError, BadResponse) as exc:
            self.close()
            raise _map(exc, self._provider_id, "mid-response") from None

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """Body bytes as they arrive (what one socket read brought, or all that piled up meanwhile).

        The first chunk must arrive by the first-byte deadline and each later one within `idle` of the
        moment the consumer asked for it; `total` bounds the whole. Iterate it from one task."""
        conn = self._conn
        at = self._first_byte_at
        total_at = self._total_at
        idle = self._idle
        first = True
        try:
            dec = _decoder_for(self.headers)
            while True:
                if conn.buffered:
                    data = conn.take()
                    if dec is not None:  # in bounded pieces: a small read may inflate to a lot
                        data = _inflate(dec, data, INFLATE_PIECE, final=False)
                        while dec.unconsumed_tail:
                            first = False
                            yield data
                            data = _inflate(dec, dec.unconsumed_tail, INFLATE_PIECE, final=False)
                        if not data:
                            continue
                    first = False
                    yield data
                    continue
                if conn.complete:
                    return
                if first and at is not None:
                    await conn.wait(at if at < total_at else total_at, None, True)
                else:
                    await conn.wait(total_at, idle, True)
        except TimeoutError:
            self.close()
            if first and at is not None and conn.loop.time() < total_at:
                raise UpstreamTimeout(
                    f"Upstream provider '{self._provider_id}' timed out waiting for the first byte"
                ) from None
            if conn.loop.time() >= total_at:
                raise UpstreamTimeout(f"Upstream provider '{self._provider_id}' timed out (total)") from None
            raise UpstreamTimeout(
                f"Upstream provider '{self._provider_id}' timed out after {idle:g}s without data mid-stream"
            ) from None
        except (OSError, BadResponse) as exc:
            self.close()
            raise _map(exc, self._provider_id, "mid-stream") from None

    def close(self) -> None:
        """Drop the connection: this is also how an upstream request is cancelled."""
        conn = self._conn
        conn.reusable = False
        conn.abort()

    def release(self) -> None:
        """Give the connection back to the pool (dropped instead unless the response was read whole)."""
        self._pool.release(self._conn)


class UpstreamClient:
    """Connection pools per provider and origin (each provider may have its own TLS trust and limit)."""

    def __init__(self) -> None:
        self._settings: dict[str, ProviderSettings] = {}
        self._ssl: dict[str, ssl.SSLContext] = {}
        self._pools: dict[tuple[str, str], _Pool] = {}
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

    def _pool(self, provider_id: str, url: str) -> tuple[_Pool, bytes]:
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
