"""The limits store on Redis: every counter of a request checked and counted in one Lua script (one round trip,
atomic: replicas never see each other's half-done work, and there is no local pre-check to drift).

Times inside the scripts are Redis's own clock (TIME), so replicas with skewed clocks count the same windows;
calendar windows (day, month: UTC) are named by the caller, with their end as the key's expiry.

Keys (after limits.key_prefix): `<rule>:<option>:<dims>`, plus `:<period>` for calendar windows. A request
log is a sorted set of request ids scored by time; concurrency a sorted set scored by lease end; a sliding
token window a hash of 60 sub-buckets; a calendar counter a plain integer. Not for Redis Cluster: one script
touches keys of several slots.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..core.limits import CONCURRENT, SUB_BUCKETS, Check, Count, StoreUnavailable, period

log = logging.getLogger("llm_proxy.limits")

# KEYS: one per check. ARGV: token, dry ("1": only read), then per check: code, limit, window ms, ms to the
# calendar window's end. Returns {refused (0 or index), used_1, reset_ms_1, used_2, reset_ms_2, ...}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local dry = ARGV[2] == '1'
local n = #KEYS
local used, reset = {}, {}
local refused = 0
for i = 1, n do
  local a = 3 + (i - 1) * 4
  local code, limit, win, left = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local key = KEYS[i]
  local u, r = 0, win
  if code == 'r' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win)
    u = redis.call('ZCARD', key)
    if u > 0 then
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      r = tonumber(oldest[2]) + win - now
    end
  elseif code == 'c' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    u = redis.call('ZCARD', key)
    r = 1000
  elseif code == 'st' then
    local width = win / %(buckets)d
    local first = math.floor(now / width) - %(buckets)d + 1
    local all = redis.call('HGETALL', key)
    local low = nil
    for j = 1, #all, 2 do
      local b = tonumber(all[j])
      if b < first then
        redis.call('HDEL', key, all[j])
      else
        u = u + tonumber(all[j + 1])
        if low == nil or b < low then low = b end
      end
    end
    if low ~= nil then r = (low + %(buckets)d) * width - now end
  else
    u = tonumber(redis.call('GET', key) or '0')
    r = left
  end
  used[i], reset[i] = u, r
  if refused == 0 and u >= limit then refused = i end
end
if refused == 0 and not dry then
  for i = 1, n do
    local a = 3 + (i - 1) * 4
    local code, win = ARGV[a], tonumber(ARGV[a + 2])
    if code == 'r' then
      redis.call('ZADD', KEYS[i], now, token)
      redis.call('PEXPIRE', KEYS[i], win)
      used[i] = used[i] + 1
      if used[i] == 1 then reset[i] = win end
    elseif code == 'c' then
      redis.call('ZADD', KEYS[i], now + win, token)
      redis.call('PEXPIRE', KEYS[i], win)
      used[i] = used[i] + 1
    end
  end
end
local out = {refused}
for i = 1, n do
  out[#out + 1] = used[i]
  out[#out + 1] = math.floor(reset[i])
end
return out
""" % {"buckets": SUB_BUCKETS}  # noqa: UP031 (Lua braces)

# KEYS: one per check. ARGV: token, tokens, micro-USD, then per check: code, window ms, ms to the calendar
# window's end.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token, tokens, usd = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, #KEYS do
  local a = 4 + (i - 1) * 3
  local code, win, left = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local key = KEYS[i]
  if code == 'c' then
    redis.call('ZREM', key, token)
  elseif code == 'st' then
    if tokens > 0 then
      local width = win / %(buckets)d
      redis.call('HINCRBY', key, math.floor(now / width), tokens)
      redis.call('PEXPIRE', key, win + width)
    end
  else
    local amount = tokens
    if code == 'fu' then amount = usd end
    if amount > 0 then
      redis.call('INCRBY', key, amount)
      redis.call('PEXPIRE', key, left + 86400000)
    end
  end
end
return 1
""" % {"buckets": SUB_BUCKETS}  # noqa: UP031 (Lua braces)


class RedisLimitStore:
    """limits.store: redis://... The client reconnects by itself: a Redis that comes back is used again."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 0.5) -> None:
        from redis.asyncio import Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # One retry: the first command on a connection Redis dropped (a restart) fails once, then reconnects.
        self._redis: Any = Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 1),
            health_check_interval=0, max_connections=512,
        )
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)

    def _keys(self, checks: Sequence[Check], now: float) -> tuple[list[str], list[int]]:
        keys: list[str] = []
        left: list[int] = []
        p = self._prefix
        for c in checks:
            if c.calendar:
                pid, end = period(c.window, now)
                keys.append(f"{p}{c.key}:{pid}")
                left.append(max(int((end - now) * 1000), 1))
            else:
                keys.append(p + c.key)
                left.append(0)
        return keys, left

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc

    async def _admit_or_read(self, checks: Sequence[Check], token: str, now: float, dry: bool
                             ) -> tuple[int, list[Count]]:
        keys, left = self._keys(checks, now)
        args: list[Any] = [token, "1" if dry else "0"]
        for c, ms in zip(checks, left, strict=True):
            args += [c.code, c.limit, int(c.seconds * 1000), ms]
        out = await self._run(self._admit, keys, args)
        counts = [Count(int(out[1 + 2 * i]), int(out[2 + 2 * i]) / 1000.0) for i in range(len(checks))]
        return int(out[0]), counts

    async def admit(self, checks: Sequence[Check], token: str, now: float) -> tuple[int, list[Count]]:
        return await self._admit_or_read(checks, token, now, False)

    async def read(self, checks: Sequence[Check], now: float) -> list[Count]:
        return (await self._admit_or_read(checks, "", now, True))[1]

    async def settle(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float) -> None:
        if tokens <= 0 and micro_usd <= 0:
            checks = [c for c in checks if c.code == CONCURRENT]
            if not checks:
                return
        keys, left = self._keys(checks, now)
        args: list[Any] = [token, tokens, micro_usd]
        for c, ms in zip(checks, left, strict=True):
            args += [c.code, int(c.seconds * 1000), ms]
        await self._run(self._settle, keys, args)

    async def keys(self) -> list[str]:
        from redis.exceptions import RedisError

        n = len(self._prefix)
        try:
            return [k.decode()[n:] async for k in self._redis.scan_iter(match=self._prefix + "*", count=1000)]
        except (RedisError, OSError, TimeoutError) as exc:
            raise StoreUnavailable(str(exc) or type(exc).__name__) from exc

    async def start(self) -> None:
        try:
            await self._redis.ping()
        except Exception as exc:  # not fatal: requests follow on_store_error until it answers
            log.error("limits store (Redis) not reachable at start: %s: %s", type(exc).__name__, exc)

    async def close(self) -> None:
        await self._redis.aclose()
