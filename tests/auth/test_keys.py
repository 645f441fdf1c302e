"""The authenticator on its own: JWKS single flight, rate limit, stale window, token cache, TLS, discovery."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from llm_proxy.auth.oidc import OIDCAuthenticator
from llm_proxy.config import OIDCIssuerSettings, OIDCSettings
from llm_proxy.errors import AuthUnavailable, Unauthorized

from ..helpers import LoopThread, tls_material
from .conftest import AUDIENCE, LocalIdP


class FakeClock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def hdr(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def settings(issuer: str, jwks_uri: str | None = None, **kw: Any) -> OIDCSettings:
    iss_kw = {k: kw.pop(k) for k in ("accept_azp", "leeway_seconds", "algorithms") if k in kw}
    iss = OIDCIssuerSettings(issuer=issuer, jwks_uri=jwks_uri, audiences=[AUDIENCE], **iss_kw)
    return OIDCSettings(issuers=[iss], **kw)


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Callable[..., Any]]:
    made: list[OIDCAuthenticator] = []

    async def _make(s: OIDCSettings, **kw: Any) -> OIDCAuthenticator:
        auth = OIDCAuthenticator(s, **kw)
        made.append(auth)
        await auth.start()
        return auth

    yield _make
    for a in made:
        await a.close()


async def test_unknown_kids_share_one_refresh(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    realm = local_idp.realm("single-flight")
    auth = await make(settings(local_idp.issuer("single-flight"), min_refresh_interval=0))
    assert realm.discovery_hits == 1 and realm.jwks_hits == 1
    tokens = [local_idp.sign("single-flight", kid=f"unknown-{i}") for i in range(20)]
    results = await asyncio.gather(*(auth.authenticate(hdr(t), None) for t in tokens), return_exceptions=True)
    assert all(isinstance(r, Unauthorized) and "kid" in r.message for r in results)
    assert realm.jwks_hits == 2  # twenty unknown kids, one JWKS fetch
    assert realm.discovery_hits == 1  # discovery is not repeated once the jwks_uri is known


async def test_refresh_is_rate_limited(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    realm = local_idp.realm("rate-limit")
    clock = FakeClock()
    auth = await make(
        settings(local_idp.issuer("rate-limit"), local_idp.jwks_uri("rate-limit"), min_refresh_interval=60),
        clock=clock,
    )
    assert realm.jwks_hits == 1
    for i in range(5):  # right after the initial fetch: no refresh at all
        with pytest.raises(Unauthorized):
            await auth.authenticate(hdr(local_idp.sign("rate-limit", kid=f"a{i}")), None)
    assert realm.jwks_hits == 1
    clock.now += 61
    for i in range(5):  # one refresh per min_refresh_interval
        with pytest.raises(Unauthorized):
            await auth.authenticate(hdr(local_idp.sign("rate-limit", kid=f"b{i}")), None)
    assert realm.jwks_hits == 2


async def test_stale_window(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    realm = local_idp.realm("stale")
    clock = FakeClock()
    t0 = clock.now
    auth = await make(
        settings(local_idp.issuer("stale"), local_idp.jwks_uri("stale"),
                 key_recheck_period=100, stale_keys_seconds=1000, min_refresh_interval=0),
        clock=clock,
    )

    def token() -> str:  # a new token each time, so the verified-token cache does not answer
        return local_idp.sign("stale", iat=int(t0), exp=int(t0) + 100_000)

    realm.up = False
    for offset in (50, 150, 1099):  # fresh, then stale but inside recheck + stale window
        clock.now = t0 + offset
        assert (await auth.authenticate(hdr(token()), None)).subject == "local-user-1"
    assert auth.health()["ok"] is True

    clock.now = t0 + 1101  # past the window with the IdP still away: 503, never 200 nor 401
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(hdr(token()), None)
    health = auth.health()
    assert health["ok"] is False
    assert health["issuers"][local_idp.issuer("stale")]["error"].startswith("HTTP 503")

    realm.up = True  # back: the next request refreshes and passes
    assert (await auth.authenticate(hdr(token()), None)).username == "carol"
    assert auth.health()["ok"] is True


def count_verifications(auth: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the authenticator's signature verifications (calls[0]), which its token cache should spare."""
    calls = [0]
    verify = auth._verify

    async def counting(token: str, now: float) -> Any:
        calls[0] += 1
        return await verify(token, now)

    monkeypatch.setattr(auth, "_verify", counting)
    return calls


