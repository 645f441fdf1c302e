"""The limits store on Redis: every counter of a request checked and counted in one Lua script (one round trip,
atomic: replicas never see each other's half-done work, and there is no local pre-check to drift).

Times inside the scripts are Redis's own clock (TIME), so replicas with skewed clocks count the same windows;
calendar windows (day, month: UTC) are named by the caller, with their end as the key's expiry.

Keys (after limits.key_prefix): `<rule>:<option>:<dims>`, plus `:<period>` for calendar windows. A request
rate is one integer (GCRA: the theoretical arrival time, Redis µs; it expires when it is in the past); concurrency
a sorted set scored by lease end; a sliding token window a hash of 60 sub-buckets; a calendar counter a plain
integer. Not for Redis Cluster: one script touches keys of several slots.

The client is our own (RESP over one asyncio connection, commands pipelined: the replies come back in order):
what a request costs here is building one command from parts encoded once per (rule set, period), one write
per loop iteration for every command queued in it, and reading back a few integers. (redis-py spends some
100 us of CPU per call; the proxy spends about 150 us on a whole request.)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

from .limit_counters import (
    CONCURRENT,
    REQUESTS,
    SLIDING_TOKENS,
    SUB_BUCKETS,
    Check,
    Count,
    Settlement,
    StoreUnavailable,
    emission_us,
    period,
)

log = logging.getLogger("llm_proxy.limits")

# The admit script is written for each rule set (the checks of one principal and model: store/limit_counters'
# Check): its codes, limits and windows are constants in the text, so the call carries nothing but the keys (and
# the request's token when a concurrency slot is taken). Redis spends about 1,500 instructions on each argument
# of a call and 1,500 on each tonumber(); a script that reads 18 of them spent more on that than on the counters.
# One script per rule set, loaded once (EVALSHA; EVAL after a Redis restart); a deployment has a handful.
#
# A request rate is GCRA (the generic cell rate algorithm): with interval T = window / limit, the key holds the
# theoretical arrival time `tat` of the next request (µs, Redis's clock); a request is admitted while
# tat - now <= (limit - 1) * T and moves it T on. So `limit` may come at once, then one every T: no window boundary
# to burst at (a fixed window lets 2x through around its edge), one key of O(1) size, which expires when tat has
# passed. "used" is ceil((tat - now) / T), reset the time until that goes down by one (for a refusal: until the
# next request fits). Integer µs throughout (exact in Lua's doubles).
#
# Returns "refused used_1 [reset_ms_1] used_2 ...": refused is 0 or the index of the first full counter; a reset
# only for request rates and sliding token windows (the caller knows a calendar window's end and a lease's 1 s).
_PRELUDE = """local t = redis.call('TIME')
local nowu = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = math.floor(nowu / 1000)
local u, r, tat = {}, {}, {}
"""

_READ = {
    REQUESTS: """do
  local v = redis.pcall('GET', KEYS[%(i)d])
  local x
  if type(v) == 'table' then
    -- WRONGTYPE: the request log (sorted set) of a version before GCRA: its requests in the window carried over
    redis.call('ZREMRANGEBYSCORE', KEYS[%(i)d], '-inf', now - %(win)d)
    x = nowu + redis.call('ZCARD', KEYS[%(i)d]) * %(T)d
  else
    x = tonumber(v or '0')
    if x < nowu then x = nowu end
  end
  local n = math.ceil((x - nowu) / %(T)d)
  tat[%(i)d], u[%(i)d] = x, n
  if n > 0 then r[%(i)d] = math.ceil((x - nowu - (n - 1) * %(T)d) / 1000) else r[%(i)d] = %(T_ms)d end
end
""",
    CONCURRENT: """redis.call('ZREMRANGEBYSCORE', KEYS[%(i)d], '-inf', now)
u[%(i)d] = redis.call('ZCARD', KEYS[%(i)d])
""",
    SLIDING_TOKENS: """do
  local width = %(win)d / %(buckets)d
  local first = math.floor(now / width) - %(buckets)d + 1
  local all = redis.call('HGETALL', KEYS[%(i)d])
  local low = nil
  local n = 0
  for j = 1, #all, 2 do
    local b = tonumber(all[j])
    if b < first then
      redis.call('HDEL', KEYS[%(i)d], all[j])
    else
      n = n + tonumber(all[j + 1])
      if low == nil or b < low then low = b end
    end
  end
  u[%(i)d] = n
  if low ~= nil then r[%(i)d] = math.ceil((low + %(buckets)d) * width - now) else r[%(i)d] = %(win)d end
