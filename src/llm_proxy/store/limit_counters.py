"""The counters of the limits (core/limits.py) as a store keeps them: what a counter is, its windows, the
store's protocol, and the memory store (one process). The Redis store is store/redis_limits.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from ..config import LIMIT_KINDS

SUB_BUCKETS = 60  # a sliding token window's buckets

# Store codes for each kind of counter.
REQUESTS, CONCURRENT, SLIDING_TOKENS, CALENDAR_TOKENS, CALENDAR_USD = "r", "c", "st", "ft", "fu"


class StoreUnavailable(Exception):
    """The limits store could not be reached (or did not answer in time)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One counter a request is checked against."""

    rule: str
    option: str  # the config key, e.g. requests_per_minute
    code: str  # REQUESTS, CONCURRENT, ...
    limit: int  # requests, tokens, or micro-USD
    window: str  # second | minute | hour | day | month | lease
    key: str  # without the store's prefix and, for calendar windows, without the period
    seconds: float  # sliding window / lease length; 0 for calendar windows

    @property
    def calendar(self) -> bool:
        return self.code in (CALENDAR_TOKENS, CALENDAR_USD)


def emission_us(c: Check) -> int:
    """A request rate's GCRA emission interval: window / limit, in whole µs (rounded up: never more than the
    limit in the long run; off by under 1 µs a request)."""
    return max(1, -(-round(c.seconds * 1_000_000) // c.limit))


def gcra_count(tat: int, nowu: int, interval: int) -> Count:
    """A request rate's state from its theoretical arrival time (µs): used = ceil((tat - now) / interval); reset =
    until that goes down by one (the next request fits then, when used is the limit)."""
    ahead = max(tat - nowu, 0)
    used = -(-ahead // interval)
    return Count(used, (ahead - (used - 1) * interval if used else interval) / 1_000_000)


_PERIODS: dict[str, tuple[float, float, str]] = {}  # window -> (start, end, id) of the last one asked for


def period(window: str, now: float) -> tuple[str, float]:
    """A calendar window's id and its end (unix seconds), UTC (the last one is kept: no date maths per call)."""
    hit = _PERIODS.get(window)
    if hit is not None and hit[0] <= now < hit[1]:
        return hit[2], hit[1]
    d = datetime.fromtimestamp(now, UTC)
    if window == "day":
        start = datetime(d.year, d.month, d.day, tzinfo=UTC)
        pid, end = start.strftime("%Y%m%d"), start.timestamp() + 86400.0
    else:
        start = datetime(d.year, d.month, 1, tzinfo=UTC)
        nxt = datetime(d.year + 1, 1, 1, tzinfo=UTC) if d.month == 12 else datetime(d.year, d.month + 1, 1, tzinfo=UTC)
        pid, end = d.strftime("%Y%m"), nxt.timestamp()
    _PERIODS[window] = (start.timestamp(), end, pid)
    return pid, end


@dataclass(slots=True)
class Count:
    """A counter's state as a store reports it: what is used (this request included, for request counters) and
    the seconds until it next goes down (sliding) or starts again (calendar)."""

    used: int
    reset: float


# (checks, request token, tokens, micro-USD, unix time): one answer's charge.
Settlement = tuple[tuple["Check", ...], str, int, int, float]
SETTLE_DELAY = 0.002  # charges are gathered this long (seconds) and sent together


