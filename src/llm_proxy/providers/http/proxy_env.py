"""The HTTPS_PROXY / HTTP_PROXY / NO_PROXY environment, read as curl reads it, for upstream connections."""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

log = logging.getLogger("llm_proxy.upstream")


@dataclass(frozen=True, slots=True)
class HttpProxy:
    host: str
    port: int
    auth: str | None  # the Proxy-Authorization value (Basic, from the proxy URL's user:password)

    def __repr__(self) -> str:  # never the credentials
        return f"HttpProxy({self.host}:{self.port})"


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """HTTPS_PROXY / HTTP_PROXY / NO_PROXY as curl reads them (lower case wins; NO_PROXY takes host names,
    domain suffixes with or without a leading dot, IP addresses, CIDR ranges, and `*`)."""

    https: HttpProxy | None = None
    http: HttpProxy | None = None
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ProxyEnv:
        env = os.environ if env is None else env

        def get(name: str) -> str:
            return (env.get(name.lower()) or env.get(name.upper()) or "").strip()

        def parse(name: str) -> HttpProxy | None:
            raw = get(name)
            if not raw:
                return None
            u = urlsplit(raw if "://" in raw else "http://" + raw)
            try:
                port = u.port or 80
            except ValueError:
                port = -1
            if u.scheme.lower() != "http" or not u.hostname or port < 0:
                # Not fatal (a bad variable must not crash the pod): say so, and connect directly.
                log.warning("ignoring %s: only http://host:port proxies are supported", name.upper())
                return None
            auth = None
            if u.username is not None:
                cred = f"{unquote(u.username)}:{unquote(u.password or '')}".encode()
                auth = "Basic " + base64.b64encode(cred).decode()
            return HttpProxy(u.hostname, port, auth)

        no = tuple(e.strip().lower() for e in get("no_proxy").split(",") if e.strip())
        return cls(parse("https_proxy"), parse("http_proxy"), no)

    def for_url(self, scheme: str, host: str) -> HttpProxy | None:
        proxy = self.https if scheme == "https" else self.http
        if proxy is None or self.bypass(host):
            return None
        return proxy

    def bypass(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        for entry in self.no_proxy:
            if entry == "*":
                return True
            if ip is not None:
                try:
                    if ip in ipaddress.ip_network(entry.strip("[]"), strict=False):
                        return True
                except ValueError:
                    pass
                continue
            name = entry.lstrip(".").rsplit(":", 1)[0] if entry.count(":") == 1 else entry.lstrip(".")
            if host == name or host.endswith("." + name):
                return True
        return False
