"""The limits store on Redis: every counter of a request checked and counted in one Lua script (one round trip,
atomic: replicas never see each other's half-done work, and there is no local pre-check to drift).

Times inside the scripts are Redis's own clock (TIME), so replicas with skewed clocks count the same windows;
calendar windows (day, month: UTC) are named by the caller, with their end as the key's expiry.

Keys (after limits.key_prefix): `<rule>:<option>:<dims>`, plus `:<period>` for calendar windows. A request
log is a sorted set of request ids scored by time; concurrency a sorted set scored by lease end; a sliding
token window a hash of 60 sub-buckets; a calendar counter a plain integer. Not for Redis Cluster: one script
touches keys of several slots.

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

from .limit_counters import CONCURRENT, SUB_BUCKETS, Check, Count, Settlement, StoreUnavailable, period

log = logging.getLogger("llm_proxy.limits")

# KEYS: one per check. ARGV: token, dry ("1": only read), the caller's time (unix ms: it names the calendar
# windows, so their resets are counted from it too), then per check: code, limit, window ms, the calendar
# window's end (unix ms). Returns "refused used_1 reset_ms_1 used_2 reset_ms_2 ..." (refused: 0 or the index of
# the first full counter; one string: cheaper to read than an array).
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local dry = ARGV[2] == '1'
local cnow = tonumber(ARGV[3])
local n = #KEYS
local used, reset = {}, {}
local refused = 0
for i = 1, n do
  local a = 4 + (i - 1) * 4
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
    r = left - cnow
  end
  used[i], reset[i] = u, r
  if refused == 0 and u >= limit then refused = i end
end
if refused == 0 and not dry then
  for i = 1, n do
    local a = 4 + (i - 1) * 4
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
return table.concat(out, ' ')
""" % {"buckets": SUB_BUCKETS}  # noqa: UP031 (Lua braces)

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


def _counts(reply: bytes) -> tuple[int, list[Count]]:
    """The admit script's "refused used_1 reset_ms_1 used_2 reset_ms_2 ..."."""
    out = reply.split()
    return int(out[0]), [Count(int(u), int(r) / 1000.0) for u, r in zip(out[1::2], out[2::2], strict=True)]


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
        self._admit_sha = hashlib.sha1(_ADMIT.encode()).hexdigest().encode()  # noqa: S324 (Redis's script id)
        self._settle_sha = hashlib.sha1(_SETTLE.encode()).hexdigest().encode()  # noqa: S324
        # (kind, id of the rule set's tuple, day, month) -> (that tuple, numkeys + keys, per-check arguments, n)
        self._parts: dict[tuple[int, int, str, str], tuple[Sequence[Check], bytes, bytes, int]] = {}
        # (kind, id of the rule set's tuple) -> its parts as above and the day they hold for (start, end)
        self._last: dict[tuple[int, int], tuple[Sequence[Check], bytes, bytes, int, float, float]] = {}
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

    def _encoded(self, kind: int, checks: Sequence[Check], now: float) -> tuple[bytes, bytes, int]:
        """The parts of a script call that only change with the period: (numkeys + keys, the per-check
        arguments, the number of checks), built once per rule set and period."""
        last = self._last.get((kind, id(checks)))
        if last is not None and last[0] is checks and last[4] <= now < last[5]:  # the same day as last time
            return last[1], last[2], last[3]
        day = period("day", now)
        month = period("month", now)
        key = (kind, id(checks), day[0], month[0])
        hit = self._parts.get(key)
        if hit is not None and hit[0] is checks:  # (the very tuple: an id is reused only after it is gone)
            self._remember(kind, hit, day[1])
            return hit[1], hit[2], hit[3]
        keys: list[bytes] = []
        args: list[bytes] = []
        p = self._prefix
        for c in checks:
            if c.calendar:
                pid, end = day if c.window == "day" else month
                keys.append(f"{p}{c.key}:{pid}".encode())
            else:
                end = 0.0
                keys.append((p + c.key).encode())
            win = str(int(c.seconds * 1000)).encode()
            ends = str(int(end * 1000)).encode()
            if kind == 0:
                args += [c.code.encode(), str(c.limit).encode(), win, ends]
            else:
                args += [c.code.encode(), win, ends]
        head = _bulk(str(len(keys)).encode()) + b"".join(_bulk(k) for k in keys)
        tail = b"".join(_bulk(a) for a in args)
        if len(self._parts) > 10_000:
            self._parts.clear()
        self._parts[key] = (checks, head, tail, len(keys))
        self._remember(kind, self._parts[key], day[1])
        return head, tail, len(keys)

    def _remember(self, kind: int, parts: tuple[Sequence[Check], bytes, bytes, int], day_end: float) -> None:
        if len(self._last) > 10_000:
            self._last.clear()
        self._last[(kind, id(parts[0]))] = (*parts, day_end - 86400.0, day_end)

    async def _admit_or_read(self, checks: Sequence[Check], token: str, now: float, dry: bool
                             ) -> tuple[int, list[Count]]:
        head, tail, n = self._encoded(0, checks, now)
        middle = _bulk(token.encode()) + (b"$1\r\n1\r\n" if dry else b"$1\r\n0\r\n") + _bulk(b"%d" % (now * 1000))
        return _counts(await self._script(self._admit_sha, _ADMIT, head, middle, tail, 3 + n + 3 + 4 * n))

    async def admit(self, checks: Sequence[Check], token: str, now: float) -> tuple[int, list[Count]]:
        conn = self._conn
        if conn is None or conn.lost is not None or self._watch is None:  # the general path (connects, watches)
            return await self._admit_or_read(checks, token, now, False)
        head, tail, n = self._encoded(0, checks, now)
        fut = conn.send(b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s$%d\r\n%s\r\n$1\r\n0\r\n%s%s" % (
            6 + 5 * n, self._admit_sha, head, len(token), token.encode(), _bulk(b"%d" % (now * 1000)), tail))
        reply = await fut
        if isinstance(reply, RespError):  # NOSCRIPT (a Redis that restarted): the general path sends the script
            return await self._admit_or_read(checks, token, now, False)
        return _counts(reply)

    async def read(self, checks: Sequence[Check], now: float) -> list[Count]:
        return (await self._admit_or_read(checks, "-", now, True))[1]

    def _settle_parts(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float
                      ) -> tuple[bytes, bytes, bytes, int] | None:
        if tokens <= 0 and micro_usd <= 0:
            checks = [c for c in checks if c.code == CONCURRENT]
            if not checks:
                return None
        head, tail, n = self._encoded(1, checks, now)
        middle = _bulk(token.encode()) + _bulk(b"%d" % max(tokens, 0)) + _bulk(b"%d" % max(micro_usd, 0))
        return head, middle, tail, 3 + n + 3 + 3 * n

    async def settle(self, checks: Sequence[Check], token: str, tokens: int, micro_usd: int, now: float) -> None:
        await self.settle_many([(tuple(checks), token, tokens, micro_usd, now)])

    async def settle_many(self, batch: Sequence[Settlement]) -> None:
        """Every charge of the batch written at once (pipelined), then the replies awaited. Charges to the same
        counters (the same rule set, no concurrency slot to give back, the same day) are summed first: one
        script call for all of them."""
        merged: dict[tuple[int, str], list[Any]] = {}
        single: list[Settlement] = []
        for b in batch:
            checks = b[0]
            if any(c.code == CONCURRENT for c in checks):
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
