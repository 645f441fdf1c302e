"""Request, token and dollar limits: rules -> counters per principal / group / model / API key, and the stores
that keep them (this process's memory, or Redis for limits exact across replicas: store/redis_limits.py).

Windows:
- requests per second / minute / hour: GCRA (one theoretical arrival time per counter): up to the limit at once,
  then one every window / limit; no window boundary, so no 2x burst at one. Check and count are one step (one Lua
  script on Redis).
- concurrent requests: a set of the requests in flight, each with a lease (`concurrency_lease_seconds`), so the
  slots of a replica that died come back by themselves.
- tokens per minute / hour: a sliding window over 60 sub-buckets (1 s / 1 min).
- tokens and USD per day / month: calendar windows in UTC (a month's budget starts on the 1st, 00:00 UTC).
Tokens and dollars are charged after the answer, with what it really used; a request is admitted while what was
used is below the limit (the answer that crosses it is served; the next request is refused).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from ..config import LIMIT_KINDS, LimitRule, LimitsSettings
from ..errors import ProxyError, ServiceUnavailable
from ..store.limit_counters import (
    CALENDAR_TOKENS,
    CALENDAR_USD,
    CONCURRENT,
    REQUESTS,
    SETTLE_DELAY,
    SLIDING_TOKENS,
    Check,
    Count,
    LimitStore,
    MemoryLimitStore,
    Settlement,
    StoreUnavailable,
    period,
)
from ..types import Principal, Usage

__all__ = ["Check", "Count", "LimitExceeded", "MemoryLimitStore", "RuleLimiter", "StoreUnavailable", "period"]

log = logging.getLogger("llm_proxy.limits")

MICRO = 1_000_000  # USD are counted in micro-dollars (integers: exact sums on every store)
_SECONDS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}


class LimitExceeded(ProxyError):
    """429: a request or token limit (type `rate_limit_error`, code `rate_limit_exceeded`) or a dollar budget
    (type `insufficient_quota`, OpenAI's for a quota used up; code `budget_exceeded`): OpenAI's types, so the
    ledger's closed set of error types holds them."""

    status = 429


# --------------------------------------------------------------------------------------------------
# Rules -> the checks of one (principal, model)
# --------------------------------------------------------------------------------------------------


def _dimension_values(dim: str, rule: LimitRule, p: Principal, model: str) -> list[str]:
    if dim == "user":
        return [p.subject]
    if dim == "group":
        wanted = rule.match.groups if rule.match is not None and rule.match.groups else None
        return [g for g in p.groups if wanted is None or g in wanted]
    if dim == "model":
        return [model]
    if dim == "api_key":
        return [p.subject] if p.auth_method == "api_key" else []
    return ["*"]  # global


def rule_keys(rule: LimitRule, p: Principal, model: str) -> list[str]:
    """The counters' keys of one rule for a principal and model: one per combination of the `per` values
    (a user in two matched groups has two group counters); none if the rule does not apply."""
    if rule.match is not None and not rule.match.matches(p):
        return []
    if rule.models and not any(fnmatchcase(model, g) for g in rule.models):
        return []
    keys = [""]
    for dim in rule.dimensions:
        values = _dimension_values(dim, rule, p, model)
        keys = [f"{k}|{dim}={v}" if k else f"{dim}={v}" for k in keys for v in values]
    return keys


def rule_checks(rule: LimitRule, keys: Sequence[str], lease: float) -> list[Check]:
    out: list[Check] = []
    for option, (kind, window) in LIMIT_KINDS.items():
        value = getattr(rule, option)
        if value is None:
            continue
        if kind == "requests":
            code, seconds, limit = REQUESTS, _SECONDS[window], int(value)
        elif kind == "concurrent":
            code, seconds, limit = CONCURRENT, lease, int(value)
        elif kind == "tokens" and window in _SECONDS:
            code, seconds, limit = SLIDING_TOKENS, _SECONDS[window], int(value)
        elif kind == "tokens":
            code, seconds, limit = CALENDAR_TOKENS, 0.0, int(value)
        else:
            code, seconds, limit = CALENDAR_USD, 0.0, round(float(value) * MICRO)
        out.extend(Check(rule.name, option, code, limit, window, f"{rule.name}:{option}:{k}", seconds) for k in keys)
    return out


# --------------------------------------------------------------------------------------------------
# The limiter (the exchange's Limiter port)
# --------------------------------------------------------------------------------------------------


_RESET_TEXTS: dict[float, str] = {}  # every answer's headers: the same few values again and again


def reset_text(seconds: float) -> str:
    """A duration as OpenAI writes x-ratelimit-reset-*: 20ms, 1.5s, 6m0s, 1h2m3s."""
    key = math.ceil(seconds) if seconds >= 60.0 else seconds  # (from a minute on only whole seconds show)
    text = _RESET_TEXTS.get(key)
    if text is None:
        if len(_RESET_TEXTS) >= 4096:
            _RESET_TEXTS.clear()
        text = _RESET_TEXTS[key] = _reset_text(seconds)
    return text


def _reset_text(seconds: float) -> str:
    if seconds < 1.0:
        return f"{max(int(seconds * 1000), 0)}ms"
    if seconds < 60.0:
        return f"{round(seconds, 3):g}s"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s"


@dataclass(slots=True)
class Ticket:
    """What admit() hands the request: the headers for its answer, and what settle() must charge or give back."""

    checks: tuple[Check, ...]  # the token, dollar and concurrency counters (the ones settle() touches)
    token: str
    headers: dict[str, str]
    charges: bool  # some of them count tokens or dollars


_HEADER_KIND = {REQUESTS: "requests", SLIDING_TOKENS: "tokens", CALENDAR_TOKENS: "tokens"}


_HEADER_NAMES = {kind: (f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}")
                 for kind in ("requests", "tokens")}


# Per kind of header, the counters that may set it: (header names, ((index, limit, str(limit)), ...)).
_HeaderPlan = tuple[tuple[tuple[str, str, str], tuple[tuple[int, int, str], ...]], ...]


def _header_plan(checks: Sequence[Check]) -> _HeaderPlan:
    by_kind: dict[str, list[tuple[int, int, str]]] = {}
    for i, c in enumerate(checks):
        kind = _HEADER_KIND.get(c.code)
        if kind is not None:
            by_kind.setdefault(kind, []).append((i, c.limit, str(c.limit)))
    return tuple((_HEADER_NAMES[kind], tuple(members)) for kind, members in by_kind.items())


def _headers(plan: _HeaderPlan, counts: Sequence[Count]) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens} from the most constraining counter of each kind."""
    out: dict[str, str] = {}
    for names, members in plan:
        i, limit, text = members[0]
        n = counts[i]
        remaining = limit - n.used
        for j, lim, txt in members[1:]:
            m = counts[j]
            if lim - m.used < remaining:
                remaining, text, n = lim - m.used, txt, m
        out[names[0]] = text
        out[names[1]] = str(remaining) if remaining > 0 else "0"
        out[names[2]] = reset_text(n.reset)
    return out


def _refusal(c: Check, n: Count, headers: dict[str, str]) -> LimitExceeded:
    retry = max(1, math.ceil(n.reset)) if c.code != CONCURRENT else 1
    headers["retry-after"] = str(retry)
    what = c.option.replace("_", " ")
    if c.code == CALENDAR_USD:
        return LimitExceeded(
            f"Budget '{c.rule}' is used up: ${n.used / MICRO:.4f} of ${c.limit / MICRO:.2f} {what[4:]} "
            f"({c.key.split(':', 2)[2]}); it renews in {reset_text(n.reset)}",
            type="insufficient_quota", code="budget_exceeded", headers=headers,
        )
    used = f", {n.used} used" if c.code in (SLIDING_TOKENS, CALENDAR_TOKENS) else ""
    return LimitExceeded(
        f"Rate limit '{c.rule}' reached: {c.limit} {what} ({c.key.split(':', 2)[2]}){used}; "
        f"retry after {retry}s",
        type="rate_limit_error", code="rate_limit_exceeded", headers=headers,
    )


# What admit() needs of one (principal, model): see RuleLimiter._checks.
_Plan = tuple[tuple[Check, ...], tuple[Check, ...], bool, _HeaderPlan]


class RuleLimiter:
    """The limits of `limits.rules` on one store. admit() before the upstream call, settle() after the answer."""

    def __init__(self, settings: LimitsSettings, store: LimitStore) -> None:
        self.settings = settings
        self.store = store
        self._rules = settings.rules
        self._lease = settings.concurrency_lease_seconds
        self._deny = settings.on_store_error == "deny"
        self._cache: dict[tuple[Principal, str], _Plan] = {}
        self._by_id: dict[tuple[int, str], tuple[Principal, _Plan]] = {}  # the same Principal object again
        self._tasks: set[asyncio.Task[None]] = set()
        self._batch: list[Settlement] = []
        self._flush_at: asyncio.TimerHandle | None = None
        self._last_loud = 0.0
        self._quiet = 0
        self.store_ok = True

    def checks(self, p: Principal, model: str) -> tuple[Check, ...]:
        return self._checks(p, model)[0]

    def _checks(self, p: Principal, model: str) -> _Plan:
        """(every counter, the ones settle() touches, whether some of those count tokens or dollars, the header
        plan). Looked up by the principal's identity first (an authenticator hands out the same object for the
        same caller; hashing a Principal's every field costs more)."""
        hit_id = self._by_id.get((id(p), model))
        if hit_id is not None and hit_id[0] is p:
            return hit_id[1]
        key = (p, model)
        hit = self._cache.get(key)
        if hit is None:
            out: list[Check] = []
            for rule in self._rules:
                keys = rule_keys(rule, p, model)
                if keys:
                    out.extend(rule_checks(rule, keys, self._lease))
            every = tuple(out)
            later = tuple(c for c in every if c.code != REQUESTS)
            if len(self._cache) > 50_000:
                self._cache.clear()
            hit = self._cache[key] = (every, later, any(c.code != CONCURRENT for c in later), _header_plan(every))
        if len(self._by_id) > 50_000:
            self._by_id.clear()
        self._by_id[(id(p), model)] = (p, hit)  # (keeps p alive: its id is not reused while the entry is here)
        return hit

    async def admit(self, principal: Principal, model: str, endpoint: str, request_id: str) -> Ticket | None:
        checks, later, charges, plan = self._checks(principal, model)
        if not checks:
            return None
        try:
            refused, counts = await self.store.admit(checks, request_id, time.time())
        except StoreUnavailable as exc:
            self._unavailable(exc)
            return None
        self.store_ok = True
        headers = _headers(plan, counts)
        if refused:
            raise _refusal(checks[refused - 1], counts[refused - 1], headers)
        return Ticket(later, request_id, headers, charges)

    def _unavailable(self, exc: BaseException) -> None:
        self.store_ok = False
        if self._deny:
            raise ServiceUnavailable(
                "Usage limits cannot be checked right now (their store is unreachable); retry shortly",
                code="limits_unavailable", headers={"retry-after": "1"},
            ) from None
        self._loud(f"limits store unreachable ({type(exc).__name__}: {exc}); serving WITHOUT limits "
                   "(limits.on_store_error: allow)")
        return None

    def _loud(self, message: str) -> None:
        """One error line per 10 s at most (with the number of requests in between)."""
        now = time.monotonic()
        if now - self._last_loud < 10.0:
            self._quiet += 1
            return
        quiet, self._quiet, self._last_loud = self._quiet, 0, now
        log.error("%s%s", message, f" [{quiet} more since the last line]" if quiet else "")

    def settle(self, ticket: Ticket, usage: Usage | None, cost_usd: float | None,
               estimate: Callable[[], Awaitable[tuple[Usage, float | None]]] | None = None) -> None:
        """Charge what the answer used and give back its concurrency slot, never on the request's path: charges
        are gathered for SETTLE_DELAY and sent together (one write to Redis for all of them). `estimate`: for a
        stream cut short without usage, what to charge instead (worked out in a task first)."""
        checks = ticket.checks
        if not checks:
            return
        if usage is None and estimate is not None:
            task = asyncio.get_running_loop().create_task(self._estimated(checks, ticket.token, estimate))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        self._enqueue(checks, ticket.token, usage.total_tokens if usage is not None else 0,
                      round(cost_usd * MICRO) if cost_usd else 0)

    def _enqueue(self, checks: tuple[Check, ...], token: str, tokens: int, micro: int) -> None:
        self._batch.append((checks, token, tokens, micro, time.time()))
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_later(SETTLE_DELAY, self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._settle_many(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _estimated(self, checks: tuple[Check, ...], token: str,
                         estimate: Callable[[], Awaitable[tuple[Usage, float | None]]]) -> None:
        usage: Usage | None = None
        cost: float | None = None
        try:
            usage, cost = await estimate()
        except Exception:
            log.exception("estimating a cut-short stream's usage for its limits failed")
        self._enqueue(checks, token, usage.total_tokens if usage is not None else 0,
                      round(cost * MICRO) if cost else 0)

    async def _settle_many(self, batch: list[Settlement]) -> None:
        try:
            await self.store.settle_many(batch)
        except StoreUnavailable as exc:
            self.store_ok = False
            tokens, micro = sum(b[2] for b in batch), sum(b[3] for b in batch)
            self._loud(f"limits store unreachable ({type(exc).__name__}: {exc}): {len(batch)} answers' {tokens} "
                       f"tokens and ${micro / MICRO:.6f} were not charged")
        except Exception:
            log.exception("charging limits failed")

    async def usage(self, principal: Principal, model: str) -> list[tuple[Check, Count]]:
        """Every counter of a principal and model with what it holds now (for `llm-proxy limits show`)."""
        checks = self.checks(principal, model)
        counts = await self.store.read(checks, time.time())
        return list(zip(checks, counts, strict=True))

    async def start(self) -> None:
        await self.store.start()

    async def close(self) -> None:
        if self._tasks:  # estimates first: they add to the batch
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._flush_at is not None:
            self._flush_at.cancel()
        self._flush()
        if self._tasks:  # the last charges go out before the store closes
            await asyncio.wait(list(self._tasks), timeout=5.0)
        await self.store.close()

    def health(self) -> dict[str, Any]:
        return {"ok": self.store_ok, "store": "memory" if self.settings.store == "memory" else "redis",
                "rules": len(self._rules), "on_store_error": self.settings.on_store_error}


def _check_of(rules: dict[str, LimitRule], key: str, lease: float, now: float) -> Check | None:
    """The Check a store key belongs to (`<rule>:<option>:<dims>[:<period>]`), if its rule still exists and, for
    a calendar window, the period is the current one."""
    parts = key.split(":", 2)
    if len(parts) != 3 or parts[0] not in rules or parts[1] not in LIMIT_KINDS:
        return None
    rule, option, dims = rules[parts[0]], parts[1], parts[2]
    window = LIMIT_KINDS[option][1]
    if window in ("day", "month"):
        dims, _, pid = dims.rpartition(":")
        if pid != period(window, now)[0]:
            return None
    for c in rule_checks(rule, [dims], lease):
        if c.option == option:
            return c
    return None


async def snapshot(settings: LimitsSettings, store: LimitStore, *, user: str | None = None) -> list[dict[str, Any]]:
    """Every counter in the store against its rule (only those of principal `user` if given), sorted by rule."""
    now = time.time()
    rules = {r.name: r for r in settings.rules}
    checks = []
    for key in set(await store.keys()):
        c = _check_of(rules, key, settings.concurrency_lease_seconds, now)
        if c is None:
            continue
        dims = c.key.split(":", 2)[2]
        if user is not None and f"user={user}" not in dims.split("|") and f"api_key={user}" not in dims.split("|"):
            continue
        checks.append(c)
    checks.sort(key=lambda c: (c.rule, c.option, c.key))
    counts = await store.read(checks, now) if checks else []
    out = []
    for c, n in zip(checks, counts, strict=True):
        usd = c.code == CALENDAR_USD
        scale = MICRO if usd else 1
        out.append({
            "rule": c.rule, "limit": c.option, "key": c.key.split(":", 2)[2],
            "used": n.used / scale if usd else n.used, "max": c.limit / scale if usd else c.limit,
            "remaining": max(c.limit - n.used, 0) / scale if usd else max(c.limit - n.used, 0),
            "reset": reset_text(n.reset), "reset_seconds": round(n.reset, 3),
        })
    return out


def build_store(settings: LimitsSettings) -> LimitStore:
    if settings.store == "memory":
        return MemoryLimitStore()
    from ..store.redis_limits import RedisLimitStore

    return RedisLimitStore(settings.store, settings.key_prefix, timeout=settings.timeout_seconds)


def build_limiter(settings: LimitsSettings) -> RuleLimiter | None:
    """None without rules: the request path then calls nothing at all."""
    if not settings.rules:
        return None
    return RuleLimiter(settings, build_store(settings))
