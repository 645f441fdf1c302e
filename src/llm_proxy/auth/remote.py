"""Tokens judged by a remote service: the shared client and cache, and the answer -> Principal mapping."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp

from ..config import RemoteTokenSettings
from ..errors import AuthUnavailable, Unauthorized
from ..types import Principal
from .jwks import Fetcher, FetchError, describe_error, make_ssl_context
from .oidc import bearer_token
from .token_cache import Checked, TokenCache

log = logging.getLogger("llm_proxy.auth")


class RemoteTokenChecker:
    """Base of hub and introspection: a cached, single-flight `check(token)` against one service."""

    mode = "remote"

    def __init__(
        self,
        settings: RemoteTokenSettings,
        *,
        admin_check: Callable[[Principal], bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._settings = settings
        self._admin_check = admin_check
        self._fetcher = Fetcher(make_ssl_context(settings.verify_tls, settings.tls_cafile))
        kw: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.cache: TokenCache[Principal] = TokenCache(
            ttl=settings.cache_ttl, negative_ttl=settings.negative_cache_ttl, max_size=settings.cache_size, **kw
        )
        self.last_error: str | None = None
        self.failures = 0  # calls that got no usable answer (llm_proxy_auth_refresh_failures_total)

    async def start(self) -> None:
        await self._fetcher.start()

    async def close(self) -> None:
        await self.cache.close()
        await self._fetcher.close()

    async def authenticate_if_mine(self, token: str) -> Principal | None:
        return await self.authenticate_token(token)  # a service can judge any bearer: these modes go last

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        return await self.authenticate_token(bearer_token(headers))

    async def authenticate_token(self, token: str) -> Principal:
        try:
            return await self.cache.get(token, self._check)
        except Unauthorized as exc:
            log.info("bearer token rejected: %s", exc.message, extra={"mode": self.mode})
            raise

    async def _check(self, token: str) -> Checked[Principal]:
        raise NotImplementedError

    async def _call(self, what: str, method: str, url: str, **kw: Any) -> tuple[int, Any]:
        """One call to the service; every failure to get an answer is AuthUnavailable (503), logged without
        the token."""
        try:
            status, body = await self._fetcher.call(method, url, seconds=self._settings.timeout, **kw)
        except (aiohttp.ClientError, TimeoutError, FetchError, OSError) as exc:
            self.last_error = describe_error(exc)
            self.failures += 1
            log.warning("%s cannot be reached: %s", what, self.last_error, extra={"mode": self.mode})
            raise AuthUnavailable(
                f"Authentication is temporarily unavailable: {what} cannot be reached"
            ) from None
        if status >= 500 or status in (404, 429):
            self.last_error = f"HTTP {status} from {url}"
            self.failures += 1
            log.warning("%s answered HTTP %d", what, status, extra={"mode": self.mode})
            raise AuthUnavailable(f"Authentication is temporarily unavailable: {what} answered HTTP {status}")
        self.last_error = None
        return status, body

    def _finish(self, principal: Principal) -> Principal:
        if self._admin_check is not None and self._admin_check(principal):
            return dataclasses.replace(principal, is_admin=True)
        return principal

    def health(self) -> dict[str, Any]:
        # Ready even while the service is away: tokens seen within cache_ttl keep working, and a pod held out of
        # rotation would not bring it back. The error is reported for `llm-proxy status`.
        return {
            "ok": True,
            "mode": self.mode,
            "cached_tokens": len(self.cache),
            "error": self.last_error,
            "refresh_failures": self.failures,
        }


def expiry(body: Mapping[str, Any]) -> float | None:
    exp = body.get("exp")
    if isinstance(exp, int | float) and not isinstance(exp, bool):
        return float(exp)
    return None


def as_bool(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.lower() == "true")

