"""auth.mode hub: the proxy behind Konveyor's Hub, against a fake Hub with the Hub's routes (tests/auth/fake_hub.py)."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Iterator

import pytest

from llm_proxy.config import load_config_text
from llm_proxy.core.usage_memory import MemoryUsageSink

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .fake_hub import FakeHub
from .util import CHAT, bearer, proxy_config, seconds_until_status
from .util import run_yaml as util_run_yaml


def hub_config(emulator_url: str, hub: FakeHub, extra: str = "", *, modes: str = "hub") -> str:
    auth = f"auth:\n  mode: {modes}\n  hub:\n    url: {hub.url}\n    negative_cache_ttl: 60\n{extra}"
    return proxy_config(emulator_url, auth)


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    h = FakeHub()
    yield h
    h.close()


@pytest.fixture(scope="module")
def hub_proxy(emulator: Emulator, hub: FakeHub) -> Iterator[ProxyServer]:
    policy = """
    issuers: [https://hub.example.com/oidc]
  policy:
    rules:
      - match: {scopes: ["llm:post"]}
        models: ["openai/gpt-4o"]
"""
    with ProxyServer(native_config(hub_config(emulator.base_url, hub, policy)), usage=MemoryUsageSink()) as px:
        yield px


def _events(px: ProxyServer) -> list[object]:
    sink = px.services.usage
    assert isinstance(sink, MemoryUsageSink)
    return list(sink.events)


def test_personal_access_token_is_resolved_by_the_hub_and_attributed(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    token = hub.personal_token("alice", "u-1234")
    before = hub.self_hits
    r = bearer(hub_proxy, token)
    assert r.status == 200, r.body
    assert bearer(hub_proxy, token).status == 200
    assert hub.self_hits == before + 1  # cached by the token's hash
    rows = [e for e in _events(hub_proxy) if getattr(e, "subject", None) == "u-1234"]
    assert rows and all(getattr(e, "username") == "alice" for e in rows)


def test_scopes_from_the_hub_drive_the_policy(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    token = hub.personal_token("bob", scopes=["applications:get"])
    r = bearer(hub_proxy, token)
    assert r.status == 403, r.body
    models = bearer(hub_proxy, hub.personal_token("carol"), method="GET", path="/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["openai/gpt-4o"]


def test_unknown_token_is_401_with_a_bearer_challenge_and_remembered(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    before = hub.self_hits
    for _ in range(3):
        r = bearer(hub_proxy, "0123456789abcdef0123456789abcdef")
        assert r.status == 401
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        assert r.error["type"] == "authentication_error"
    assert hub.self_hits == before + 1  # the negative cache answered the others


def test_hub_jwt_is_verified_locally_without_audience(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    before = hub.self_hits
    r = bearer(hub_proxy, hub.jwt("dave"))
    assert r.status == 200, r.body
    assert hub.self_hits == before  # no /auth/self for the Hub's own JWTs
    assert any(getattr(e, "subject", None) == "sub-dave" and getattr(e, "username") == "dave"
               for e in _events(hub_proxy))


def test_hub_jwt_through_the_external_route_issuer(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    assert bearer(hub_proxy, hub.jwt("erin", issuer="https://hub.example.com/oidc")).status == 200


def test_forged_or_expired_hub_jwt_is_401_and_not_handed_to_auth_self(hub_proxy: ProxyServer, hub: FakeHub) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    before = hub.self_hits
    forged = bearer(hub_proxy, hub.jwt("mallory", key=other))
    assert forged.status == 401 and "signature" in forged.error["message"]
    expired = bearer(hub_proxy, hub.jwt("mallory", exp=int(time.time()) - 3600))
    assert expired.status == 401 and "expired" in expired.error["message"]
    assert hub.self_hits == before


def test_concurrent_requests_with_a_new_token_make_one_hub_call(
    emulator: Emulator, hub: FakeHub
) -> None:
    with ProxyServer(native_config(hub_config(emulator.base_url, hub))) as px:
        token = hub.personal_token("frank")
        hub.self_delay = 0.3
        try:
            before = hub.self_hits
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                statuses = list(pool.map(lambda _i: bearer(px, token).status, range(8)))
        finally:
            hub.self_delay = 0.0
        assert statuses == [200] * 8
        assert hub.self_hits == before + 1


def test_revoked_token_stops_working_within_cache_ttl(emulator: Emulator, hub: FakeHub) -> None:
    with ProxyServer(native_config(hub_config(emulator.base_url, hub, "    cache_ttl: 1"))) as px:
        token = hub.personal_token("gina")
        assert bearer(px, token).status == 200
        hub.revoke(token)
        seconds_until_status(px.port, token, 401)


def test_hub_unreachable_seen_tokens_keep_working_unseen_get_503(emulator: Emulator) -> None:
    hub = FakeHub()
    try:
        with ProxyServer(native_config(hub_config(emulator.base_url, hub))) as px:
            seen = hub.personal_token("hank")
            unseen = hub.personal_token("ivy")
            assert bearer(px, seen).status == 200
            hub.stop()
            assert bearer(px, seen).status == 200
            r = bearer(px, unseen)
            assert r.status == 503, r.body
            assert r.error["code"] == "auth_unavailable"
            assert "WWW-Authenticate" not in r.headers
            hub.start()
            assert bearer(px, unseen).status == 200
    finally:
        hub.close()


def test_tokens_never_reach_logs_errors_or_usage_rows(
    hub_proxy: ProxyServer, hub: FakeHub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    good = hub.personal_token("jack")
    bad = "feedfacefeedfacefeedfacefeedface"
    bodies = [bearer(hub_proxy, t).body for t in (good, bad, hub.jwt("jack", exp=1))]
    text = caplog.text + "".join(b.decode() for b in bodies) + repr(_events(hub_proxy))
    for secret in (good, bad):
        assert secret not in text
    assert "jack" in repr(_events(hub_proxy))


def test_operator_run_yaml_without_auth_switches_to_hub_by_environment(emulator: Emulator, hub: FakeHub) -> None:
    run_yaml = util_run_yaml(emulator.base_url)
    env = {"LLM_PROXY_AUTH_MODE": "hub", "LLM_PROXY_HUB_URL": hub.url, "LLM_PROXY_HUB_CACHE_TTL": "30"}
    loaded = load_config_text(run_yaml, env=env, path="run.yaml")
    assert loaded.settings.auth.modes == ("hub",)
    assert loaded.settings.auth.hub.url == hub.url and loaded.settings.auth.hub.cache_ttl == 30
    assert not loaded.settings.server.allow_non_loopback_unauthenticated
    assert not any("WITHOUT authentication" in w for w in loaded.warnings)
    with ProxyServer(loaded) as px:
        assert bearer(px, "not-a-hub-token").status == 401
        ok = bearer(px, hub.personal_token("kim"), body={**CHAT, "model": "proxied-model"})
        assert ok.status == 200, ok.body
    # without the variables the same file still serves unauthenticated, loudly
    plain = load_config_text(run_yaml, env={}, path="run.yaml")
    assert plain.settings.auth.modes == ("none",)
    assert any("WITHOUT authentication" in w for w in plain.warnings)


def test_hub_mode_needs_a_url() -> None:
    from llm_proxy.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        load_config_text("auth: {mode: hub}\n", env={}, path="c.yaml")
    assert any("auth.hub.url" in p and "LLM_PROXY_HUB_URL" in p for p in err.value.problems)