end
""",
}
_READ_CALENDAR = "u[%(i)d] = tonumber(redis.call('GET', KEYS[%(i)d]) or '0')\n"
_COUNT = {
    REQUESTS: """do
  local x = tat[%(i)d] + %(T)d
  redis.call('SET', KEYS[%(i)d], string.format('%%d', x), 'PX', string.format('%%d', math.floor((x - nowu) / 1000) + 1))
  u[%(i)d] = u[%(i)d] + 1
end
""",
    CONCURRENT: """redis.call('ZADD', KEYS[%(i)d], now + %(win)d, ARGV[1])
redis.call('PEXPIRE', KEYS[%(i)d], %(win)d)
u[%(i)d] = u[%(i)d] + 1
""",
}
_RESETS = (REQUESTS, SLIDING_TOKENS)  # the codes whose reset the script reports


def admit_script(checks: Sequence[Check], dry: bool) -> str:
    """The admit (dry: only read) script of one rule set."""
    parts = [_PRELUDE]
    for i, c in enumerate(checks, 1):
        win = int(c.seconds * 1000)
        T = emission_us(c) if c.code == REQUESTS else 0
        v = {"i": i, "win": win, "T": T, "T_ms": -(-T // 1000), "buckets": SUB_BUCKETS}
        parts.append(_READ.get(c.code, _READ_CALENDAR) % v)
    tests = [f"u[{i}] >= {c.limit}" for i, c in enumerate(checks, 1)]
    parts.append("local refused = 0\n")
    parts += [f"{'if' if i == 1 else 'elseif'} {t} then refused = {i}\n" for i, t in enumerate(tests, 1)]
    parts.append("end\n" if tests else "")
    counted = [(i, c) for i, c in enumerate(checks, 1) if c.code in _COUNT]
    if counted and not dry:
        parts.append("if refused == 0 then\n")
        for i, c in counted:
            T = emission_us(c) if c.code == REQUESTS else 0
            parts.append(_COUNT[c.code] % {"i": i, "win": int(c.seconds * 1000), "T": T})
        parts.append("end\n")
    fields, values = ["%d"], ["refused"]
    for i, c in enumerate(checks, 1):
        fields.append("%d")
        values.append(f"u[{i}]")
        if c.code in _RESETS:
            fields.append("%d")
            values.append(f"r[{i}]")
    parts.append(f"return string.format('{' '.join(fields)}', {', '.join(values)})\n")
    return "".join(parts)


# KEYS: one per check. ARGV: token, tokens, micro-USD, then per check: code, window ms, the calendar window's
# end (unix ms).
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
  elseif code == 'r' then
    -- a request rate: counted when admitted
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
      redis.call('PEXPIREAT', key, left + 86400000)
    end
  end
end
return 1
""" % {"buckets": SUB_BUCKETS}  # noqa: UP031 (Lua braces)


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


class _AdmitPlan:
    """What admitting (or reading) one rule set needs, built once per rule set and day: the command's parts and
    how to read the reply (per check: whether it reports a reset, else the calendar window's end or 0 = a lease's
    1 s)."""

    __slots__ = ("checks", "day", "dry_script", "dry_sha", "head", "script", "settle_tail", "sha", "shape", "token")

    def __init__(self, checks: Sequence[Check], prefix: str, now: float) -> None:
        day, month = period("day", now), period("month", now)
        keys: list[bytes] = []
        shape: list[tuple[bool, float]] = []
        args: list[bytes] = []  # the settle call's, per check: its code, window (ms) and calendar end (ms, or 0)
        for c in checks:
            if c.calendar:
                pid, end = day if c.window == "day" else month
                keys.append(f"{prefix}{c.key}:{pid}".encode())
                shape.append((False, end))
            else:
                end = 0.0
                keys.append((prefix + c.key).encode())
                shape.append((c.code in _RESETS, 0.0))
            args += [c.code.encode(), str(int(c.seconds * 1000)).encode(), str(int(end * 1000)).encode()]
        self.checks = checks
        self.day = (day[1] - 86400.0, day[1])  # the day it holds for
        self.token = any(c.code == CONCURRENT for c in checks)  # the request's token goes in ARGV[1]
        self.head = _bulk(str(len(keys)).encode()) + b"".join(_bulk(k) for k in keys)
        self.settle_tail = b"".join(_bulk(a) for a in args)
        self.shape = tuple(shape)
        self.script = admit_script(checks, dry=False)
        self.dry_script = admit_script(checks, dry=True)
        self.sha = hashlib.sha1(self.script.encode()).hexdigest().encode()  # noqa: S324 (Redis's script id)
        self.dry_sha = hashlib.sha1(self.dry_script.encode()).hexdigest().encode()  # noqa: S324

    def counts(self, reply: bytes, now: float) -> tuple[int, list[Count]]:
        out = reply.split()
        counts: list[Count] = []
        j = 1
        for has_reset, end in self.shape:
            if has_reset:
                counts.append(Count(int(out[j]), int(out[j + 1]) / 1000.0))
                j += 2
            else:
                counts.append(Count(int(out[j]), end - now if end else 1.0))
                j += 1
        return int(out[0]), counts


