"""The client connection: aiohttp's HTTP/1.1 protocol with the gateway's limits and its error envelope.

aiohttp's RequestHandler keeps a connection for as long as the client likes while a request head or body
trickles in, lets one head grow to 128 headers of up to max_field_size bytes each, and answers what its
parser rejects with a text/plain 400 that echoes the offending bytes (a bearer token, if that is the line)
and logs them with a traceback. This subclass adds, per connection and without a timer per request:

- a header timeout (from the connection's start, or from a head's first byte, to the end of the head) and
  a body timeout (from the end of the head to the end of the body): one lazily re-armed call_at handle,
  armed only when a head or a body did not arrive within one read;
- caps on the whole head, on one header line and on Authorization alone (431);
- a cap on open connections per worker (503, then close);
- every parser rejection answered in the OpenAI envelope with a request id, echoing nothing, and logged as
  one rate-limited line without the request's bytes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo

from ..config import ServerSettings
from ..errors import PayloadTooLarge, ProxyError, ServiceUnavailable
from .errors import error_response

if TYPE_CHECKING:
    from aiohttp.web_request import BaseRequest

log = logging.getLogger("llm_proxy.web")

# The request line (method, target, version): OpenAI paths are short; aiohttp's default.
MAX_REQUEST_LINE_BYTES = 8190
_TOO_MANY_HEADERS = "Too many headers received"  # aiohttp's BadHttpMessage text (max_headers, 128)


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_connections: int
    max_header_bytes: int
    max_header_field_bytes: int
    max_authorization_bytes: int

    @classmethod
    def from_settings(cls, s: ServerSettings) -> ConnectionLimits:
        return cls(
            header_timeout=s.header_timeout_seconds,
            body_timeout=s.body_timeout_seconds,
            keepalive_timeout=s.keepalive_timeout_seconds,
            max_connections=s.max_connections,
            max_header_bytes=s.max_header_bytes,
            max_header_field_bytes=s.max_header_field_bytes,
            max_authorization_bytes=s.max_authorization_bytes,
        )

    @property
    def parser_field_limit(self) -> int:
        # The C parser has one limit for every header line (name + value): the larger of the two, the other
        # headers are checked against theirs once the head is parsed. Kept apart from the request-line limit
        # so that a LineTooLong says which of the two it was.
        limit = max(self.max_header_field_bytes, self.max_authorization_bytes + len("authorization"))
        return limit + 1 if limit == MAX_REQUEST_LINE_BYTES else limit


class BodyTimeout(asyncio.TimeoutError):
    """Set on a request's payload when its body did not arrive within body_timeout_seconds.

    A TimeoutError so that aiohttp's lingering read after the response stops on it quietly."""


class _HeaderTimeout(Exception):
    pass


class _HeadTooLarge(Exception):
    pass


class _BadVersion(Exception):
    pass


class _Throttled:
    """One log line per `interval` seconds at most; the next line says how many were left out."""

    __slots__ = ("_interval", "_next", "_skipped")

    def __init__(self, interval: float = 1.0) -> None:
        self._interval = interval
        self._next = 0.0
        self._skipped = 0

    def warning(self, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self._skipped += 1
            return
        self._next = now + self._interval
        if self._skipped:
            fields["suppressed"] = self._skipped
            self._skipped = 0
        log.warning(msg, extra=fields)


_rejections = _Throttled()
_refusals = _Throttled()


def _protocol_error(status: int, exc: BaseException | None, limits: ConnectionLimits) -> ProxyError:
    """The envelope for a request the protocol layer refused. Never carries the request's bytes."""
    if status == 408:
        return ProxyError("Request timed out before it was complete", status=408,
                          type="invalid_request_error", code="request_timeout")
    if status == 431 or (isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS):
        return ProxyError(
            f"Request headers are larger than the limit ({limits.max_header_bytes} bytes in all, "
            f"{limits.max_header_field_bytes} per header, {limits.max_authorization_bytes} for Authorization, "
            "at most 128 headers)",
            status=431, type="invalid_request_error", code="request_header_fields_too_large",
        )
    if isinstance(exc, LineTooLong):
        if len(exc.args) > 1 and exc.args[1] == MAX_REQUEST_LINE_BYTES:
            return ProxyError(f"Request target is longer than {MAX_REQUEST_LINE_BYTES} bytes", status=414,
                              type="invalid_request_error", code="uri_too_long")
        return _protocol_error(431, exc, limits)
    if status == 505:
        return ProxyError("Only HTTP/1.0 and HTTP/1.1 are supported", status=505,
                          type="invalid_request_error", code="http_version_not_supported")
    if status == 413:
        return PayloadTooLarge("Request body is larger than the configured limit")
    return ProxyError("Malformed HTTP request", status=400, type="invalid_request_error", code="bad_request")


def _refusal(request_id: str) -> bytes:
    body = ServiceUnavailable("Too many open connections; retry later", code="too_many_connections").body()
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"retry-after: 1\r\nx-request-id: %s\r\ncontent-length: %d\r\n\r\n%s"
        % (request_id.encode(), len(body), body)
    )


