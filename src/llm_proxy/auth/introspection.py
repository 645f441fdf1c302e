"""Opaque bearer tokens checked by a service: RFC 7662 introspection, a userinfo-style GET, or llama-stack's
`custom` endpoint. The answer is mapped to a Principal by claim paths (auth.introspection.claims_mapping)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlsplit

from ..config import IntrospectionSettings
from ..errors import AuthUnavailable, Unauthorized
from ..types import Principal
from .claims import ClaimsMapper
from .remote import RemoteTokenChecker, as_bool, expiry
from .token_cache import Checked

# Where each kind's answer keeps the principal's fields unless claims_mapping says otherwise.
_DEFAULT_PATHS: dict[str, dict[str, str]] = {
    # A client-credentials token has no `sub`: the client it was issued to is the caller.
    "rfc7662": {"subject": "sub,client_id", "username": "username,preferred_username"},
    "userinfo": {},
    # llama-stack's AuthResponse: {"principal": ..., "attributes": {"roles": [...], "teams": [...], ...}}
    "custom": {
        "subject": "principal",
        "username": "principal",
        "roles": "attributes.roles",
        "groups": "attributes.teams,attributes.projects,attributes.namespaces",
        "scopes": "attributes.scopes",
    },
}


class IntrospectionAuthenticator(RemoteTokenChecker):
    mode = "introspection"

    def __init__(
        self,
        settings: IntrospectionSettings,
        *,
        admin_check: Callable[[Principal], bool] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(settings, admin_check=admin_check, clock=clock)
        assert settings.url
        self._s = settings
        self._url = settings.url
        parts = urlsplit(settings.url)
        self._issuer = settings.issuer or f"{parts.scheme}://{parts.netloc}"
        self._mapper = ClaimsMapper({**_DEFAULT_PATHS[settings.kind], **settings.claims_mapping})
        self._client_headers: dict[str, str] = {}
        self._client_form: dict[str, str] = {}
        if settings.kind == "rfc7662" and settings.client_id and settings.client_secret:
            if settings.client_auth == "basic":  # RFC 6749 2.3.1: each part form-urlencoded first
                pair = f"{quote(settings.client_id, safe='')}:{quote(settings.client_secret, safe='')}"
                self._client_headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            else:
                self._client_form = {"client_id": settings.client_id, "client_secret": settings.client_secret}

    async def _check(self, token: str) -> Checked[Principal]:
        kind = self._s.kind
        what = "the token introspection endpoint"
        if kind == "rfc7662":
            form = {"token": token, **self._client_form}
            if self._s.token_type_hint:
                form["token_type_hint"] = self._s.token_type_hint
            status, body = await self._call(
                what, "POST", self._url, data=form, headers={**self._client_headers, "Accept": "application/json"}
            )
            if status in (400, 401, 403):
                # The endpoint refused *our* client credentials: an operator's problem, not the caller's token.
                self.last_error = f"HTTP {status} from the introspection endpoint (check client_id/client_secret)"
                raise AuthUnavailable("Authentication is temporarily unavailable: token introspection is refused")
            if status != 200 or not isinstance(body, dict):
                raise AuthUnavailable("Authentication is temporarily unavailable: token introspection failed")
            if not as_bool(body.get("active")):
                raise Unauthorized("Invalid bearer token: the token is not active")
        elif kind == "userinfo":
            status, body = await self._call(what, "GET", self._url, headers={"Authorization": f"Bearer {token}"})
            if status in (401, 403):
                raise Unauthorized("Invalid bearer token: the identity provider does not accept it")
            if status != 200 or not isinstance(body, dict):
                raise Unauthorized(f"Invalid bearer token: the identity provider answered HTTP {status}")
        else:  # custom: llama-stack's contract
            status, body = await self._call(
                what, "POST", self._url, json={"api_key": token, "request": {"path": "", "headers": {}, "params": {}}}
            )
            if status != 200 or not isinstance(body, dict):
                raise Unauthorized(f"Invalid bearer token: the authentication endpoint answered HTTP {status}")
        principal = self._mapper.principal(body, issuer=self._issuer, auth_method="introspection")
        if principal is None:
            raise Unauthorized("Invalid bearer token: the answer names no subject")
        return self._finish(principal), expiry(body)

    def health(self) -> dict[str, Any]:
        return {**super().health(), "kind": self._s.kind}
