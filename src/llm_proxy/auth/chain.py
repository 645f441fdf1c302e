"""Several bearer modes in order (`auth.mode: [api_keys, oidc, hub]`): the first that owns a token judges it.

Owning is decided without any network call: api_keys owns tokens with its prefix, oidc owns JWTs whose `iss`
is one of its trusted issuers (a token in its cache is one), hub and introspection own everything (a remote
service can judge any bearer, so they belong last). The owner's verdict is final: a JWT of a trusted issuer
whose signature fails is 401, never handed on to the next mode. Per request this costs one await per mode
asked (~1.3 us over a single mode for a cached JWT).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from ..errors import Unauthorized
from ..types import Principal
from .oidc import bearer_token


class BearerAuthenticator(Protocol):
    mode: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def authenticate_if_mine(self, token: str) -> Principal | None:
        """The principal; None when the token is not this mode's to judge; raises when it is and fails."""
        ...

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal: ...

    async def authenticate_token(self, token: str) -> Principal: ...

    def health(self) -> dict[str, Any]: ...


class ChainAuthenticator:
    def __init__(self, members: Sequence[tuple[str, BearerAuthenticator]]) -> None:
        self._members = list(members)

    async def start(self) -> None:
        for _, member in self._members:
            await member.start()

    async def close(self) -> None:
        for _, member in reversed(self._members):
            await member.close()

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        token = bearer_token(headers)
        for _, member in self._members:
            principal = await member.authenticate_if_mine(token)
            if principal is not None:
                return principal
        raise Unauthorized("Invalid bearer token: no configured authentication mode accepts this kind of token")

    def health(self) -> dict[str, Any]:
        parts = {name: member.health() for name, member in self._members}
        return {"ok": all(p.get("ok", False) for p in parts.values()), "mode": ",".join(parts), "modes": parts}