async def test_verified_tokens_are_cached_by_hash_until_exp(
    local_idp: LocalIdP, make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    local_idp.realm("cache")
    clock = FakeClock()
    auth = await make(settings(local_idp.issuer("cache")), clock=clock, cache_size=2)
    calls = count_verifications(auth, monkeypatch)
    exp = int(clock.now) + 60
    token = local_idp.sign("cache", exp=exp)
    first = await auth.authenticate(hdr(token), None)
    assert await auth.authenticate(hdr(token), None) is first
    assert calls[0] == 1  # the second request skipped signature verification
    assert list(auth._cache) == [hashlib.sha256(token.encode()).digest()]  # keyed by hash, never the token

    clock.now = exp + 1  # past exp the cache no longer answers (and the leeway still accepts it)
    await auth.authenticate(hdr(token), None)
    assert calls[0] == 2

    for i in range(3):  # bounded LRU
        await auth.authenticate(hdr(local_idp.sign("cache", jti=str(i), exp=exp + 600)), None)
    assert len(auth._cache) == 2


async def test_a_token_with_an_absurd_exp_is_cached_for_token_cache_seconds_only(
    local_idp: LocalIdP, make: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    local_idp.realm("cache-cap")
    clock = FakeClock()
    auth = await make(settings(local_idp.issuer("cache-cap")), clock=clock, cache_seconds=300)
    calls = count_verifications(auth, monkeypatch)
    token = local_idp.sign("cache-cap", exp=int(clock.now) + 100 * 365 * 86400)
    await auth.authenticate(hdr(token), None)
    clock.now += 299
    await auth.authenticate(hdr(token), None)
    assert calls[0] == 1
    clock.now += 2  # 301 s after the first verification: verified again, not trusted until the year 2126
    await auth.authenticate(hdr(token), None)
    assert calls[0] == 2


async def test_cached_token_dies_with_its_key(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    realm = local_idp.realm("retire")
    auth = await make(settings(local_idp.issuer("retire"), min_refresh_interval=0))
    old = local_idp.sign("retire")
    await auth.authenticate(hdr(old), None)
    # Rotation: the IdP drops its RSA key and publishes a new one; a token under the new kid triggers the refresh.
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    del realm.keys["retire-rsa"]
    realm.keys["retire-rsa-2"] = ("RS256", new_key)
    await auth.authenticate(hdr(local_idp.sign("retire", kid="retire-rsa-2", key=new_key)), None)
    with pytest.raises(Unauthorized, match="kid"):
        await auth.authenticate(hdr(old), None)


async def test_accept_azp_and_leeway(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    local_idp.realm("azp")
    auth = await make(settings(local_idp.issuer("azp"), accept_azp=True, leeway_seconds=0))
    p = await auth.authenticate(hdr(local_idp.sign("azp", aud="account", azp=AUDIENCE)), None)
    assert p.subject == "local-user-1"
    with pytest.raises(Unauthorized, match="expired"):
        await auth.authenticate(hdr(local_idp.sign("azp", exp=int(time.time()) - 2)), None)


async def test_issuer_algorithms_are_pinned(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    local_idp.realm("es-only")
    auth = await make(settings(local_idp.issuer("es-only"), algorithms=["ES256"]))
    assert await auth.authenticate(hdr(local_idp.sign("es-only", alg="ES256")), None)
    with pytest.raises(Unauthorized, match="'RS256' is not allowed for this issuer"):
        await auth.authenticate(hdr(local_idp.sign("es-only")), None)


def test_config_refuses_symmetric_and_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="not supported"):
        OIDCAuthenticator(settings("https://idp.example.com/realms/x", algorithms=["RS256", "HS256"]))
    with pytest.raises(ValueError, match="not supported"):
        OIDCAuthenticator(settings("https://idp.example.com/realms/x", algorithms=["none"]))


async def test_idp_down_at_startup_does_not_fail_start(local_idp: LocalIdP, make: Callable[..., Any]) -> None:
    realm = local_idp.realm("down-at-start", up=False)
    auth = await make(settings(local_idp.issuer("down-at-start"), min_refresh_interval=0))
    health = auth.health()
    assert health["ok"] is False
    entry = health["issuers"][local_idp.issuer("down-at-start")]
    assert entry["keys"] == 0 and entry["last_refresh"] is None
    assert entry["error"].startswith("HTTP 503 from ") and entry["error"].endswith("/openid-configuration")
    with pytest.raises(AuthUnavailable):
        await auth.authenticate(hdr(local_idp.sign("down-at-start")), None)
    realm.up = True
    assert await auth.authenticate(hdr(local_idp.sign("down-at-start")), None)
    assert auth.health()["ok"] is True


# ---- TLS to the IdP --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_jwks(tmp_path_factory: pytest.TempPathFactory, local_idp: LocalIdP) -> Any:
    """An HTTPS JWKS endpoint (certificate from a private CA) serving the local IdP's `tls` realm keys."""
    ca_pem, cert_pem, key_pem = tls_material(tmp_path_factory.mktemp("tls"))
    realm = local_idp.realm("tls")
    lt = LoopThread("tls-jwks")

    async def certs(request: web.Request) -> web.StreamResponse:
        return web.json_response(realm.jwks())

    async def _start() -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/certs", certs)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(cert_pem, key_pem)
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx).start()
        return runner

    runner = lt.run(_start())
    url = f"https://127.0.0.1:{runner.addresses[0][1]}/certs"
    yield url, ca_pem
    lt.run(runner.cleanup())
    lt.stop()


async def test_tls_custom_ca(tls_jwks: Any, local_idp: LocalIdP, make: Callable[..., Any],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    url, ca_pem = tls_jwks
    iss = local_idp.issuer("tls")
    token = local_idp.sign("tls")
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)

    untrusted = await make(settings(iss, url))
    assert "certificate" in untrusted.health()["issuers"][iss]["error"]
    with pytest.raises(AuthUnavailable):
        await untrusted.authenticate(hdr(token), None)

    with_cafile = await make(settings(iss, url, tls_cafile=str(ca_pem)))
    assert (await with_cafile.authenticate(hdr(token), None)).subject == "local-user-1"

    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
    with_env = await make(settings(iss, url))
    assert (await with_env.authenticate(hdr(token), None)).subject == "local-user-1"

    monkeypatch.delenv("SSL_CERT_FILE")
    unverified = await make(settings(iss, url, verify_tls=False))
    assert (await unverified.authenticate(hdr(token), None)).subject == "local-user-1"
