"""Host header checks (DNS rebinding in auth mode none) and whether a request comes from this machine."""

from __future__ import annotations

import ipaddress

from aiohttp import hdrs, web

ANY = "*"


def host_name(value: str) -> str:
    """The name in a Host header value, without port, brackets or a trailing dot, in lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def is_loopback_name(name: str) -> bool:
    return name == "localhost" or name.endswith(".localhost") or _is_loopback_address(name)


def allowed_hosts_for(configured: list[str] | None, auth_mode: object, non_loopback_unauthenticated: bool
                      ) -> frozenset[str] | None:
    """None: any Host. Otherwise the names (".domain" for a domain and its subdomains) besides loopback."""
    if configured is not None:
        names = frozenset(n.strip().lower().rstrip(".") for n in configured)
        return None if ANY in names else names
    if auth_mode == "none" and not non_loopback_unauthenticated:
        return frozenset()
    return None


def host_allowed(value: str | None, allowed: frozenset[str]) -> bool:
    if not value:
        return False
    name = host_name(value)
    if name in allowed or is_loopback_name(name):
        return True
    return any(a.startswith(".") and (name.endswith(a) or name == a[1:]) for a in allowed)


class HostCheck:
    """host_allowed() for one server's names, remembering the few Host values its clients send."""

    __slots__ = ("_allowed", "_seen")

    _MAX_SEEN = 256

    def __init__(self, allowed: frozenset[str]) -> None:
        self._allowed = allowed
        self._seen: dict[str | None, bool] = {}

    def __call__(self, value: str | None) -> bool:
        ok = self._seen.get(value)
        if ok is None:
            ok = host_allowed(value, self._allowed)
            if len(self._seen) >= self._MAX_SEEN:  # many distinct names: someone probing; start over
                self._seen.clear()
            self._seen[value] = ok
        return ok


def is_local_request(request: web.Request) -> bool:
    """From a loopback address, to a loopback Host name.

    The Host check keeps out a page in a local browser that rebinds its own name to 127.0.0.1; a sidecar
    proxy in front (connecting from loopback) sends the service's name, not a loopback one."""
    value = request.headers.get(hdrs.HOST)
    if not value or not _is_loopback_address(request.remote or ""):
        return False
    return is_loopback_name(host_name(value))


def _is_loopback_address(text: str) -> bool:
    try:
        addr = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped.is_loopback
    return addr.is_loopback
