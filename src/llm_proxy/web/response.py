"""A response whose whole body is in hand (a JSON reply, a stream answered by one upstream read, an error),
written as one block: status line, headers and body in one transport write.

aiohttp's web.Response gets there through prepare() -> _prepare_headers (keep-alive, Date, Server, the
content-type default, Connection) -> the on_response_prepare hook -> _write_headers (a CIMultiDict serialised
in C) -> write_eof -> StreamWriter.write_eof, which is a good part of the proxy's CPU for a short answer.
Reply takes the same decisions from the same inputs, with the fixed headers of its kind kept as ready text:

- keep-alive: the response's own (force_close()), else the request's (`Connection: close`, HTTP/1.0 without
  keep-alive); `Connection: keep-alive` for a kept HTTP/1.0 connection, `Connection: close` for an HTTP/1.1 one
  that is not kept (as _prepare_headers writes them);
- Date (aiohttp's per-second cached text), Server (aiohttp's SERVER_SOFTWARE), Content-Length (the body's);
- header names and values other than the kinds' constants refused when they carry a control character but
  tab (what aiohttp's serialiser refuses: CR/LF would split the head);
- the response's state left as StreamResponse.write_eof leaves it (prepared, eof sent, body_length = the
  bytes written), so RequestHandler.finish_response's own prepare() and write_eof() are no-ops.

Whatever the block does not cover goes through web.Response's machinery unchanged (Reply is one): a HEAD or
CONNECT request, a status whose body must be empty, compression, chunking, cookies, an on_response_prepare
handler on any app of the route, an extra header that aiohttp would treat specially (Content-Length, Date,
Connection...), or anyone touching `headers` (the CIMultiDict is built then, from the same fields).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.compression_utils import MAX_SYNC_CHUNK_SIZE
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion10, HttpVersion11
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict

__all__ = ("JSON", "SSE", "Kind", "Reply")

_REQUEST_ID = "x-request-id"
# What _prepare_headers (or Response._start) sets, keeps or looks at: an extra header by one of these names
# takes aiohttp's path, which knows what to do with it.
_SPECIAL = frozenset({"content-length", "content-type", "content-encoding", "transfer-encoding", "date", "server",
                      "connection", "set-cookie", _REQUEST_ID})
# aiohttp's serialiser refuses these (RFC 9110 5.5, RFC 9112 4): any control character but tab, and DEL.
_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n"
_STATUS_LINES: dict[int, str] = {}  # HTTP/1.1 status lines, per status (the few the proxy answers with)


class Kind:
    """The fixed headers of one kind of answer, as header lines and as (name, value) pairs."""

    __slots__ = ("lines", "pairs", "special")

    def __init__(self, *pairs: tuple[str, str]) -> None:
        self.pairs = pairs
        self.lines = "".join(f"{name}: {value}\r\n" for name, value in pairs)
        self.special = _SPECIAL | {name.lower() for name, _ in pairs}


JSON = Kind(("Content-Type", "application/json"))
SSE = Kind(("content-type", "text/event-stream"), ("cache-control", "no-cache"), ("x-accel-buffering", "no"))


def _checked(text: str) -> str:
    """`text` (header names and values joined by spaces) when aiohttp would send it, else ValueError."""
    # isprintable() (C, one pass) is true for the usual ASCII text; only otherwise is the exact rule applied
    # (tab and non-ASCII characters are allowed, as aiohttp allows them).
    if not text.isprintable() and _FORBIDDEN.search(text) is not None:
        raise ValueError("Forbidden control character detected in headers. Potential header injection attack.")
    return text


def _status_line(status: int, reason: str) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = f"HTTP/1.1 {status} {reason}\r\n"
    return line


class Reply(web.Response):
    """A whole answer: `body` with `kind`'s headers, `headers` (not copied: the caller no longer changes them)
    and `x-request-id: request_id` (the middleware sets `request_id` on an unprepared one). See the module."""

    _zlib_executor_size = MAX_SYNC_CHUNK_SIZE  # (web.Response.__init__'s, used by its compression only)
    _zlib_executor = None
    _multidict: CIMultiDict[str] | None = None  # built when someone asks for `headers`: aiohttp's path then
    _tried = False  # the block was written, or its write failed: nothing more goes out

    def __init__(self, body: bytes, kind: Kind = JSON, *, status: int = 200, headers: Mapping[str, str] | None = None,
                 request_id: str | None = None) -> None:
        # Not StreamResponse.__init__ / Response.__init__: they build the CIMultiDict this class avoids; the
        # fields they set are set here (the others are class attributes).
        self._state = {}
        self._body = body
        self._status = status
        self._reason = REASON_PHRASES.get(status, "")
        self._kind = kind
        self._extra = headers
        self._rid = request_id
        if headers:
            # Checked now (a ValueError before the caller records the request, as web.Response's came at
            # prepare(), before the exchange recorded it), and kept as header lines.
            _checked(" ".join(headers) + " " + " ".join(headers.values()))
            if not kind.special.isdisjoint(map(str.lower, headers)):
                self._build()
        if status in EMPTY_BODY_STATUS_CODES:
            self._build()

    @property
    def request_id(self) -> str | None:
        return self._rid

    @request_id.setter
    def request_id(self, value: str) -> None:
        self._rid = value
        if self._multidict is not None:
            self._multidict[_REQUEST_ID] = value

    def _build(self) -> CIMultiDict[str]:
        """The headers as aiohttp keeps them; once built, the response goes aiohttp's way."""
        headers = self._multidict
        if headers is None:
            headers = self._multidict = CIMultiDict(self._kind.pairs)
            if self._extra:
                headers.update(self._extra)
            if self._rid is not None:
                headers[_REQUEST_ID] = self._rid
        return headers

    @property  # type: ignore[override]  # (a plain attribute in StreamResponse)
    def _headers(self) -> CIMultiDict[str]:
        # Read by web.Response's machinery and by `headers`.
        return self._build()

    @_headers.setter
    def _headers(self, value: CIMultiDict[str]) -> None:
        self._multidict = value

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        if self._eof_sent:
            return None
        if self._payload_writer is not None:
            return self._payload_writer
        method = request.method
        if self._multidict is not None or method == "HEAD" or method == "CONNECT" or self._compression \
                or self._chunked or self._cookies or _hooked(request):
            return await super().prepare(request)
        writer = request._payload_writer
        self._req = request
        self._payload_writer = writer
        self._must_be_empty_body = False
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        if version == HttpVersion11:
            line = _status_line(self._status, self._reason)
            connection = "" if keep_alive else "Connection: close\r\n"
        else:
            line = f"HTTP/{version[0]}.{version[1]} {self._status} {self._reason}\r\n"
            connection = "Connection: keep-alive\r\n" if keep_alive and version == HttpVersion10 else ""
        extra = self._extra
        rid = self._rid
        body: bytes = self._body  # type: ignore[assignment]  # (as given to __init__)
        head = "".join((
            line,
            self._kind.lines,
            "".join(map("{}: {}\r\n".format, extra.keys(), extra.values())) if extra else "",
            "" if rid is None else f"x-request-id: {_checked(rid)}\r\n",
            f"Content-Length: {len(body)}\r\nDate: {rfc822_formatted_time()}\r\n",
            _SERVER,
            connection,
            "\r\n",
        ))
        # (utf-8 as aiohttp's serialiser writes it, which drops lone surrogates: "ignore" drops only those.)
        self._tried = True
        writer._write(head.encode("utf-8", "ignore") + body)  # type: ignore[attr-defined]  # a StreamWriter
        if writer.protocol._paused:  # type: ignore[attr-defined]  # (StreamWriter.write_eof drains too)
            await writer.drain()
        self._finish(writer)
        return None

    def _finish(self, writer: AbstractStreamWriter) -> None:
        # What StreamWriter.write_eof and StreamResponse.write_eof leave behind.
        writer._eof = True  # type: ignore[attr-defined]
        self._eof_sent = True
        self._req = None
        self._body_length = writer.output_size
        self._payload_writer = None

    async def write_eof(self, data: bytes = b"") -> None:
        if self._eof_sent:
            return
        if self._tried:  # the block's write failed (the client left): as aiohttp, nothing is written again
            assert self._payload_writer is not None
            self._finish(self._payload_writer)
            return
        await super().write_eof(data)


def _hooked(request: BaseRequest) -> bool:
    """Whether an app of the request's route has on_response_prepare handlers (web.Request._prepare_hook would
    send them the response; aiohttp's path does)."""
    match_info = getattr(request, "_match_info", None)
    if match_info is not None:
        for app in match_info._apps:
            if app.on_response_prepare:
                return True
    return False
