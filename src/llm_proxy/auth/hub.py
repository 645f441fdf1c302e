"""Konveyor's Hub in front (tackle2-hub): its JWTs verified locally, any other bearer resolved by GET /auth/self.

The Hub authenticates the IDE's bearer, strips `/services/llm-proxy` and forwards the request with the same
Authorization header and no identity header. The bearer is a Hub personal access token (opaque) or a JWT the Hub
issued (`iss` = <scheme>://<host>/oidc); the Hub answers `GET /auth/self` with {login, subject, scopes} for
any bearer it accepts and 401 otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import HubSettings, OIDCIssuerSettings, OIDCSettings
from ..errors import Unauthorized
from ..types import Principal
from .claims import _dedupe, _strings
from .oidc import OIDCAuthenticator
from .remote import RemoteTokenChecker
from .token_cache import Checked

_MAX_LEN = 1024


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and len(value) <= _MAX_LEN else None


class HubAuthenticator(RemoteTokenChecker):
    mode = "hub"

    def __init__(
        self,
        settings: HubSettings,
        *,
        cache_size: int = 10000,
        cache_seconds: float = 300.0,
        admin_check: Callable[[Principal], bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(settings, admin_check=admin_check, clock=clock)
        assert settings.url
        self.base = settings.url.rstrip("/")
        self._self_url = self.base + "/auth/self"
        issuer = OIDCIssuerSettings(
            issuer=self.base + "/oidc",
            audiences=list(settings.audiences),
            algorithms=list(settings.algorithms),
            leeway_seconds=settings.leeway_seconds,
        )
        oidc = OIDCSettings(
            issuers=[issuer], verify_tls=settings.verify_tls, tls_cafile=settings.tls_cafile,
            key_recheck_period=3600.0, min_refresh_interval=10.0,
        )
        kw: dict[str, Any] = {} if clock is None else {"clock": clock}
        self.jwt = OIDCAuthenticator(
            oidc, cache_size=cache_size, cache_seconds=cache_seconds, admin_check=admin_check,
            auth_method="hub", audience_optional=True, issuer_aliases=settings.issuers, **kw,
        )

    async def start(self) -> None:
        await super().start()
        await self.jwt.start()

    async def close(self) -> None:
        await self.jwt.close()
        await super().close()

    async def authenticate_token(self, token: str) -> Principal:
        principal = await self.jwt.authenticate_if_mine(token)  # a Hub JWT: every strict check, locally
        if principal is not None:
            return principal
        return await super().authenticate_token(token)

    async def _check(self, token: str) -> Checked[Principal]:
        status, body = await self._call(
            "the Hub", "GET", self._self_url, headers={"Authorization": f"Bearer {token}"}
        )
        if status in (401, 403):
            raise Unauthorized("Invalid bearer token: the Hub does not accept it")
        if status != 200 or not isinstance(body, dict):
            raise Unauthorized(f"Invalid bearer token: the Hub answered HTTP {status} without an identity")
        subject = _text(body.get("subject")) or _text(body.get("login"))
        if subject is None:
            raise Unauthorized("Invalid bearer token: the Hub named no subject for it")
        principal = Principal(
            subject=subject,
            username=_text(body.get("login")),
            email=_text(body.get("email")),
            scopes=_dedupe(_strings(body.get("scopes"))),
            issuer=self.base,
            auth_method="hub",
        )
        return self._finish(principal), None

    def health(self) -> dict[str, Any]:
        out = super().health()
        jwt = self.jwt.health()
        out["url"] = self.base
        out["jwt_keys"] = next(iter(jwt["issuers"].values()), {})
        out["refresh_failures"] = out.get("refresh_failures", 0) + jwt.get("refresh_failures", 0)
        return out
