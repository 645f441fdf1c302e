"""Test helpers: run the proxy and the emulator on real loopback ports in background threads."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llm_proxy.app import create_app
from llm_proxy.config import LoadedConfig, load_config_text
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.web.server import serve
from llm_proxy.web.state import SERVICES, Services

T = TypeVar("T")


class LoopThread:
    """An event loop in a daemon thread; run coroutines on it from sync test code."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def _c() -> T:
            return fn()

        return self.run(_c())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class ProxyServer:
    """The proxy app served on 127.0.0.1:<free port> in its own loop thread."""

    def __init__(
        self, loaded: LoadedConfig, *, drain: bool = False, host: str = "127.0.0.1", **app_kwargs: Any
    ) -> None:
        # An in-memory usage sink unless the test passes usage=... (e.g. a UsageLedger): tests that do not
        # look at the ledger must not write ./var/llm-proxy.db and ./var/spool in the working directory.
        app_kwargs.setdefault("usage", MemoryUsageSink())
        if not drain:
            # No load balancer to wait for in tests: stop at once unless the test is about draining.
            loaded.settings.server.drain_delay_seconds = 0
        self.lt = LoopThread("proxy")
        self._stop: asyncio.Event | None = None
        self._done: asyncio.Future[None] | None = None
        ready: asyncio.Future[int] = self.lt.loop.create_future()

        async def _start() -> None:
            self._stop = asyncio.Event()
            app = create_app(loaded, **app_kwargs)
            self.app = app
            self.services: Services = app[SERVICES]

            def on_listening(port: int) -> None:
                ready.set_result(port)

            async def _run() -> None:
                try:
                    await serve(app, host, 0, on_listening=on_listening, stop=self._stop)
                except BaseException as exc:  # surface startup failures to the test
                    if not ready.done():
                        ready.set_exception(exc)
                    raise

            self._task = asyncio.ensure_future(_run())

        self.lt.run(_start())
        self.port = self.lt.run(asyncio.wait_for(asyncio.shield(ready), 15))
        self.host = host
        self.url = f"http://{host}:{self.port}"
        self.base_url = self.url + "/v1"

    def stop(self) -> None:
        async def _shutdown() -> None:
            assert self._stop is not None
            self._stop.set()
            await self._task

        self.lt.run(_shutdown(), timeout=60)
        self.lt.stop()

    def __enter__(self) -> ProxyServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def native_config(text: str, env: dict[str, str] | None = None) -> LoadedConfig:
    return load_config_text(text, env=env or {}, path="<test>")


def tls_material(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "llm-proxy test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, cert_pem, key_pem = tmp / "ca.pem", tmp / "cert.pem", tmp / "key.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return ca_pem, cert_pem, key_pem
