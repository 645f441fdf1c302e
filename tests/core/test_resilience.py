"""Deployment choice, retry classification, backoff and the circuit breaker, on a hand-driven clock."""

from __future__ import annotations

import email.utils
import time
from collections import Counter
from typing import Any

import pytest

from llm_proxy.config import CircuitBreakerSettings, RetrySettings, TimeoutSettings
from llm_proxy.core.resilience import (
    ANYWHERE,
    ELSEWHERE,
    NEVER,
    Deployment,
    Pool,
    retry_after_seconds,
    retry_scope,
)
from llm_proxy.core.routing import Router, merge_timeouts
from llm_proxy.errors import (
    BadRequest,
    ProxyError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnreachable,
)

from ..helpers import native_config

PROVIDER: Any = object()  # the pool never calls the provider


def deps(
    n: int, threshold: int = 3, cooldown: float = 10.0, weights: list[float] | None = None
) -> tuple[Deployment, ...]:
    cb = CircuitBreakerSettings(failure_threshold=threshold, cooldown=cooldown)
    return tuple(
        Deployment(i, PROVIDER, f"p{i}", f"m{i}", TimeoutSettings(), (weights or [1.0] * n)[i], cb) for i in range(n)
    )


@pytest.mark.parametrize(
    ("exc", "scope"),
    [
        (UpstreamUnreachable("x"), ANYWHERE),
        (UpstreamTimeout("x"), ANYWHERE),
        (RateLimited("x"), ANYWHERE),
        (UpstreamError("x", status=500), ANYWHERE),
        (UpstreamError("x", status=503), ANYWHERE),
        (UpstreamError("x", status=501), NEVER),
        (UpstreamError("x", status=400), NEVER),
        (UpstreamError("x", status=422), NEVER),
        (UpstreamError("x", status=413), NEVER),
        (BadRequest("x"), NEVER),
        (UpstreamError("x", status=404), ELSEWHERE),
        (UpstreamError("x", status=502, code="upstream_auth_failed"), ELSEWHERE),
        (ProxyError("x", status=502, code="bad_upstream_response"), ELSEWHERE),
    ],
)
def test_retry_scope(exc: ProxyError, scope: int) -> None:
    assert retry_scope(exc) == scope


def test_retry_after_forms() -> None:
    assert retry_after_seconds({}) is None
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    assert retry_after_seconds({"retry-after": "0.5"}) == 0.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "soon"}) is None
    date = email.utils.formatdate(time.time() + 20, usegmt=True)
    got = retry_after_seconds({"retry-after": date})
    assert got is not None and 17 < got <= 20
    assert retry_after_seconds({"retry-after": email.utils.formatdate(time.time() - 60, usegmt=True)}) == 0.0


def test_fallback_order_and_tried_mask() -> None:
    a, b, c = d = deps(3)
    pool = Pool(d, "fallback")
    assert pool.pick(0.0) is a
    assert pool.pick(0.0, tried=0b001) is b
    assert pool.pick(0.0, tried=0b011) is c
    # every deployment tried: the first usable one again (the gateway backs off before it)
    assert pool.pick(0.0, tried=0b111) is a
    # banned (misconfigured for this request) are never chosen again
    assert pool.pick(0.0, tried=0b111, banned=0b001) is b
    assert pool.pick(0.0, tried=0b111, banned=0b111) is None


def test_single_deployment_pool() -> None:
    (a,) = d = deps(1)
    assert Pool(d).single_shot
    assert not Pool(d, retry=RetrySettings()).single_shot
    assert not Pool(deps(2)).single_shot
    assert Pool(deps(2)).max_attempts == 2  # no retry block: each deployment once
    a.failed(0.0)
    a.failed(0.0)
    a.failed(0.0)
    assert Pool(d).pick(1.0) is a  # open, but it is all there is
    assert Pool(d).pick(1.0, banned=1) is None


