"""Incremental Server-Sent Events splitting for upstream streams (bytes in, events out)."""

from __future__ import annotations

from ..errors import ProxyError

# The most one SSE event may hold while it is incomplete: an upstream that never ends its event must not grow
# memory without bound (an OpenAI chunk is < 1 KiB; a Gemini event with an inline image a few MiB).
MAX_EVENT_BYTES = 8 * 1024 * 1024


def event_too_large() -> ProxyError:
    return ProxyError(
        f"The upstream sent a stream event larger than {MAX_EVENT_BYTES // (1024 * 1024)} MiB",
        status=502, type="api_error", code="upstream_response_too_large",
    )


class SSESplitter:
    """Splits a byte stream into SSE events; returns each event's joined `data:` payload.

    Handles events split across reads, CRLF line endings, comments and multi-line data.
    `event:` names are returned alongside data for protocols that use them (Anthropic).
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[tuple[bytes | None, bytes]] = []
        start = 0
        while True:
            end = buf.find(b"\n\n", start)
            if end < 0:
                break
            ev = self._parse(buf[start:end])
            if ev is not None:
                events.append(ev)
            start = end + 2
        self._buf = buf[start:]
        if len(self._buf) > MAX_EVENT_BYTES:
            raise event_too_large()
        return events

    @property
    def pending(self) -> bool:
        """True while part of an event is buffered."""
        return bool(self._buf)

    def close(self) -> list[tuple[bytes | None, bytes]]:
        rest, self._buf = self._buf, b""
        if rest.strip():
            ev = self._parse(rest)
            return [ev] if ev is not None else []
        return []

    @staticmethod
    def _parse(block: bytes) -> tuple[bytes | None, bytes] | None:
        name: bytes | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if not line or line.startswith(b":"):
                continue
            field, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if field == b"data":
                data.append(value)
            elif field == b"event":
                name = value
        if not data and name is None:
            return None
        return name, b"\n".join(data)


def frame(payload: bytes) -> bytes:
    """One SSE event carrying a JSON payload."""
    return b"data: " + payload + b"\n\n"


DONE = b"data: [DONE]\n\n"
