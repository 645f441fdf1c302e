"""Results of remote token checks (Hub, introspection): keyed by the token's sha256, never the token itself.

One implementation for every mode that asks a service: a bounded LRU of valid tokens (`ttl`, or the token's own
expiry when the service tells it), a smaller one of rejected tokens (`negative_ttl`), one call in flight per
token (single flight), and refresh ahead: a hit in the second half of its lifetime starts a check in the
background, so a revoked token goes sooner while requests never wait; when that check cannot reach the
service the entry simply lives out its lifetime. A token the service cannot be asked about, and that is not
in the cache, is AuthUnavailable (503), never Unauthorized.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..errors import AuthUnavailable, Unauthorized

log = logging.getLogger("llm_proxy.auth")

V = TypeVar("V")
# What a check returns: the value and when it stops being valid (None: the cache's ttl decides).
Checked = tuple[V, float | None]


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    expires: float
    refresh_at: float  # a hit from then on re-checks in the background (moved on at each attempt)


class TokenCache(Generic[V]):
    def __init__(
        self,
        *,
        ttl: float,
        negative_ttl: float,
        max_size: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_size = max(1, max_size)
        self._clock = clock
        self._good: OrderedDict[bytes, _Entry[V]] = OrderedDict()
        # Rejections are kept apart and smaller, so a flood of made-up tokens cannot push valid ones out.
        self._bad: OrderedDict[bytes, tuple[float, str]] = OrderedDict()
        self._bad_max = max(1, min(self.max_size, 1000))
        self._inflight: dict[bytes, asyncio.Future[_Entry[V]]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.calls = 0  # checks made (for health and tests)

    def __len__(self) -> int:
        return len(self._good)

    async def get(self, token: str, check: Callable[[str], Awaitable[Checked[V]]]) -> V:
        """The cached value for `token`, or `check(token)`'s. `check` raises Unauthorized (the token is not
        valid: remembered for negative_ttl) or AuthUnavailable (the service cannot tell: not remembered)."""
        digest = token_digest(token)
        now = self._clock()
        entry = self._good.get(digest)
        if entry is not None:
            if now < entry.expires:
                self._good.move_to_end(digest)
                if now >= entry.refresh_at:
                    # At most one attempt per half of the remaining life (and 1 s): a service that is away
                    # is not asked once per request.
                    entry.refresh_at = now + max(1.0, (entry.expires - now) / 2)
                    self._refresh_soon(digest, token, check)
                return entry.value
            del self._good[digest]
        bad = self._bad.get(digest)
        if bad is not None:
            if now < bad[0]:
                raise Unauthorized(bad[1])
            del self._bad[digest]
        return (await self._checked(digest, token, check)).value

    async def _checked(self, digest: bytes, token: str, check: Callable[[str], Awaitable[Checked[V]]]) -> _Entry[V]:
        fut = self._inflight.get(digest)
        if fut is None:
            fut = asyncio.ensure_future(self._check(digest, token, check))
            self._inflight[digest] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(digest, None))
        # shield: a caller that goes away does not cancel the check the others wait for.
        return await asyncio.shield(fut)

    async def _check(self, digest: bytes, token: str, check: Callable[[str], Awaitable[Checked[V]]]) -> _Entry[V]:
        self.calls += 1
        try:
            value, until = await check(token)
        except Unauthorized as exc:
            self._good.pop(digest, None)
            if self.negative_ttl > 0:
                self._bad[digest] = (self._clock() + self.negative_ttl, exc.message)
                self._bad.move_to_end(digest)
                while len(self._bad) > self._bad_max:
                    self._bad.popitem(last=False)
            raise
        now = self._clock()
        expires = now + self.ttl if until is None else min(now + self.ttl, until)
        entry = _Entry(value, expires, now + (expires - now) / 2)
        if expires > now:
            self._good[digest] = entry
            self._good.move_to_end(digest)
            while len(self._good) > self.max_size:
                self._good.popitem(last=False)
        return entry

    def _refresh_soon(self, digest: bytes, token: str, check: Callable[[str], Awaitable[Checked[V]]]) -> None:
        if digest in self._inflight:
            return

        async def refresh() -> None:
            try:
                await self._checked(digest, token, check)
            except Unauthorized:
                pass  # dropped from the cache (and remembered as rejected) by _check
            except AuthUnavailable:
                pass  # the service is away: the entry lives out its lifetime
            except Exception:  # never let a background check end in "Task exception was never retrieved"
                log.warning("background token check failed unexpectedly", exc_info=True)

        task = asyncio.ensure_future(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in list(self._background) + list(self._inflight.values()):
            task.cancel()
        for task in list(self._background):
            try:
                await task
            except BaseException:  # noqa: S110 - cancelled on shutdown
                pass
        self._background.clear()
