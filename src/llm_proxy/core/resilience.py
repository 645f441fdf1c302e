"""The deployments behind one model and how a request moves between them.

A `Pool` holds the deployments of a model (a provider instance plus that provider's model name), the
strategy that chooses among them and the per-request retry budget. Each `Deployment` keeps the little
health state a circuit breaker needs: consecutive failures, when it may be tried again, whether its
single half-open probe is in flight, and how many requests it is serving (for least_busy).

Everything here runs on the event loop thread and never awaits, so plain attributes need no lock.
Times are event-loop times (`loop.time()`), passed in by the caller so tests can drive the clock.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from ..config import CircuitBreakerSettings, RetrySettings, TimeoutSettings
from ..errors import ProxyError, UpstreamTimeout, UpstreamUnreachable
from ..providers.base import Provider

log = logging.getLogger("llm_proxy.resilience")

Strategy = Literal["fallback", "weighted", "least_busy"]

# What a failed attempt says about trying again.
NEVER = 0  # the request itself is at fault (4xx validation...): the same request would fail anywhere
ANYWHERE = 1  # the deployment failed, maybe briefly: retry, on another deployment when one exists
ELSEWHERE = 2  # the deployment is misconfigured (credentials rejected, model unknown): another one only

# A retry-after longer than this does not keep a deployment out of rotation any longer.
MAX_RETRY_AFTER = 300.0

_DEFAULT_BREAKER = CircuitBreakerSettings()


# Faults of one deployment (its credentials, a broken or oversized answer, an empty stream): try another.
_ELSEWHERE_CODES = frozenset(
    {"upstream_auth_failed", "bad_upstream_response", "upstream_response_too_large", "upstream_stream_empty"}
)


def retry_scope(exc: ProxyError) -> int:
    """NEVER, ANYWHERE or ELSEWHERE for an attempt that failed with `exc` before anything reached the client."""
    if isinstance(exc, UpstreamUnreachable | UpstreamTimeout):  # connect errors, resets, timeouts
        return ANYWHERE
    code = exc.code
    if code in _ELSEWHERE_CODES:
        return ELSEWHERE
    status = exc.status
    if status == 429 or status == 408:
        return ANYWHERE
    if status >= 500:
        return NEVER if status in (501, 505) else ANYWHERE
    if status == 404:  # the client's model was found here: a 404 upstream means this deployment's name is wrong
        return ELSEWHERE
    return NEVER


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """`retry-after-ms`, else `retry-after` (seconds or an HTTP date), as seconds from now."""
    if not headers:
        return None
    raw = headers.get("retry-after-ms")
    if raw:
        try:
            return max(0.0, float(raw) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Deployment:
    """One provider instance + upstream model serving a public model, with its circuit-breaker state.

    closed: `open_until == 0`. open: `now < open_until`, out of rotation. half-open: cool-down over, the
    next request to choose it becomes the single probe (`probing`); its outcome closes or re-opens it.
    """

    __slots__ = (
        "cooldown",
        "failures",
        "in_flight",
        "index",
        "last_failure",
        "model_id",
        "not_before",
        "open_until",
        "probing",
        "provider",
        "provider_id",
        "threshold",
        "timeouts",
        "upstream_model",
        "weight",
    )

    def __init__(
        self,
        index: int,
        provider: Provider,
        provider_id: str,
        upstream_model: str,
        timeouts: TimeoutSettings,
        weight: float = 1.0,
        breaker: CircuitBreakerSettings | None = None,
        model_id: str = "",
    ) -> None:
        breaker = breaker or _DEFAULT_BREAKER
        self.index = index
        self.provider = provider
        self.provider_id = provider_id
        self.upstream_model = upstream_model
        self.timeouts = timeouts
        self.weight = weight
        self.threshold = breaker.failure_threshold
        self.cooldown = breaker.cooldown
        self.model_id = model_id
        self.in_flight = 0
        self.failures = 0  # consecutive
        self.open_until = 0.0
        self.probing = False
        self.last_failure = float("-inf")
        self.not_before = 0.0  # from a retry-after

    def state(self, now: float) -> str:
        if not self.open_until:
            return "closed"
        return "open" if now < self.open_until else "half_open"

    def usable(self, now: float) -> bool:
        """In rotation: closed, or half-open with no probe in flight; and not asked to wait (retry-after)."""
        if self.open_until and (self.probing or now < self.open_until):
            return False
        return now >= self.not_before

    def begin(self, now: float) -> bool:
        """An attempt starts here; True when it is the half-open probe."""
        self.in_flight += 1
        if self.open_until and not self.probing and now >= self.open_until:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        if self.failures or self.open_until:
            if self.open_until:
                log.info("deployment back in rotation", extra=self._log_fields())
            self.failures = 0
            self.open_until = 0.0
            self.probing = False

    def failed(self, now: float, retry_after: float | None = None) -> None:
        self.failures += 1
        self.last_failure = now
        if retry_after:
            self.not_before = now + min(retry_after, MAX_RETRY_AFTER)
        if self.probing:
            self.probing = False
            self.open_until = now + self.cooldown
            log.warning("deployment probe failed: out of rotation again", extra=self._log_fields())
        elif self.open_until:
            # Tried while open because nothing else was left, and failed again: stay out a full cool-down.
            self.open_until = max(self.open_until, now + self.cooldown)
        elif self.failures >= self.threshold:
            self.open_until = now + self.cooldown
            log.warning("deployment out of rotation after consecutive failures", extra=self._log_fields())

    def abandoned(self, probe: bool) -> None:
        """The attempt ended without a verdict (client gone, request rejected before sending)."""
        if probe:
            self.probing = False

    def _log_fields(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "provider": self.provider_id,
            "upstream_model": self.upstream_model,
            "failures": self.failures,
            "cooldown_seconds": self.cooldown,
        }

    def snapshot(self, now: float) -> dict[str, Any]:
        return {
            "provider": self.provider_id,
            "upstream_model": self.upstream_model,
            "state": self.state(now),
            "consecutive_failures": self.failures,
            "in_flight": self.in_flight,
        }


class Pool:
    """The deployments of one model, the strategy choosing among them, and the per-request retry budget."""

    __slots__ = (
        "_rr",
        "base_delay",
        "deadline",
        "deployments",
        "max_attempts",
        "max_delay",
        "multi",
        "single_shot",
        "strategy",
    )

    def __init__(
        self, deployments: tuple[Deployment, ...], strategy: Strategy = "fallback", retry: RetrySettings | None = None
    ) -> None:
        if not deployments:
            raise ValueError("a pool needs at least one deployment")
        self.deployments = deployments
        self.strategy = strategy
        if retry is None:  # each deployment once, no deadline beyond the timeouts
            self.max_attempts = len(deployments)
            self.base_delay, self.max_delay = 0.2, 5.0
            self.deadline: float | None = None
        else:
            self.max_attempts = retry.max_attempts
            self.base_delay, self.max_delay = retry.base_delay, retry.max_delay
            self.deadline = retry.deadline
        self.multi = len(deployments) > 1
        # One deployment, one attempt, no deadline: the gateway skips all bookkeeping.
        self.single_shot = not self.multi and self.max_attempts == 1 and self.deadline is None
        self._rr = 0

    def pick(self, now: float, tried: int = 0, banned: int = 0) -> Deployment | None:
        """The deployment for the next attempt; None when every deployment is banned for this request.

        Preference: usable and not yet tried; then usable; then, when every deployment is cooling
        down, the least recently failed one (better a likely failure than a certain one). `tried` and
        `banned` are bit masks of deployment indexes.
        """
        deps = self.deployments
        if not self.multi:
            return None if banned & 1 else deps[0]
        return (
            self._choose(now, tried | banned)
            or (self._choose(now, banned) if tried else None)
            or self._least_recently_failed(banned)
        )

    def _choose(self, now: float, skip: int) -> Deployment | None:
        deps = self.deployments
        strategy = self.strategy
        if strategy == "fallback":
            for d in deps:
                if not (skip >> d.index) & 1 and d.usable(now):
                    return d
            return None
        if strategy == "weighted":
            total = 0.0
            for d in deps:
                if not (skip >> d.index) & 1 and d.usable(now):
                    total += d.weight
            if not total:
                return None
            r = random.random() * total  # noqa: S311 - load spreading, not cryptography
            last = None
            for d in deps:
                if not (skip >> d.index) & 1 and d.usable(now):
                    last = d
                    r -= d.weight
                    if r < 0:
                        return d
            return last
        # least_busy: fewest requests in flight; ties go round-robin so an idle pool still spreads.
        n = len(deps)
        start = self._rr = (self._rr + 1) % n
        best: Deployment | None = None
        for k in range(n):
            d = deps[(start + k) % n]
            if not (skip >> d.index) & 1 and d.usable(now) and (best is None or d.in_flight < best.in_flight):
                best = d
        return best

    def _least_recently_failed(self, banned: int) -> Deployment | None:
        best: Deployment | None = None
        for d in self.deployments:
            if not (banned >> d.index) & 1 and (best is None or d.last_failure < best.last_failure):
                best = d
        return best

    def backoff(self, n: int) -> float:
        """Jittered exponential delay before the n-th (1-based) retry of a deployment already tried."""
        ceiling = min(self.max_delay, self.base_delay * (2.0 ** (n - 1)))
        return ceiling * (0.5 + random.random() / 2.0)  # noqa: S311

    def snapshot(self, now: float) -> list[dict[str, Any]]:
        return [d.snapshot(now) for d in self.deployments]