class GatewayServer(web.Server):
    """aiohttp's Server (the protocol factory) building GatewayProtocol connections; counts them."""

    def __init__(self, handler: Any, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.limits = limits
        self.open_connections = 0

    def __call__(self) -> RequestHandler:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """AppRunner whose server is a GatewayServer; the app's startup and cleanup run as usual."""

    def __init__(self, app: web.Application, *, limits: ConnectionLimits, **kwargs: Any) -> None:
        kwargs.update(
            keepalive_timeout=limits.keepalive_timeout,
            max_line_size=MAX_REQUEST_LINE_BYTES,
            max_field_size=limits.parser_field_limit,
        )
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return GatewayServer(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            limits=self._limits,
            **base._kwargs,
        )


class GatewayProtocol(RequestHandler):
    __slots__ = (
        "_body",
        "_body_deadline",
        "_counted",
        "_field_limit",
        "_head_bytes",
        "_head_deadline",
        "_limits",
        "_rejected",
        "_watch_at",
        "_watchdog",
    )

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = manager.limits
        self._field_limit = manager.limits.max_header_field_bytes
        self._counted = False
        self._rejected = False  # a refusal is queued: the rest of what the client sends is dropped
        self._head_bytes = 0  # bytes of the unfinished head received in earlier reads
        self._head_deadline = 0.0  # 0: no head is waited for
        self._body: StreamReader | None = None  # the payload still arriving
        self._body_deadline = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_at = 0.0

    # ---- connection ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self._manager
        assert isinstance(server, GatewayServer)
        if server.open_connections >= self._limits.max_connections:
            _refusals.warning("connection refused: max_connections reached",
                              max_connections=self._limits.max_connections)
            self._manager = None  # aiohttp's connection_lost is then a no-op
            self._rejected = True
            assert isinstance(transport, asyncio.Transport)
            from ..core.gateway import new_request_id

            transport.write(_refusal(new_request_id()))
            transport.close()
            return
        server.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        # A connection that never sends a complete head is closed after header_timeout, not keepalive.
        self._head_deadline = self._loop.time() + self._limits.header_timeout
        self._arm(self._head_deadline)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            server = self._manager
            if isinstance(server, GatewayServer):
                server.open_connections -= 1
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._body = None
        super().connection_lost(exc)

    # ---- reading ---------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        body = self._body
        in_head = body is None or body.is_eof()
        msgs = self._messages
        queued = len(msgs)
        RequestHandler.data_received(self, data)
        if len(msgs) > queued:  # one or more heads completed in this read
            size = self._head_bytes + len(data) if in_head else len(data)
            self._head_bytes = 0
            self._head_deadline = 0.0
            if size > self._field_limit or len(msgs) > queued + 1:
                # Rare: a big head (only then can a header be over its limit), or pipelined requests.
                self._check_heads(queued)
            msg, payload = msgs[-1]
            if isinstance(msg, _ErrInfo):
                self._rejected = True
                self._body = None
                return
            version = msg.version
            if version is not HttpVersion11 and version is not HttpVersion10:
                msgs[-1] = _ErrInfo(status=505, exc=_BadVersion(), message=""), EMPTY_PAYLOAD
                self._rejected = True
                self._body = None
            elif payload.is_eof():
                self._body = None
            else:
                self._body = payload
                self._body_deadline = self._loop.time() + self._limits.body_timeout
                self._arm(self._body_deadline)
        elif in_head and data:
            # (Not for an empty read: aiohttp's StreamReader resumes reading after each read of a body, which
            # feeds the protocol b"". No byte of a next head came: a header timeout started then fired while the
            # answer was still being made, and queued a 408 for the connection's next request.)
            size = self._head_bytes + len(data)
            if size > self._limits.max_header_bytes:
                self._reject(431, _HeadTooLarge())
                return
            self._head_bytes = size
            if not self._head_deadline:
                self._head_deadline = self._loop.time() + self._limits.header_timeout
                self._arm(self._head_deadline)

    def _check_heads(self, start: int) -> None:
        """Exact sizes of the heads parsed in this read; the first one over a limit becomes a 431."""
        limits = self._limits
        msgs = self._messages
        for i in range(start, len(msgs)):
            msg = msgs[i][0]
            if not isinstance(msg, RawRequestMessage):
                continue
            total = len(msg.method) + len(msg.path) + 12
            over = total > limits.max_header_bytes
            for name, value in msg.raw_headers:
                size = len(name) + len(value)
                total += size + 4
                if name.lower() == b"authorization":
                    over = over or len(value) > limits.max_authorization_bytes
                else:
                    over = over or size > limits.max_header_field_bytes
            refusal: _ErrInfo | None = None
            if over or total > limits.max_header_bytes:
                refusal = _ErrInfo(status=431, exc=_HeadTooLarge(), message="")
            elif msg.version is not HttpVersion11 and msg.version is not HttpVersion10:
                refusal = _ErrInfo(status=505, exc=_BadVersion(), message="")
            if refusal is not None:
                while len(msgs) > i:
                    msgs.pop()
                msgs.append((refusal, EMPTY_PAYLOAD))
                return

    def _reject(self, status: int, exc: BaseException) -> None:
        """Queue a refusal behind whatever this connection is already answering, and read no further."""
        self._rejected = True
        self._body = None
        self._messages.append((_ErrInfo(status=status, exc=exc, message=""), EMPTY_PAYLOAD))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ---- timeouts ----------------------------------------------------------------------------------

    def _arm(self, deadline: float) -> None:
        # One handle per connection: kept when it fires no later than the new deadline (the callback then
        # re-arms itself for what is still pending), so a request costs at most one call_at.
        if self._watchdog is not None:
            if self._watch_at <= deadline:
                return
            self._watchdog.cancel()
        self._watch_at = deadline
        self._watchdog = self._loop.call_at(deadline, self._on_watchdog)

    def _on_watchdog(self) -> None:
        self._watchdog = None
        if self.transport is None or self._rejected:
            return
        now = self._loop.time()
        if self._head_deadline:
            if now >= self._head_deadline:
                self._head_deadline = 0.0
                if self._head_bytes or self._messages or self._request_in_progress:
                    self._reject(408, _HeaderTimeout())
                else:  # nothing was ever sent: close quietly, as for an idle kept-alive connection
                    self.force_close()
                return
            self._arm(self._head_deadline)
        body = self._body
        if body is not None and not body.is_eof():
            if now >= self._body_deadline:
                self._rejected = True
                self._body = None
                # The handler reading the body gets it (and answers 408); aiohttp then closes.
                body.set_exception(BodyTimeout())
                return
            self._arm(self._body_deadline)

    # ---- answers -----------------------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        from ..core.gateway import new_request_id

        rid = new_request_id()
        if status >= 500 and status != 505:
            # Not a parser rejection: an error escaped the app (the middleware answers everything else).
            self.log_exception("unhandled error outside the middleware", extra={"request_id": rid},
                               exc_info=exc)
            if request.writer.output_size > 0:
                raise ConnectionError("response already started")
            err = ProxyError(f"Internal server error (request id {rid})", status=status)
        else:
            err = _protocol_error(status, exc, self._limits)
            peer = request.remote
            _rejections.warning(
                "request refused by the HTTP layer",
                request_id=rid, status=err.status, code=err.code, error=type(exc).__name__, peer=peer,
            )
        resp = error_response(err, rid)
        resp.force_close()
        # aiohttp answers parser errors on a placeholder HTTP/1.0 request; the status line is HTTP/1.1.
        request._version = HttpVersion11
        return resp

