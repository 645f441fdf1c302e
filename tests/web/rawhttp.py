"""A raw HTTP/1.1 client on sockets, for what no HTTP library sends (bad bytes, trickled heads, odd lines)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field


@dataclass
class Reply:
    raw: bytes
    closed: bool  # the proxy closed the connection after it
    status_line: bytes = b""
    status: int = 0  # 0: nothing came back
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    @classmethod
    def parse(cls, raw: bytes, closed: bool) -> Reply:
        reply = cls(raw=raw, closed=closed)
        while raw.startswith(b"HTTP/1.1 100 "):  # an interim response: note it, parse what follows
            raw = raw.split(b"\r\n\r\n", 1)[1]
        head, sep, body = raw.partition(b"\r\n\r\n")
        if not sep:
            return reply
        lines = head.split(b"\r\n")
        reply.status_line = lines[0]
        reply.status = int(lines[0].split(b" ")[1])
        for line in lines[1:]:
            name, _, value = line.decode("latin-1").partition(":")
            reply.headers[name.strip().lower()] = value.strip()
        reply.body = body
        return reply

    @property
    def complete(self) -> bool:
        length = self.headers.get("content-length")
        return self.status != 0 and length is not None and len(self.body) >= int(length)


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=10)


def read_reply(s: socket.socket, timeout: float = 10, until_complete: bool = False) -> Reply:
    """Read until the proxy closes (or, with until_complete, until one whole response is in)."""
    data = b""
    closed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        data += chunk
        if until_complete and Reply.parse(data, False).complete:
            break
    return Reply.parse(data, closed)


def exchange(port: int, data: bytes, timeout: float = 10, close_after: bool = False, host: str = "127.0.0.1"
             ) -> Reply:
    with connect(port, host) as s:
        try:
            s.sendall(data)
        except OSError:  # refused while we were still sending: read what was answered
            pass
        return read_reply(s, timeout, until_complete=close_after)


def wait_closed(s: socket.socket, timeout: float) -> bytes:
    """Block until the proxy closes the connection; returns whatever it sent meanwhile."""
    reply = read_reply(s, timeout)
    assert reply.closed, "the connection was still open after the timeout"
    return reply.raw
