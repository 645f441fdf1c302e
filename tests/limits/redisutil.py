"""A private redis-server per test module, on a free port, that a test can kill and start again."""

from __future__ import annotations

import shutil
import subprocess
import time

import redis

from ..store.dbutil import free_port


class RedisServer:
    """`redis-server` on 127.0.0.1:<port>, no persistence; stop() kills it, start() brings it back (empty) on the
    same port."""

    def __init__(self, port: int | None = None, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.password = password
        self.url = f"redis://{f':{password}@' if password else ''}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = self.client(socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.proc.poll() is not None:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.02)  # polling for the server to listen (with a deadline)
        finally:
            client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def client(self, **kw: float) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, **kw)