class RespError(Exception):
    """An error reply (`-ERR ...`, `-NOSCRIPT ...`)."""


def _parse(buf: bytearray, pos: int) -> tuple[Any, int] | None:
    """One RESP2 reply from buf[pos:]: (value, next position), or None while it is incomplete."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind = buf[pos]
    line = bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == 58:  # ':'
        return int(line), nxt
    if kind == 36:  # '$'
        n = int(line)
        if n < 0:
            return None, nxt
        if len(buf) < nxt + n + 2:
            return None
        return bytes(buf[nxt:nxt + n]), nxt + n + 2
    if kind == 42:  # '*'
        n = int(line)
        items: list[Any] = []
        for _ in range(max(n, 0)):
            got = _parse(buf, nxt)
            if got is None:
                return None
            item, nxt = got
            items.append(item)
        return items, nxt
    if kind == 43:  # '+'
        return line.decode(), nxt
    if kind == 45:  # '-'
        return RespError(line.decode(errors="replace")), nxt
    raise ValueError(f"not a RESP reply: {bytes(buf[pos:pos + 20])!r}")


class _Resp(asyncio.Protocol):
    """One connection: commands written as they come (one write per loop iteration), replies matched in order."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.buf = bytearray()
        self.out: list[bytes] = []
        self.lost: BaseException | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's are not asyncio.Transport subclasses

    def send(self, command: bytes) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if not self.out:
            asyncio.get_running_loop().call_soon(self._flush)
        self.out.append(command)
        self.waiting.append(fut)
        return fut

    def _flush(self) -> None:
        out, self.out = self.out, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(out))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        waiting = self.waiting
        try:
            while pos < len(buf):
                got = _parse(buf, pos)
                if got is None:
                    break
                value, pos = got
                if waiting:
                    fut = waiting.popleft()
                    if not fut.done():
                        fut.set_result(value)
        except ValueError as exc:  # not Redis: drop the connection
            self.connection_lost(exc)
            if self.transport is not None:
                self.transport.close()
            return
        del buf[:pos]

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("connection closed by Redis")
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_exception(StoreUnavailable(f"Redis connection lost: {self.lost}"))


