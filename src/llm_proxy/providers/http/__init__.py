"""The only place that does upstream I/O: a small pooled HTTP/1.1 client, timeouts, exception mapping.

Why our own client: on the upstream hop aiohttp's client cost more CPU per request than the whole rest of
the gateway (bench/RESULTS.md, "Server and HTTP client"). Upstreams are a handful of known origins that
speak HTTP/1.1 with keep-alive, so the client here does only that: one `asyncio.Protocol` per connection,
a strict response parser (status line, headers, Content-Length / chunked / read-to-close bodies), a LIFO
pool per provider and origin with a connection limit, TLS through the standard `ssl` module, and the
`HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY` environment (CONNECT tunnels; plain-http upstreams in absolute
form). It has no cookies, redirects or compression negotiation (it never sends Accept-Encoding; a gzip or
deflate body is still decoded, within the same size cap as a plain one). A non-streamed body is capped at the
provider's `max_response_bytes`. Timers are lazy: one per connection, kept across waits and requests, re-armed
when it fires before the current wait's deadline (`_Conn._on_timer`).

The package, by job: this module is the connection (`_Conn`: one `asyncio.Protocol`, the response parser and
the waits; here, so that the tunables below are the package's own and the connection reads them); `pool` the
connections per provider and origin; `proxy_env` the proxy environment; `client` the request encoding,
`UpstreamResponse` and `UpstreamClient`; `exceptions` the client's own exceptions and the one mapping of them
to ProxyErrors. The names callers use are re-exported here.
"""

from __future__ import annotations

import asyncio
import re
import ssl

from .exceptions import BadResponse, ProxyRefused, TooLarge, _Closed
from .proxy_env import HttpProxy, ProxyEnv

KEEPALIVE_SECONDS = 30.0  # an idle pooled connection older than this is closed instead of reused
MAX_HEAD_BYTES = 64 * 1024  # status line + headers of one response
MAX_BUFFERED = 1024 * 1024  # a stream's undelivered body bytes before reading from the socket pauses
DEFAULT_MAX_BODY = 32 * 1024 * 1024  # ProviderSettings.max_response_bytes' default
INFLATE_PIECE = 1024 * 1024  # a compressed stream is inflated in pieces of at most this many bytes
LINGER_SECONDS = 1.0  # a stream read up to its end marker waits this long for its body's end to be reused

_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# What the strict parser made of a status line / header line it has checked before, by the line's bytes: most
# of a response head repeats from one response to the next (the server, the content type, often the length),
# and a hit costs one dict look-up instead of a split, a regex match and two decodes. Only what parsed without
# error is kept (a bad line is checked, and refused, every time), lines of at most _CACHED_LINE bytes, at
# most _CACHED_LINES of them (emptied when full: a server sending ever new lines only costs the misses).
_CACHED_LINE = 200
_CACHED_LINES = 512
_STATUS_LINES: dict[bytes, tuple[int, bool]] = {}
_HEADER_LINES: dict[bytes, tuple[str, str]] = {}


def _status_line(line: bytes) -> tuple[int, bool]:
    """(status, whether HTTP/1.1) of a response's first line; BadResponse if it is not one."""
    parts = line.split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3 or not parts[1].isdigit():
        raise BadResponse("bad status line")
    status = int(parts[1])
    if status < 100:
        raise BadResponse("bad status line")
    out = (status, parts[0] == b"HTTP/1.1")
    if len(line) <= _CACHED_LINE:
        if len(_STATUS_LINES) >= _CACHED_LINES:
            _STATUS_LINES.clear()
        _STATUS_LINES[line] = out
    return out