class LimitStore(Protocol):
    async def admit(self, checks: Sequence[Check], token: str, now: float) -> tuple[int, list[Count]]:
        """Check every counter and, only if none is full, count the request in the request and concurrency
        counters, in one atomic step. Returns (index of the first full counter + 1, or 0; each counter's state)."""
        ...

    async def settle(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float) -> None:
        """Charge tokens and micro-USD to the token and dollar counters; give back concurrency slots."""
        ...

    async def settle_many(self, batch: Sequence[Settlement]) -> None:
        """settle() for each of (checks, token, tokens, micro-USD, time), sent together."""
        ...

    async def read(self, checks: Sequence[Check], now: float) -> list[Count]: ...

    async def keys(self) -> list[str]:
        """Every counter's key (calendar ones with their period), for `llm-proxy limits show`."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class MemoryLimitStore:
    """Counters in this process (limits.store: memory): the same windows as Redis, for a single replica."""

    def __init__(self) -> None:
        self._tats: dict[str, int] = {}  # request rates (GCRA): theoretical arrival time, µs
        self._leases: dict[str, dict[str, float]] = {}
        self._buckets: dict[str, dict[int, int]] = {}
        self._calendar: dict[str, tuple[str, int]] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def _count(self, c: Check, now: float) -> Count:
        if c.code == REQUESTS:
            return gcra_count(self._tats.get(c.key, 0), round(now * 1_000_000), emission_us(c))
        if c.code == CONCURRENT:
            leases = self._leases.get(c.key)
            if not leases:
                return Count(0, 1.0)
            for t in [t for t, exp in leases.items() if exp <= now]:
                del leases[t]
            return Count(len(leases), 1.0)
        if c.code == SLIDING_TOKENS:
            buckets = self._buckets.get(c.key)
            width = c.seconds / SUB_BUCKETS
            cur = int(now // width)
            if not buckets:
                return Count(0, c.seconds)
            first = cur - SUB_BUCKETS + 1
            for b in [b for b in buckets if b < first]:
                del buckets[b]
            if not buckets:
                return Count(0, c.seconds)
            return Count(sum(buckets.values()), (min(buckets) + SUB_BUCKETS) * width - now)
        pid, end = period(c.window, now)
        held = self._calendar.get(c.key)
        return Count(held[1] if held is not None and held[0] == pid else 0, end - now)

    async def admit(self, checks: Sequence[Check], token: str, now: float) -> tuple[int, list[Count]]:
        counts = [self._count(c, now) for c in checks]
        for i, (c, n) in enumerate(zip(checks, counts, strict=True)):
            if n.used >= c.limit:
                return i + 1, counts
        for c, n in zip(checks, counts, strict=True):
            if c.code == REQUESTS:
                nowu = round(now * 1_000_000)
                self._tats[c.key] = max(self._tats.get(c.key, 0), nowu) + emission_us(c)
                n.used += 1
            elif c.code == CONCURRENT:
                self._leases.setdefault(c.key, {})[token] = now + c.seconds
                n.used += 1
        return 0, counts

    async def settle(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float) -> None:
        for c in checks:
            if c.code == CONCURRENT:
                leases = self._leases.get(c.key)
                if leases is not None:
                    leases.pop(token, None)
                continue
            amount = micro_usd if c.code == CALENDAR_USD else tokens
            if amount <= 0:
                continue
            if c.code == SLIDING_TOKENS:
                b = int(now // (c.seconds / SUB_BUCKETS))
                buckets = self._buckets.setdefault(c.key, {})
                buckets[b] = buckets.get(b, 0) + amount
            elif c.calendar:
                pid, _ = period(c.window, now)
                held = self._calendar.get(c.key)
                self._calendar[c.key] = (pid, (held[1] if held is not None and held[0] == pid else 0) + amount)

    async def read(self, checks: Sequence[Check], now: float) -> list[Count]:
        return [self._count(c, now) for c in checks]

    async def settle_many(self, batch: Sequence[Settlement]) -> None:
        for checks, token, tokens, micro, now in batch:
            await self.settle(checks, token, tokens, micro, now)

    async def keys(self) -> list[str]:
        now = time.time()
        nowu = round(now * 1_000_000)
        out = [k for k, tat in self._tats.items() if tat > nowu] + [*self._leases, *self._buckets]
        for key in self._calendar:
            option = key.split(":", 2)[1]
            out.append(f"{key}:{period(LIMIT_KINDS[option][1], now)[0]}")
        return out
