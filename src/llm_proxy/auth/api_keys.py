"""Service API keys (`llm-proxy keys create`): recognised by their prefix, looked up in memory by sha256.

The keys live in the ledger database (store/api_keys.py, handed in by app.py as a ports.ApiKeySource). Every
`auth.api_keys.refresh_seconds` (and on PostgreSQL at once on NOTIFY) the whole set is reloaded, so a revocation
reaches every replica within seconds and no request reads the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from ..config import ApiKeySettings
from ..errors import AuthUnavailable, Unauthorized
from ..ports import ApiKeySource
from ..types import API_KEY_PREFIX as KEY_PREFIX
from ..types import ApiKeyRecord, Principal
from .oidc import bearer_token

log = logging.getLogger("llm_proxy.auth")

START_WAIT_SECONDS = 10.0


class ApiKeyAuthenticator:
    mode = "api_keys"

    def __init__(
        self,
        settings: ApiKeySettings,
        store: ApiKeySource,
        *,
        migrate: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._s = settings
        self._store = store
        self._clock = clock
        self._by_hash: dict[bytes, tuple[ApiKeyRecord, Principal]] = {}
        self._loaded_at: float | None = None
        self.error: str | None = None
        self.failures = 0  # failed reloads (llm_proxy_auth_refresh_failures_total)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._schema_ok = not migrate

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await asyncio.wait_for(self._reload(), START_WAIT_SECONDS)
        except (TimeoutError, Exception):
            if self.error is None:
                self.error = "timed out loading the API keys"
            log.warning("API keys not loaded yet; requests with an API key get 503 until they are",
                        extra={"error": self.error})
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        await self._store.close()

    async def _reload(self) -> None:
        try:
            if not self._schema_ok:
                await self._store.migrate()
                self._schema_ok = True
            records = await self._store.load()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"[:300]
            self.failures += 1
            log.warning("cannot load API keys: %s", self.error)
            raise
        fresh = {bytes.fromhex(r.key_hash): (r, self._principal(r)) for r in records}
        self._by_hash = fresh
        self._loaded_at = self._clock()
        self.error = None

    async def _run(self) -> None:
        """Reload every refresh_seconds, and at once when PostgreSQL says a key changed."""
        while True:
            if self._store.pg and not self._store.listening:
                try:
                    await self._store.listen(self._wake.set, self._wake.set)
                    self._wake.set()  # a change may have been missed while not listening
                except Exception as exc:
                    log.info("API keys: LISTEN failed, polling only: %s: %s", type(exc).__name__, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._s.refresh_seconds)
            self._wake.clear()
            with contextlib.suppress(Exception):
                await self._reload()

    # ---- authentication ----------------------------------------------------------------------------

    async def authenticate_if_mine(self, token: str) -> Principal | None:
        return await self.authenticate_token(token) if token.startswith(KEY_PREFIX) else None

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        return await self.authenticate_token(bearer_token(headers))

    async def authenticate_token(self, token: str) -> Principal:
        if not token.startswith(KEY_PREFIX):
            raise Unauthorized("Invalid bearer token: not an API key of this proxy")
        hit = self._by_hash.get(hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest())
        if hit is None:
            if self._loaded_at is None:
                raise AuthUnavailable("Authentication is temporarily unavailable: API keys are not loaded yet")
            raise Unauthorized("Invalid API key: unknown, revoked or expired")
        record, principal = hit
        if not record.usable(self._clock()):
            raise Unauthorized("Invalid API key: unknown, revoked or expired")
        return principal

    @staticmethod
    def _principal(record: ApiKeyRecord) -> Principal:
        return Principal(
            subject=f"apikey:{record.id}",
            username=record.name,
            auth_method="api_key",
            models=record.models,
        )

    def health(self) -> dict[str, Any]:
        return {
            "ok": self._loaded_at is not None,
            "mode": "api_keys",
            "keys": len(self._by_hash),
            "last_refresh": (
                datetime.fromtimestamp(self._loaded_at, UTC).isoformat(timespec="seconds")
                if self._loaded_at is not None else None
            ),
            "listening": self._store.listening,
            "error": self.error,
            "refresh_failures": self.failures,
        }
