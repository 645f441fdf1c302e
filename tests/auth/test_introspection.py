"""auth.mode introspection: RFC 7662 against the real OpenID provider (opaque tokens, its introspection and
revocation endpoints), userinfo-style and llama-stack `custom` endpoints against small fakes, mixed with oidc."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web

from llm_proxy.auth.chain import ChainAuthenticator
from llm_proxy.config import load_config_text
from llm_proxy.core.usage_memory import MemoryUsageSink

from ..conftest import Emulator
from ..conftest_oidc import INTROSPECTOR, OPAQUE_RESOURCE
from ..helpers import LoopThread, ProxyServer, native_config
from .conftest import AUDIENCE, POLICY, OpenIDProvider
from .util import CHAT, bearer, proxy_config, seconds_until_status
from .util import run_yaml as util_run_yaml


def introspection_config(emulator_url: str, op: OpenIDProvider, *, secret: str = f"{INTROSPECTOR}-secret",
                         modes: str = "introspection", extra: str = "") -> str:
    auth = f"""auth:
  mode: {modes}
  introspection:
    kind: rfc7662
    url: {op.introspection_endpoint}
    client_id: {INTROSPECTOR}
    client_secret: {secret}
    cache_ttl: 1
    negative_cache_ttl: 0
  oidc:
    issuers: [{{issuer: {op.issuer}, audiences: [{AUDIENCE}]}}]
{extra}{POLICY}"""
    return proxy_config(emulator_url, auth)


@pytest.fixture(scope="module")
def intro_proxy(emulator: Emulator, oidc_provider: OpenIDProvider) -> Iterator[ProxyServer]:
    loaded = native_config(introspection_config(emulator.base_url, oidc_provider))
    with ProxyServer(loaded, usage=MemoryUsageSink()) as px:
        yield px


def opaque(op: OpenIDProvider, user: str | None = None) -> str:
    token = op.token(user=user, resource=OPAQUE_RESOURCE, scope="openid models:read" if user else None)
    assert token.count(".") == 0  # not a JWT
    return token


def test_opaque_user_token_is_introspected_and_attributed(
    intro_proxy: ProxyServer, oidc_provider: OpenIDProvider
) -> None:
    r = bearer(intro_proxy, opaque(oidc_provider, "alice"))
    assert r.status == 200, r.body
    sink = intro_proxy.services.usage
    assert isinstance(sink, MemoryUsageSink)
    row = sink.events[-1]
    assert (row.subject, row.username) == ("f3b1c1a0-0000-4000-8000-00000000a11c", "alice")


def test_roles_from_the_introspection_answer_drive_the_policy(
    intro_proxy: ProxyServer, oidc_provider: OpenIDProvider
) -> None:
    assert bearer(intro_proxy, opaque(oidc_provider, "bob")).status == 403  # realm role guest only


def test_client_credentials_token_is_its_client(intro_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    assert bearer(intro_proxy, opaque(oidc_provider)).status == 200
    sink = intro_proxy.services.usage
    assert isinstance(sink, MemoryUsageSink)
    assert (sink.events[-1].subject, sink.events[-1].username) == ("llm-cli", "service-account-llm-cli")


def test_inactive_token_is_401_with_a_challenge(intro_proxy: ProxyServer) -> None:
    r = bearer(intro_proxy, "Zm9vYmFyYmF6cXV4cXV1eGNvcmdlZ3JhdWx0Z2FycGx5")
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert "not active" in r.error["message"]


def test_revoked_token_is_rejected_once_its_cache_entry_ends(
    intro_proxy: ProxyServer, oidc_provider: OpenIDProvider
) -> None:
    token = opaque(oidc_provider, "alice")
    assert bearer(intro_proxy, token).status == 200
    oidc_provider.revoke(token)
    seconds_until_status(intro_proxy.port, token, 401)


def test_jwts_go_to_oidc_and_opaque_tokens_to_introspection(
    emulator: Emulator, oidc_provider: OpenIDProvider
) -> None:
    loaded = native_config(introspection_config(emulator.base_url, oidc_provider, modes="[oidc, introspection]"))
    with ProxyServer(loaded) as px:
        chain = px.services.authenticator
        assert isinstance(chain, ChainAuthenticator)
        intro = dict(chain._members)["introspection"]
        assert bearer(px, oidc_provider.token(user="alice")).status == 200  # a JWT of the trusted issuer
        assert intro.cache.calls == 0  # type: ignore[attr-defined]
        assert bearer(px, opaque(oidc_provider, "alice")).status == 200
        assert intro.cache.calls == 1  # type: ignore[attr-defined]
        tampered = oidc_provider.token(user="alice")[:-4] + "AAAA"
        assert bearer(px, tampered).status == 401  # oidc's verdict is final: not handed on
        assert intro.cache.calls == 1  # type: ignore[attr-defined]


def test_refused_client_credentials_are_503_and_the_secret_is_never_shown(
    emulator: Emulator, oidc_provider: OpenIDProvider, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-5f2b9c"
    loaded = native_config(introspection_config(emulator.base_url, oidc_provider, secret=wrong))
    token = opaque(oidc_provider, "alice")
    with ProxyServer(loaded) as px:
        r = bearer(px, token)
        assert r.status == 503, r.body
        assert r.error["code"] == "auth_unavailable"
        health = px.services.authenticator.health()
    assert "client_id/client_secret" in str(health["error"])
    for secret in (wrong, token):
        assert secret not in caplog.text and secret not in r.body.decode() and secret not in str(health)
    assert wrong not in repr(loaded.settings.auth.introspection)


# ---- userinfo-style and llama-stack `custom` endpoints ---------------------------------------------


class FakeEndpoints:
    """GET /userinfo with a bearer, POST /validate with llama-stack's {"api_key": ...}; one good token."""

    GOOD = "good-opaque-token-0123456789"

    def __init__(self) -> None:
        self.lt = LoopThread("fake-validate")
        self.seen: list[dict[str, Any]] = []

        async def userinfo(request: web.Request) -> web.StreamResponse:
            if request.headers.get("Authorization") != f"Bearer {self.GOOD}":
                return web.json_response({"error": "invalid_token"}, status=401)
            return web.json_response({"sub": "u-77", "preferred_username": "uma", "groups": ["/llm-users"]})

        async def validate(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.append(body)
            if body.get("api_key") != self.GOOD:
                return web.json_response({"message": "no"}, status=401)
            return web.json_response({"principal": "svc-9", "attributes": {"roles": ["llm-user"]}})

        async def start() -> web.AppRunner:
            app = web.Application()
            app.router.add_get("/userinfo", userinfo)
            app.router.add_post("/validate", validate)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            return runner

        self.runner = self.lt.run(start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def close(self) -> None:
        self.lt.run(self.runner.cleanup())
        self.lt.stop()


@pytest.fixture(scope="module")
def endpoints() -> Iterator[FakeEndpoints]:
    e = FakeEndpoints()
    yield e
    e.close()


def test_userinfo_kind(emulator: Emulator, endpoints: FakeEndpoints) -> None:
    auth = f"auth:\n  mode: introspection\n  introspection: {{kind: userinfo, url: '{endpoints.url}/userinfo'}}"
    sink = MemoryUsageSink()
    with ProxyServer(native_config(proxy_config(emulator.base_url, auth)), usage=sink) as px:
        assert bearer(px, endpoints.GOOD).status == 200
        assert (sink.events[-1].subject, sink.events[-1].username) == ("u-77", "uma")
        assert bearer(px, "some-other-token").status == 401


def test_llama_stack_custom_auth_maps_onto_introspection(emulator: Emulator, endpoints: FakeEndpoints) -> None:
    auth = f"  auth:\n    provider_config:\n      type: custom\n      endpoint: {endpoints.url}/validate"
    run_yaml = util_run_yaml(emulator.base_url, auth)
    loaded = load_config_text(run_yaml, env={}, path="run.yaml")
    assert loaded.settings.auth.modes == ("introspection",)
    assert loaded.settings.auth.introspection.kind == "custom"
    sink = MemoryUsageSink()
    with ProxyServer(loaded, usage=sink) as px:
        ok = bearer(px, endpoints.GOOD, body={**CHAT, "model": "proxied-model"})
        assert ok.status == 200, ok.body
        assert sink.events[-1].subject == "svc-9"
        assert bearer(px, "nope").status == 401
    assert endpoints.seen[0]["api_key"] == endpoints.GOOD and "request" in endpoints.seen[0]
