"""A client that drops a non-streamed request: the upstream call is cancelled at once and the row says 499."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink

from .helpers import ProxyServer, native_config


class SilentUpstream:
    """Accepts one request and never answers; records when the proxy closes the connection."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.received = threading.Event()
        self.closed = threading.Event()
        self.closed_at = 0.0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += conn.recv(65536)
            self.received.set()
            while conn.recv(65536):
                pass
            self.closed_at = time.monotonic()
            self.closed.set()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def silent() -> Iterator[SilentUpstream]:
    up = SilentUpstream()
    yield up
    up.close()


def test_client_dropping_a_non_streamed_request_cancels_the_upstream_call(silent: SilentUpstream) -> None:
    sink = MemoryUsageSink()
    cfg = native_config(f"""
providers: [{{id: openai, type: openai, base_url: "http://127.0.0.1:{silent.port}/v1", api_key: sk-up}}]
models: [{{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}]
auth: {{mode: none, allow_unauthenticated: true}}
""")
    with ProxyServer(cfg, usage=sink) as px:
        client = socket.create_connection(("127.0.0.1", px.port))
        body = b'{"model":"openai/gpt-4o","messages":[{"role":"user","content":"never mind"}]}'
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n%s" % (len(body), body))
        assert silent.received.wait(10)
        left = time.monotonic()
        client.close()
        assert silent.closed.wait(5), "the proxy kept waiting on the upstream after its client left"
        assert silent.closed_at - left < 0.1
    (event,) = [e for e in sink.events if e.endpoint == "chat.completions"]
    assert (event.status, event.error_type) == (499, "client_disconnected")
