"""Auth test fixtures: the real OpenID provider, a forgeable local issuer (tiny aiohttp JWKS server), proxies."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from ..conftest import Emulator
from ..conftest_oidc import AUDIENCE, OpenIDProvider, oidc_provider
from ..helpers import LoopThread, ProxyServer, native_config

__all__ = ["AUDIENCE", "OCT_SECRET", "LocalIdP", "OpenIDProvider", "oidc_provider", "oidc_proxy_config"]

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
OCT_SECRET = b"forged-hmac-secret-0123456789abcdef"
OCT_SECRET_B64 = base64.urlsafe_b64encode(OCT_SECRET).rstrip(b"=").decode()


@dataclass
class Realm:
    """One issuer of the local IdP: its keys, extra raw JWKs, whether its endpoints answer, and hit counts."""

    name: str
    keys: dict[str, tuple[str, PrivateKey]] = field(default_factory=dict)  # kid -> (alg, private key)
    extra_jwks: list[dict[str, Any]] = field(default_factory=list)
    up: bool = True
    jwks_hits: int = 0
    discovery_hits: int = 0

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, (alg, key) in self.keys.items():
            algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
            jwk = algo.to_jwk(key.public_key(), as_dict=True)
            out.append({**jwk, "kid": kid, "alg": alg, "use": "sig"})
        return {"keys": out + self.extra_jwks}


class LocalIdP:
    """A minimal OIDC discovery + JWKS server whose keys the tests hold, to sign tokens with any claims."""

    def __init__(self) -> None:
        self.lt = LoopThread("local-idp")
        self.realms: dict[str, Realm] = {}
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())

        async def discovery(request: web.Request) -> web.StreamResponse:
            realm = self.realms.get(request.match_info["realm"])
            if realm is None or not realm.up:
                raise web.HTTPServiceUnavailable()
            realm.discovery_hits += 1
            return web.json_response({"issuer": self.issuer(realm.name), "jwks_uri": self.jwks_uri(realm.name)})

        async def certs(request: web.Request) -> web.StreamResponse:
            realm = self.realms.get(request.match_info["realm"])
            if realm is None or not realm.up:
                raise web.HTTPServiceUnavailable()
            realm.jwks_hits += 1
            return web.json_response(realm.jwks())

        async def _start() -> web.AppRunner:
            app = web.Application()
            app.router.add_get("/realms/{realm}/.well-known/openid-configuration", discovery)
            app.router.add_get("/realms/{realm}/certs", certs)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return runner

        self.runner = self.lt.run(_start())
        self.port = int(self.runner.addresses[0][1])

    def realm(self, name: str, *, up: bool = True) -> Realm:
        """A realm with one RSA and one EC key (kids `<name>-rsa`, `<name>-ec`)."""
        realm = Realm(name, up=up)
        realm.keys[f"{name}-rsa"] = ("RS256", self.rsa)
        realm.keys[f"{name}-ec"] = ("ES256", self.ec)
        self.realms[name] = realm
        return realm

    def issuer(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/realms/{name}"

    def jwks_uri(self, name: str) -> str:
        return f"{self.issuer(name)}/certs"

    def claims(self, realm: str, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer(realm),
            "aud": AUDIENCE,
            "sub": "local-user-1",
            "preferred_username": "carol",
            "email": "carol@example.com",
            "realm_access": {"roles": ["llm-user"]},
            "groups": ["/llm-users"],
            "scope": "openid models:read",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(
        self,
        realm: str,
        *,
        alg: str = "RS256",
        kid: str | None = "",
        key: Any = None,
        headers: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A token for `realm` signed with its RSA (or EC for ES*) key; `None` as a claim value drops it."""
        if key is None:
            key = self.ec if alg.startswith("ES") else self.rsa
        if kid == "":
            kid = f"{realm}-{'ec' if alg.startswith('ES') else 'rsa'}"
        hdr = {"kid": kid, **(headers or {})} if kid is not None else dict(headers or {})
        return jwt.encode(self.claims(realm, **claims), key, algorithm=alg, headers=hdr)

    def close(self) -> None:
        self.lt.run(self.runner.cleanup())
        self.lt.stop()


@pytest.fixture(scope="session")
def local_idp() -> Iterator[LocalIdP]:
    idp = LocalIdP()
    yield idp
    idp.close()


POLICY = """
  policy:
    rules:
      - match: {roles: [llm-user]}
        models: ["openai/gpt-4o"]
      - match: {roles: [llm-admin]}
        models: ["*"]
        admin: true
"""


def oidc_proxy_config(emulator_url: str, issuers: list[dict[str, Any]], oidc_extra: str = "") -> str:
    """Native config: oidc mode with the given issuers, the role policy above, the emulator as upstream."""
    lines = []
    for iss in issuers:
        lines.append(f"      - issuer: {iss['issuer']}")
        if iss.get("jwks_uri"):
            lines.append(f"        jwks_uri: {iss['jwks_uri']}")
        lines.append(f"        audiences: {iss.get('audiences', [AUDIENCE])}")
        for k in ("algorithms", "accept_azp", "leeway_seconds"):
            if k in iss:
                lines.append(f"        {k}: {iss[k]}")
    issuers_yaml = "\n".join(lines)
    return f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 2}}
providers:
  - id: openai
    type: openai
    base_url: {emulator_url}
    api_key: sk-upstream-secret-0123456789
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}
  - {{id: openai/gpt-4o-mini, provider: openai, upstream_model: gpt-4o-mini}}
auth:
  mode: oidc
  oidc:
    min_refresh_interval: 0
{oidc_extra}
    issuers:
{issuers_yaml}
{POLICY}
"""


@pytest.fixture(scope="session")
def oidc_proxy(
    emulator: Emulator, oidc_provider: OpenIDProvider, local_idp: LocalIdP
) -> Iterator[ProxyServer]:
    """One proxy trusting the real OP (internal URL + external route) and the local issuer's realms
    `forge` (attacks), `cached` (goes down after startup) and `cold` (down from the start)."""
    for name in ("forge", "cached"):
        local_idp.realm(name)
    local_idp.realm("cold", up=False)
    forged = local_idp.realms["forge"]
    forged.extra_jwks.append({"kty": "oct", "kid": "forge-oct", "k": OCT_SECRET_B64, "alg": "HS256"})
    issuers = [
        {"issuer": oidc_provider.issuer},  # discovery through the internal URL
        {"issuer": oidc_provider.issuer_for("localhost"), "jwks_uri": oidc_provider.jwks_uri},  # external route
        {"issuer": local_idp.issuer("forge")},
        {"issuer": local_idp.issuer("cached"), "jwks_uri": local_idp.jwks_uri("cached")},
        {"issuer": local_idp.issuer("cold"), "jwks_uri": local_idp.jwks_uri("cold")},
    ]
    with ProxyServer(native_config(oidc_proxy_config(emulator.base_url, issuers))) as px:
        yield px
