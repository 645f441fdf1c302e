"""auth/token_cache.py on its own (a fake clock): TTL capped by the token's expiry, refresh ahead, outage rules,
negative cache, bounds, and keys that are hashes."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from llm_proxy.auth.token_cache import TokenCache
from llm_proxy.errors import AuthUnavailable, Unauthorized

from .test_keys import FakeClock


class Service:
    """A token checker whose answers the test sets: valid tokens, and whether it is reachable."""

    def __init__(self) -> None:
        self.valid: dict[str, float | None] = {}  # token -> expiry it reports
        self.up = True
        self.calls = 0

    async def check(self, token: str) -> tuple[str, float | None]:
        self.calls += 1
        await asyncio.sleep(0)
        if not self.up:
            raise AuthUnavailable("service away")
        if token not in self.valid:
            raise Unauthorized("not valid")
        return f"principal-{token}", self.valid[token]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_ttl_refresh_ahead_and_revocation() -> None:
    clock, svc = FakeClock(), Service()
    cache: TokenCache[str] = TokenCache(ttl=60, negative_ttl=5, max_size=10, clock=clock)
    svc.valid["t"] = None
    assert await cache.get("t", svc.check) == "principal-t"
    clock.now += 20
    assert await cache.get("t", svc.check) == "principal-t"
    assert svc.calls == 1  # first half of its life: no check
    del svc.valid["t"]  # revoked at the service
    clock.now += 15  # second half: the hit is served and a background check starts
    assert await cache.get("t", svc.check) == "principal-t"
    await settle()
    assert svc.calls == 2
    with pytest.raises(Unauthorized):
        await cache.get("t", svc.check)  # dropped by the background check, remembered as rejected
    assert svc.calls == 2


async def test_outage_keeps_seen_tokens_until_their_ttl_and_unseen_ones_are_unavailable() -> None:
    clock, svc = FakeClock(), Service()
    cache: TokenCache[str] = TokenCache(ttl=60, negative_ttl=5, max_size=10, clock=clock)
    svc.valid.update(seen=None, unseen=None)
    await cache.get("seen", svc.check)
    svc.up = False
    clock.now += 45
    assert await cache.get("seen", svc.check) == "principal-seen"  # background re-check fails: kept
    await settle()
    calls = svc.calls
    for _ in range(50):
        assert await cache.get("seen", svc.check) == "principal-seen"
    await settle()
    assert svc.calls == calls  # not one re-check per request while the service is away
    with pytest.raises(AuthUnavailable):
        await cache.get("unseen", svc.check)
    clock.now += 20  # past the TTL: no longer vouched for
    with pytest.raises(AuthUnavailable):
        await cache.get("seen", svc.check)


async def test_expiry_from_the_service_cuts_the_ttl() -> None:
    clock, svc = FakeClock(), Service()
    cache: TokenCache[str] = TokenCache(ttl=60, negative_ttl=0, max_size=10, clock=clock)
    svc.valid["short"] = clock.now + 10
    await cache.get("short", svc.check)
    clock.now += 11
    svc.up = False
    with pytest.raises(AuthUnavailable):
        await cache.get("short", svc.check)


async def test_single_flight_bounds_and_hashed_keys() -> None:
    clock, svc = FakeClock(), Service()
    cache: TokenCache[str] = TokenCache(ttl=60, negative_ttl=5, max_size=3, clock=clock)
    svc.valid.update({f"t{i}": None for i in range(5)})
    results = await asyncio.gather(*(cache.get("t0", svc.check) for _ in range(20)))
    assert set(results) == {"principal-t0"} and svc.calls == 1
    for i in range(5):
        await cache.get(f"t{i}", svc.check)
    assert len(cache) == 3
    assert set(cache._good) == {hashlib.sha256(f"t{i}".encode()).digest() for i in (2, 3, 4)}
    for i in range(2000):  # made-up tokens fill the (separate, smaller) negative cache, not the valid one
        with pytest.raises(Unauthorized):
            await cache.get(f"bogus-{i}", svc.check)
    assert len(cache) == 3 and len(cache._bad) <= 1000
    before = svc.calls
    clock.now += 1
    with pytest.raises(Unauthorized):
        await cache.get("bogus-1999", svc.check)
    assert svc.calls == before  # remembered
    clock.now += 5
    with pytest.raises(Unauthorized):
        await cache.get("bogus-1999", svc.check)
    assert svc.calls == before + 1