def test_circuit_opens_after_consecutive_failures_then_half_open_probe() -> None:
    a, b = d = deps(2, threshold=3, cooldown=10.0)
    pool = Pool(d, "fallback")
    a.failed(1.0)
    a.failed(2.0)
    a.succeeded()  # not consecutive: reset
    a.failed(3.0)
    a.failed(4.0)
    assert a.state(4.0) == "closed" and pool.pick(4.0) is a
    a.failed(5.0)
    assert a.state(5.0) == "open"
    assert pool.pick(6.0) is b  # out of rotation during the cool-down
    assert pool.pick(14.9) is b
    assert a.state(15.0) == "half_open"
    assert pool.pick(15.0) is a
    assert a.begin(15.0) is True  # this request is the probe
    assert pool.pick(15.1) is b  # only one probe at a time
    assert b.begin(15.1) is False
    a.failed(16.0)  # probe failed: a full cool-down again
    a.in_flight -= 1
    assert a.state(16.0) == "open" and pool.pick(25.9) is b
    assert pool.pick(26.0) is a and a.begin(26.0)
    a.succeeded()
    assert a.state(26.5) == "closed" and a.failures == 0 and pool.pick(26.5) is a


def test_abandoned_probe_lets_another_request_probe() -> None:
    a, b = d = deps(2, threshold=1, cooldown=5.0)
    pool = Pool(d)
    a.failed(0.0)
    assert pool.pick(5.0) is a and a.begin(5.0)
    assert pool.pick(5.0) is b
    a.abandoned(True)  # the probing client went away: no verdict
    a.in_flight -= 1
    assert pool.pick(5.1) is a


def test_all_cooling_down_tries_least_recently_failed() -> None:
    a, b, c = d = deps(3, threshold=1, cooldown=60.0)
    pool = Pool(d)
    b.failed(1.0)
    a.failed(2.0)
    c.failed(3.0)
    assert pool.pick(4.0) is b
    assert pool.pick(4.0, tried=0b010) is b  # still b: better a likely failure than a certain one
    assert pool.pick(4.0, banned=0b010) is a


def test_retry_after_keeps_deployment_out_until_then() -> None:
    a, b = d = deps(2, threshold=5)
    pool = Pool(d)
    a.failed(0.0, retry_after=2.0)
    assert a.state(0.5) == "closed"
    assert pool.pick(1.0) is b
    assert pool.pick(2.0) is a
    a.failed(3.0, retry_after=10_000)  # capped
    assert a.not_before == pytest.approx(303.0)


def test_weighted_spreads_by_weight() -> None:
    d = deps(2, weights=[3.0, 1.0])
    pool = Pool(d, "weighted")
    counts = Counter(pool.pick(0.0).index for _ in range(8000))  # type: ignore[union-attr]
    assert 0.70 < counts[0] / 8000 < 0.80
    assert pool.pick(0.0, tried=0b01) is d[1]


def test_least_busy_prefers_fewest_in_flight_and_spreads_ties() -> None:
    a, b, c = d = deps(3)
    pool = Pool(d, "least_busy")
    a.in_flight, b.in_flight, c.in_flight = 4, 1, 2
    assert pool.pick(0.0) is b
    a.in_flight = b.in_flight = c.in_flight = 0
    assert {pool.pick(0.0) for _ in range(6)} == {a, b, c}


def test_backoff_is_jittered_exponential_and_capped() -> None:
    pool = Pool(deps(1), retry=RetrySettings(base_delay=0.2, max_delay=1.0))
    for n, ceiling in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)):
        samples = [pool.backoff(n) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)
        assert max(samples) - min(samples) > ceiling / 10  # jittered


def test_merge_timeouts_field_by_field() -> None:
    base = TimeoutSettings(connect=1, first_byte=2, idle=3, total=4)
    model = TimeoutSettings.model_validate({"first_byte": 20})
    dep = TimeoutSettings.model_validate({"total": 40})
    assert merge_timeouts(base, model, dep) == TimeoutSettings(connect=1, first_byte=20, idle=3, total=40)
    assert merge_timeouts(base, None) is base


CONFIG = """
providers:
  - {id: pa, type: openai_compat, base_url: "http://127.0.0.1:1/v1", api_key: a,
     timeouts: {connect: 1, first_byte: 2, idle: 3, total: 4}}
  - {id: pb, type: openai_compat, base_url: "http://127.0.0.1:2/v1", api_key: b}
models:
  - {id: legacy, provider: pa, upstream_model: gpt-4o, aliases: [old], timeouts: {first_byte: 9}}
  - id: multi
    strategy: weighted
    deployments:
      - {provider: pa, upstream_model: gpt-4o, weight: 3}
      - {provider: pb, upstream_model: gpt-4o-deploy, weight: 1, timeouts: {idle: 7}}
    retry: {max_attempts: 4, base_delay: 0.1, max_delay: 2, deadline: 30}
    circuit_breaker: {failure_threshold: 2, cooldown: 5}
    timeouts: {connect: 5}
auth: {mode: none, allow_unauthenticated: true}
"""


