"""Identity from headers set by an authenticating proxy in front, trusted by shared secret or peer network."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..config import TrustedHeaderSettings
from ..errors import Unauthorized
from ..types import Principal
from .headers import header_values

log = logging.getLogger("llm_proxy.auth")

_MAX_VALUE = 1024
_MAX_ITEMS = 1000
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _rejected(message: str) -> Unauthorized:
    """401 without `WWW-Authenticate: Bearer`: the client has no bearer token to offer here; its identity comes
    from the authenticating gateway in front, which owns the login challenge."""
    return Unauthorized(message, challenge=None)


def _peer_address(peer: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not peer:
        return None
    try:
        addr = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


class TrustedHeaderAuthenticator:
    """Reads the identity headers only when the request provably came through the trusted proxy."""

    def __init__(
        self, settings: TrustedHeaderSettings, *, admin_check: Callable[[Principal], bool] | None = None
    ) -> None:
        self._s = settings
        self._admin_check = admin_check
        self._secret = settings.secret.encode("utf-8") if settings.secret else None
        self._networks: list[Network] = []
        for cidr in settings.trusted_networks:
            try:
                self._networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
            except ValueError:
                raise ValueError(f"auth.trusted_header.trusted_networks: '{cidr}' is not a CIDR network") from None
        if self._secret is None and not self._networks:
            raise ValueError("auth.trusted_header: set a shared secret or trusted_networks (or both)")

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "mode": "trusted_header",
            "secret": self._secret is not None,
            "trusted_networks": [str(n) for n in self._networks],
        }

    def _trusted(self, headers: Mapping[str, str], peer: str | None) -> bool:
        presented = header_values(headers, self._s.secret_header)
        if presented:
            # A secret that is presented must be right, even from a trusted network.
            return (
                self._secret is not None
                and len(presented) == 1
                and hmac.compare_digest(presented[0].strip().encode("utf-8", "surrogatepass"), self._secret)
            )
        addr = _peer_address(peer)
        return addr is not None and any(addr in net for net in self._networks if net.version == addr.version)

    def _single(self, headers: Mapping[str, str], name: str | None) -> str | None:
        if not name:
            return None
        values = [v.strip() for v in header_values(headers, name) if v.strip()]
        if len(values) > 1:
            raise _rejected(f"Ambiguous identity: header '{name}' is repeated")
        if values and len(values[0]) > _MAX_VALUE:
            raise _rejected(f"Identity header '{name}' is too long")
        return values[0] if values else None

    def _list(self, headers: Mapping[str, str], name: str | None) -> tuple[str, ...]:
        if not name:
            return ()
        items = (i.strip() for v in header_values(headers, name) for i in v.split(","))
        return tuple(dict.fromkeys(i for i in items if i and len(i) <= _MAX_VALUE))[:_MAX_ITEMS]

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        if not self._trusted(headers, peer):
            log.info("trusted-header request rejected: no valid shared secret and peer not in trusted_networks",
                     extra={"peer": peer})
            raise _rejected(
                "Request did not come through the trusted authenticating proxy "
                "(shared secret missing or wrong, and the peer is not in a trusted network)"
            )
        subject = self._single(headers, self._s.subject_header)
        if subject is None:
            raise _rejected(f"Missing identity header '{self._s.subject_header}'")
        principal = Principal(
            subject=subject,
            username=self._single(headers, self._s.username_header),
            email=self._single(headers, self._s.email_header),
            groups=self._list(headers, self._s.groups_header),
            roles=self._list(headers, self._s.roles_header),
            auth_method="trusted_header",
        )
        if self._admin_check is not None and self._admin_check(principal):
            principal = dataclasses.replace(principal, is_admin=True)
        return principal
