"""Incremental decoder for the AWS event-stream binary framing (application/vnd.amazon.eventstream)."""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass
from typing import Any

# Message layout (all integers big-endian):
#   total length (4) | headers length (4) | prelude CRC32 (4) | headers | payload | message CRC32 (4)
# The prelude CRC covers the first 8 bytes; the message CRC covers everything before it.
PRELUDE_LEN = 12
MIN_MESSAGE_LEN = PRELUDE_LEN + 4
MAX_MESSAGE_LEN = 24 * 1024 * 1024  # the service caps payloads at 16 MiB and headers at 128 KiB
MAX_HEADERS_LEN = 128 * 1024


class EventStreamError(Exception):
    """The byte stream is not valid event-stream framing (bad CRC, bad lengths, bad header)."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    headers: dict[str, Any]
    payload: bytes


def _parse_headers(data: bytes) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    pos, end = 0, len(data)
    try:
        while pos < end:
            name_len = data[pos]
            pos += 1
            name = data[pos : pos + name_len].decode("utf-8")
            pos += name_len
            vtype = data[pos]
            pos += 1
            value: Any
            if vtype == 0:
                value = True
            elif vtype == 1:
                value = False
            elif vtype == 2:
                (value,) = struct.unpack_from(">b", data, pos)
                pos += 1
            elif vtype == 3:
                (value,) = struct.unpack_from(">h", data, pos)
                pos += 2
            elif vtype == 4:
                (value,) = struct.unpack_from(">i", data, pos)
                pos += 4
            elif vtype in (5, 8):  # int64, timestamp (ms since epoch)
                (value,) = struct.unpack_from(">q", data, pos)
                pos += 8
            elif vtype in (6, 7):  # bytes, string
                (length,) = struct.unpack_from(">H", data, pos)
                pos += 2
                raw = data[pos : pos + length]
                if len(raw) != length:
                    raise EventStreamError("truncated header value")
                value = raw.decode("utf-8") if vtype == 7 else bytes(raw)
                pos += length
            elif vtype == 9:
                raw = data[pos : pos + 16]
                if len(raw) != 16:
                    raise EventStreamError("truncated uuid header")
                value = uuid.UUID(bytes=bytes(raw))
                pos += 16
            else:
                raise EventStreamError(f"unknown header value type {vtype}")
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise EventStreamError(f"malformed headers: {exc}") from None
    if pos != end:
        raise EventStreamError("malformed headers: length mismatch")
    return headers


class EventStreamDecoder:
    """Feed raw bytes in any split; get back whole, CRC-checked messages."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[EventMessage]:
        self._buf += data
        out: list[EventMessage] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= PRELUDE_LEN:
            total, hlen, prelude_crc = struct.unpack_from(">III", buf, pos)
            if zlib.crc32(buf[pos : pos + 8]) != prelude_crc:
                raise EventStreamError("prelude CRC mismatch")
            max_headers = min(MAX_HEADERS_LEN, total - MIN_MESSAGE_LEN)
            if total < MIN_MESSAGE_LEN or total > MAX_MESSAGE_LEN or hlen > max_headers:
                raise EventStreamError(f"invalid message lengths (total {total}, headers {hlen})")
            if len(buf) - pos < total:
                break
            end = pos + total
            (msg_crc,) = struct.unpack_from(">I", buf, end - 4)
            if zlib.crc32(buf[pos : end - 4]) != msg_crc:
                raise EventStreamError("message CRC mismatch")
            hstart = pos + PRELUDE_LEN
            headers = _parse_headers(bytes(buf[hstart : hstart + hlen]))
            out.append(EventMessage(headers, bytes(buf[hstart + hlen : end - 4])))
            pos = end
        if pos:
            del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete message still buffered."""
        return len(self._buf)