def test_config_both_forms_route() -> None:
    loaded = native_config(CONFIG)
    legacy, multi = loaded.settings.models
    assert [(d.provider, d.upstream_model) for d in legacy.deployments] == [("pa", "gpt-4o")]
    assert (multi.provider, multi.upstream_model) == ("pa", "gpt-4o")  # the primary, for single-form readers
    providers: dict[str, Any] = {"pa": object(), "pb": object()}
    router = Router(loaded.settings, providers, {}, 0)
    r = router.resolve("old")
    assert r.pool.single_shot and r.target.public_model == "old" and r.target.upstream_model == "gpt-4o"
    assert r.timeouts == TimeoutSettings(connect=1, first_byte=9, idle=3, total=4)  # model over provider
    m = router.resolve("multi")
    assert m.pool.strategy == "weighted" and m.pool.max_attempts == 4 and m.pool.deadline == 30
    assert [t.upstream_model for t in m.targets] == ["gpt-4o", "gpt-4o-deploy"]
    a, b = m.pool.deployments
    assert (a.weight, b.weight, a.threshold, a.cooldown) == (3, 1, 2, 5)
    assert a.timeouts == TimeoutSettings(connect=5, first_byte=2, idle=3, total=4)
    assert b.timeouts == TimeoutSettings(connect=5, first_byte=300, idle=7, total=900)


def test_config_one_disabled_deployment_leaves_the_other() -> None:
    loaded = native_config(CONFIG)
    router = Router(loaded.settings, {"pb": object()}, {"pa": "no key"}, 0)  # type: ignore[dict-item]
    m = router.resolve("multi")
    assert [d.provider_id for d in m.pool.deployments] == ["pb"]
    with pytest.raises(ProxyError) as ei:
        router.resolve("legacy")
    assert ei.value.status == 503 and "pa" in ei.value.message and "no key" in ei.value.message


def test_config_deployment_problems_reported() -> None:
    from llm_proxy.errors import ConfigError

    bad = """
providers:
  - {id: pa, type: openai_compat, base_url: "http://127.0.0.1:1/v1", api_key: a}
models:
  - id: both
    provider: pa
    upstream_model: x
    deployments: [{provider: pa, upstream_model: x}]
  - id: broken
    deployments:
      - {provider: pa, upstream_model: x}
      - {provider: nope, upstream_model: ''}
      - {provider: pa, upstream_model: x}
  - {id: neither}
auth: {mode: none, allow_unauthenticated: true}
"""
    with pytest.raises(ConfigError) as ei:
        native_config(bad)
    text = "\n".join(ei.value.problems)
    assert "('both'): give either provider/upstream_model or deployments" in text
    assert "('broken'): deployments[1]: unknown provider 'nope'" in text
    assert "('broken'): deployments[1]: upstream_model is empty" in text
    assert "('broken'): deployments[2] repeats provider 'pa'" in text
    assert "('neither'): provider is required" in text


def test_passthrough_routes_are_kept_per_name_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm_proxy.core import routing

    loaded = native_config("""
providers:
  - {id: local, type: openai_compat, base_url: "http://127.0.0.1:9/v1", passthrough_models: true}
models: []
auth: {mode: none, allow_unauthenticated: true}
""")
    router = Router(loaded.settings, {"local": object()}, {}, 0)  # type: ignore[dict-item]
    a = router.resolve("local/llama3")
    assert (a.target.provider_id, a.target.upstream_model, a.target.public_model, a.canonical) == (
        "local", "llama3", "local/llama3", "local/llama3")
    assert a.targets == (a.target,) and a.pool is router.resolve("local/qwen").pool
    assert router.resolve("local/llama3") is a  # kept
    monkeypatch.setattr(routing, "_PASSTHROUGH_ROUTES_MAX", 2)
    b = router.resolve("local/other")  # the third name: the kept ones are dropped first
    assert b.target.upstream_model == "other" and router.resolve("local/llama3") is not a
    assert router.resolve("local/llama3") == a  # built again, the same route
