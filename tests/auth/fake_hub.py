"""A fake Konveyor Hub (tackle2-hub) with the routes the proxy uses: OIDC discovery and keys under /oidc, and
GET /auth/self answering {login, subject, scopes} for a known bearer (personal access token or Hub JWT), 401
otherwise. Tokens are added and revoked by the tests; `up = False` makes every route answer 503 and `stop()`
closes the port (unreachable)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ..helpers import LoopThread


class FakeHub:
    def __init__(self) -> None:
        self.lt = LoopThread("fake-hub")
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "hub-" + secrets.token_hex(4)
        self.tokens: dict[str, dict[str, Any]] = {}  # bearer -> /auth/self answer
        self.up = True
        self.self_hits = 0
        self.self_delay = 0.0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.start()

    # ---- server ------------------------------------------------------------------------------------

    def _app(self) -> web.Application:
        async def discovery(request: web.Request) -> web.StreamResponse:
            if not self.up:
                raise web.HTTPServiceUnavailable()
            return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.url}/oidc/jwks"})

        async def keys(request: web.Request) -> web.StreamResponse:
            if not self.up:
                raise web.HTTPServiceUnavailable()
            jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
            return web.json_response({"keys": [{**jwk, "kid": self.kid, "alg": "RS256", "use": "sig"}]})

        async def auth_self(request: web.Request) -> web.StreamResponse:
            self.self_hits += 1
            if self.self_delay:
                await asyncio.sleep(self.self_delay)  # holds the answer so concurrent checks overlap
            if not self.up:
                raise web.HTTPServiceUnavailable()
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            answer = self.tokens.get(token) if scheme == "Bearer" else None
            if answer is None:
                return web.json_response({"error": "Unauthorized"}, status=401)
            return web.json_response(answer)

        app = web.Application()
        app.router.add_get("/oidc/.well-known/openid-configuration", discovery)
        app.router.add_get("/oidc/jwks", keys)
        app.router.add_get("/auth/self", auth_self)
        return app

    def start(self) -> None:
        async def _start() -> web.AppRunner:
            runner = web.AppRunner(self._app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            return runner

        self.runner = self.lt.run(_start())
        self.port = int(self.runner.addresses[0][1])

    def stop(self) -> None:
        """Close the port: the Hub is unreachable (connection refused) until start()."""
        if self.runner is not None:
            self.lt.run(self.runner.cleanup())
            self.runner = None

    def close(self) -> None:
        self.stop()
        self.lt.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.url}/oidc"

    # ---- tokens ------------------------------------------------------------------------------------

    def personal_token(self, login: str, subject: str | None = None, scopes: list[str] | None = None) -> str:
        """A personal access token (32 hex characters, as POST /auth/tokens makes them)."""
        token = secrets.token_hex(16)
        self.tokens[token] = {
            "login": login,
            "subject": subject or f"sub-{login}",
            "scopes": scopes if scopes is not None else ["applications:get", "llm:post"],
            "expiration": None,
        }
        return token

    def jwt(self, login: str = "hubuser", *, issuer: str | None = None, key: Any = None, **claims: Any) -> str:
        """A Hub-issued JWT (RS256, aud = the Hub's client ids, space-separated scope, 300 s)."""
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": ["hub-ui", "hub-cli"],
            "sub": f"sub-{login}",
            "preferred_username": login,
            "scope": "applications:get llm:post",
            "iat": now,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode({k: v for k, v in body.items() if v is not None}, key or self.key, algorithm="RS256",
                          headers={"kid": self.kid})

    def revoke(self, token: str) -> None:
        self.tokens.pop(token, None)