def _header_line(line: bytes) -> tuple[str, str]:
    """(lower-case name, value without surrounding blanks) of a header line; BadResponse if it is not one."""
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise BadResponse("bad header line")
    out = (name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1"))
    if len(line) <= _CACHED_LINE:
        if len(_HEADER_LINES) >= _CACHED_LINES:
            _HEADER_LINES.clear()
        _HEADER_LINES[line] = out
    return out


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
        self._timer: asyncio.TimerHandle | None = None  # see _on_timer
        self._timer_at = 0.0
        self._at: float | None = None  # the current wait's deadline and longest silence (see wait)
        self._gap: float | None = None
        self._since = 0.0
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
        it = iter(lines)
        first = next(it)
        st = _STATUS_LINES.get(first)
        if st is None:
            st = _status_line(first)
        status, keep = st
        headers: dict[str, str] = {}
        seen = _HEADER_LINES.get
        for line in it:
            kv = seen(line)
            if kv is None:
                kv = _header_line(line)
            k, v = kv
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
        conn_tokens = headers.get("connection")
        if keep and conn_tokens is not None and "close" in conn_tokens.lower():
            keep = False
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
            if len(cl) <= 18 and cl.isdigit() and cl.isascii():  # what _DIGITS takes, without the regex
                self._left = int(cl)
            else:
                cl_b = cl.encode("latin-1").split(b",", 1)[0].strip()
                if not _DIGITS.fullmatch(cl_b):
                    raise BadResponse("bad Content-Length")
                self._left = int(cl_b)
            self.reusable = keep
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

    def _on_timer(self) -> None:
        """The connection's one timer: time out the current wait if its deadline has passed, re-arm otherwise.

        It is not cancelled when a wait ends: the next wait (of this response or of the next request on the
        connection) keeps it when it is due no later than that wait's own deadline, so it fires early and
        re-arms itself here. That saves a timer handle per wait; a timer with no live wait goes dormant."""
        self._timer = None
        w = self._waiter
        if w is None or w.done():
            return
        when = self._at
        gap = self._gap
        if gap is not None:
            quiet_from = self._last_rx if self._last_rx > self._since else self._since
            if when is None or quiet_from + gap < when:
                when = quiet_from + gap
        if when is None:  # a wait without a deadline (a CONNECT, bounded by the caller)
            return
        if when > self.loop.time():
            self._timer_at = when
            self._timer = self.loop.call_at(when, self._on_timer)
            return
        self._waiter = None
        w.set_exception(TimeoutError())

    def wait(self, at: float | None, gap: float | None, on_data: bool) -> asyncio.Future[None]:
        """The next event to await (headers, completion, and with on_data any body bytes).

        `at`: a loop time that must not pass; `gap`: the longest time without received data. A plain method
        returning the future (no coroutine per wait): a waiter left behind by a cancelled task is a done
        future, which the wake-ups and the timer skip."""
        if self._exc is not None:
            raise self._exc
        loop = self.loop
        w = self._waiter = loop.create_future()
        self._wake_on_data = on_data
        self._at = at
        self._gap = gap
        if at is not None or gap is not None:
            now = self._since = loop.time()
            if gap is None:
                when: float = at  # type: ignore[assignment]
            else:
                when = now + gap
                if at is not None and at < when:
                    when = at
            t = self._timer
            if t is None or self._timer_at > when:  # (an armed timer due no later than `when` will do)
                if t is not None:
                    t.cancel()
                self._timer_at = when
                self._timer = loop.call_at(when, self._on_timer)
        return w

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


# The parts that build on the connection: imported after it (they import `_Conn` and the constants from this
# package), then re-exported, so `from llm_proxy.providers.http import UpstreamClient` keeps working.
from .client import UpstreamClient, UpstreamResponse  # noqa: E402
from .pool import _Pool  # noqa: E402

__all__ = [
    "DEFAULT_MAX_BODY",
    "INFLATE_PIECE",
    "KEEPALIVE_SECONDS",
    "LINGER_SECONDS",
    "MAX_BUFFERED",
    "MAX_HEAD_BYTES",
    "BadResponse",
    "HttpProxy",
    "ProxyEnv",
    "ProxyRefused",
    "TooLarge",
    "UpstreamClient",
    "UpstreamResponse",
    "_Conn",
    "_Pool",
]