class RedisLimitStore:
    """limits.store: redis://[:password@]host[:port][/db], rediss:// (TLS) or unix:///path[?db=N]. A connection
    that drops is made again by the next call: a Redis that comes back is used again at once."""

    def __init__(self, url: str, prefix: str, *, timeout: float = 0.5) -> None:
        u = urlsplit(url)
        self._unix = u.path if u.scheme == "unix" else None
        self._host = u.hostname or "127.0.0.1"
        self._port = u.port or 6379
        self._tls = u.scheme == "rediss"
        db = u.path.strip("/") if u.scheme != "unix" else dict(
            p.split("=", 1) for p in u.query.split("&") if "=" in p).get("db", "")
        hello: list[bytes] = []
        if u.password is not None:
            args = [b"AUTH", *([unquote(u.username).encode()] if u.username else []), unquote(u.password).encode()]
            hello.append(self._command(args))
        if db and db != "0":
            hello.append(self._command([b"SELECT", db.encode()]))
        self._hello = hello
        self._timeout = timeout
        self._prefix = prefix
        self._conn: _Resp | None = None
        self._connecting: asyncio.Future[_Resp] | None = None
        self._plans: dict[int, _AdmitPlan] = {}  # id of a rule set's tuple -> its plan (the plan holds the tuple)
        # id -> (the tuple, its concurrency checks alone: what a charge of nothing still gives back, or None)
        self._slots: dict[int, tuple[Sequence[Check], tuple[Check, ...] | None]] = {}
        self._settle_sha = hashlib.sha1(_SETTLE.encode()).hexdigest().encode()  # noqa: S324
        self._watch: asyncio.TimerHandle | None = None

    @staticmethod
    def _command(args: Sequence[bytes]) -> bytes:
        return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)

    # -- connection ------------------------------------------------------------------------------

    async def _connection(self) -> _Resp:
        conn = self._conn
        if conn is not None and conn.lost is None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._connect())
        try:
            return await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _connect(self) -> _Resp:
        loop = asyncio.get_running_loop()
        try:
            if self._unix is not None:
                _, proto = await asyncio.wait_for(loop.create_unix_connection(_Resp, self._unix), self._timeout)
            else:
                ctx = ssl.create_default_context() if self._tls else None
                _, proto = await asyncio.wait_for(
                    loop.create_connection(_Resp, self._host, self._port, ssl=ctx), self._timeout)
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to Redis: {type(exc).__name__}: {exc}") from exc
        for cmd in self._hello:
            reply = await asyncio.wait_for(proto.send(cmd), self._timeout)
            if isinstance(reply, RespError):
                proto.transport.close()  # type: ignore[union-attr]
                raise StoreUnavailable(f"Redis refused the connection setup: {reply}")
        self._conn = proto
        return proto

    async def _call(self, command: bytes) -> Any:
        try:
            conn = await self._connection()
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to Redis: {type(exc).__name__}: {exc}") from exc
        fut = conn.send(command)
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._timeout, self._check_stall, conn, fut)
        reply = await fut
        if isinstance(reply, RespError):
            raise reply
        return reply

    def _check_stall(self, conn: _Resp, fut: asyncio.Future[Any]) -> None:
        """Every `timeout` while calls are waiting: one still waiting since the last look means Redis stalled:
        the connection is dropped (its calls fail, the next call connects again)."""
        self._watch = None
        if not fut.done() and conn.lost is None:
            if conn.transport is not None:
                conn.transport.abort()
            conn.connection_lost(TimeoutError(f"no answer from Redis in {self._timeout} s"))
            return
        if conn.waiting:
            self._watch = asyncio.get_running_loop().call_later(self._timeout, self._check_stall, conn,
                                                                conn.waiting[-1])

    async def _script(self, sha: bytes, script: str, head: bytes, middle: bytes, tail: bytes, nargs: int) -> Any:
        try:
            return await self._call(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s%s%s" % (nargs, sha, head, middle, tail))
        except RespError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise StoreUnavailable(f"Redis: {exc}") from None
        # A Redis that restarted has no scripts: EVAL sends it (and caches it there for the next EVALSHA).
        try:
            return await self._call(b"*%d\r\n$4\r\nEVAL\r\n%s%s%s%s" % (nargs, _bulk(script.encode()), head, middle,
                                                                             tail))
        except RespError as exc:
            raise StoreUnavailable(f"Redis: {exc}") from None

    # -- the store -------------------------------------------------------------------------------

    def _plan(self, checks: Sequence[Check], now: float) -> _AdmitPlan:
        plan = self._plans.get(id(checks))
        if plan is not None and plan.checks is checks and plan.day[0] <= now < plan.day[1]:
            return plan
        if len(self._plans) > 10_000:
            self._plans.clear()
        plan = self._plans[id(checks)] = _AdmitPlan(checks, self._prefix, now)
        return plan

    async def _admit_or_read(self, checks: Sequence[Check], token: str, now: float, dry: bool
                             ) -> tuple[int, list[Count]]:
        plan = self._plan(checks, now)
        tail = _bulk(token.encode()) if plan.token and not dry else b""
        nargs = 3 + len(checks) + (1 if tail else 0)
        sha, script = (plan.dry_sha, plan.dry_script) if dry else (plan.sha, plan.script)
        return plan.counts(await self._script(sha, script, plan.head, b"", tail, nargs), now)

    async def admit(self, checks: Sequence[Check], token: str, now: float) -> tuple[int, list[Count]]:
        conn = self._conn
        if conn is None or conn.lost is not None or self._watch is None:  # the general path (connects, watches)
            return await self._admit_or_read(checks, token, now, False)
        plan = self._plan(checks, now)
        if plan.token:
            fut = conn.send(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s$%d\r\n%s\r\n" % (
                4 + len(checks), plan.sha, plan.head, len(token), token.encode()))
        else:
            fut = conn.send(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (3 + len(checks), plan.sha, plan.head))
        reply = await fut
        if isinstance(reply, RespError):  # NOSCRIPT (a Redis that restarted): the general path sends the script
            return await self._admit_or_read(checks, token, now, False)
        return plan.counts(reply, now)

    async def read(self, checks: Sequence[Check], now: float) -> list[Count]:
        return (await self._admit_or_read(checks, "-", now, True))[1]

    def _settle_parts(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float
                      ) -> tuple[bytes, bytes, bytes, int] | None:
        if tokens <= 0 and micro_usd <= 0:
            only = self._slots[id(checks)][1]  # (settle_many has seen this rule set)
            if only is None:
                return None
            checks = only
        plan = self._plan(checks, now)  # the keys and per-check arguments, built once per rule set and day
        n = len(checks)
        middle = _bulk(token.encode()) + _bulk(b"%d" % max(tokens, 0)) + _bulk(b"%d" % max(micro_usd, 0))
        return plan.head, middle, plan.settle_tail, 3 + n + 3 + 3 * n

    async def settle(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float) -> None:
        await self.settle_many([(tuple(checks), token, tokens, micro_usd, now)])

    async def settle_many(self, batch: Sequence[Settlement]) -> None:
        """Every charge of the batch written at once (pipelined), then the replies awaited. Charges to the same
        counters (the same rule set, no concurrency slot to give back, the same day) are summed first: one
        script call for all of them."""
        merged: dict[tuple[int, str], list[Any]] = {}
        single: list[Settlement] = []
        slots = self._slots
        for b in batch:
            checks = b[0]
            known = slots.get(id(checks))
            if known is None or known[0] is not checks:
                if len(slots) > 10_000:
                    slots.clear()
                only = tuple(c for c in checks if c.code == CONCURRENT)
                known = slots[id(checks)] = (checks, only or None)
            if known[1] is not None:  # a concurrency slot to give back: its own call
                single.append(b)
                continue
            key = (id(checks), period("day", b[4])[0])  # (the tuple is alive: the batch holds it)
            m = merged.get(key)
            if m is None:
                merged[key] = [checks, b[1], max(b[2], 0), max(b[3], 0), b[4]]
            else:
                m[2] += max(b[2], 0)
                m[3] += max(b[3], 0)
        todo = single + [(m[0], m[1], m[2], m[3], m[4]) for m in merged.values()]
        calls = [p for b in todo if (p := self._settle_parts(*b)) is not None]
        if not calls:
            return
        try:
            conn = await self._connection()
        except (OSError, TimeoutError) as exc:
            raise StoreUnavailable(f"cannot connect to Redis: {type(exc).__name__}: {exc}") from exc
        sha = self._settle_sha
        futs = [conn.send(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s%s%s" % (nargs, sha, head, middle, tail))
                for head, middle, tail, nargs in calls]
        if self._watch is None:
            self._watch = asyncio.get_running_loop().call_later(self._timeout, self._check_stall, conn, futs[-1])
        for (head, middle, tail, nargs), fut in zip(calls, futs, strict=True):
            reply = await fut
            if isinstance(reply, RespError):  # NOSCRIPT after a restart: this one again, with EVAL
                await self._script(sha, _SETTLE, head, middle, tail, nargs)

    async def keys(self) -> list[str]:
        n = len(self._prefix)
        out: list[str] = []
        cursor = b"0"
        pattern = (self._prefix.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
                   .replace("[", "\\[") + "*").encode()
        while True:
            try:
                reply = await self._call(self._command([b"SCAN", cursor, b"MATCH", pattern, b"COUNT", b"1000"]))
            except RespError as exc:
                raise StoreUnavailable(f"Redis: {exc}") from None
            cursor, batch = reply
            out += [k.decode()[n:] for k in batch]
            if cursor == b"0":
                return out

    async def start(self) -> None:
        started = time.monotonic()
        try:
            await self._connection()
        except StoreUnavailable as exc:  # not fatal: requests follow on_store_error until it answers
            log.error("limits store (Redis) not reachable at start (%.1f s): %s", time.monotonic() - started, exc)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        conn = self._conn
        self._conn = None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
