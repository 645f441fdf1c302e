"""The emulator's state: scripted answers queued, requests recorded, counters, and waiting on them."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from aiohttp import web

from .script import ScriptItem, parse_item

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4o", "gpt-4o-mini", "text-embedding-3-small")
MAX_RECORDED_REQUESTS = 1000


# --------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------


class EmulatorState:
    """Scripted answers, recorded requests and counters of one emulator app."""

    def __init__(self, models: Iterable[str] = DEFAULT_MODELS) -> None:
        self.models: list[str] = list(models)
        self.queue: deque[ScriptItem] = deque()
        self.model_queues: dict[str, deque[ScriptItem]] = {}
        self.requests: list[dict[str, Any]] = []
        self.cancelled = 0
        self.in_flight = 0
        self.closing = False
        self._waiters: list[asyncio.Future[None]] = []

    # -- scripting -----------------------------------------------------------------------------

    def script(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Apply a script body `{"reset", "models", "responses"}`; raises ValueError when invalid.

        Validation happens before anything changes, so an invalid script leaves the state intact.
        """
        if not isinstance(spec, Mapping):
            raise ValueError("script body must be an object")
        reset = spec.get("reset", False)
        if not isinstance(reset, bool):
            raise ValueError("'reset' must be a boolean")
        models = spec.get("models")
        if models is not None and (not isinstance(models, list) or not all(isinstance(m, str) and m for m in models)):
            raise ValueError("'models' must be a list of non-empty strings")
        responses = spec.get("responses") or []
        if not isinstance(responses, list):
            raise ValueError("'responses' must be a list")
        items = [parse_item(raw, f"responses[{i}]") for i, raw in enumerate(responses)]
        if reset:
            self.clear()
        if models is not None:
            self.models = list(dict.fromkeys(models))
        self.push(*items)
        return {"status": "ok", "queued": self.queued, "models": list(self.models)}

    def push(self, *items: ScriptItem | str | Mapping[str, Any]) -> None:
        """Append answers to the global queue, or to a per-model queue for items that name a model."""
        for raw in items:
            item = parse_item(raw)
            if item.model is None:
                self.queue.append(item)
            else:
                self.model_queues.setdefault(item.model, deque()).append(item)

    def clear(self) -> None:
        """Forget queued answers and recorded requests (what `"reset": true` does)."""
        self.queue.clear()
        self.model_queues.clear()
        self.requests.clear()

    def reset(self) -> None:
        """Back to the initial state: default models, nothing queued or recorded, counters at zero."""
        self.clear()
        self.models = list(DEFAULT_MODELS)
        self.cancelled = 0

    @property
    def queued(self) -> int:
        return len(self.queue) + sum(len(q) for q in self.model_queues.values())

    def next_item(self, model: str, *, for_embeddings: bool = False) -> ScriptItem | None:
        """Pop the answer for a request to `model`: its per-model queue first, then the global one.

        For embeddings, a global item that carries a reply (content or tool calls) is left in the
        queue for the chat/completions request it was meant for; only fault items (error, hang,
        delay, truncate_body...) are taken.
        """
        per_model = self.model_queues.get(model)
        if per_model:
            return per_model.popleft()
        if self.queue and (not for_embeddings or not self.queue[0].has_reply):
            return self.queue.popleft()
        return None

    def unpop(self, item: ScriptItem) -> None:
        """Put back an item taken by `next_item` (at the front of the queue it came from)."""
        if item.model is None:
            self.queue.appendleft(item)
        else:
            self.model_queues.setdefault(item.model, deque()).appendleft(item)

    # -- recording -----------------------------------------------------------------------------

    def record(self, request: web.Request, body: Any) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": {k.lower(): v for k, v in request.headers.items()},
                "json": body,
            }
        )
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[: len(self.requests) - MAX_RECORDED_REQUESTS]
        self.notify()

    def notify(self) -> None:
        """Wake up `wait_until` callers; called whenever requests or counters change."""
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    async def wait_until(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        """Wait (without polling) until `predicate()` is true, re-checked after each state change.

        For in-process tests, e.g. `await server.state.wait_until(lambda: server.state.cancelled == 1)`.
        Raises TimeoutError after `seconds`.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(seconds):
            while not predicate():
                waiter: asyncio.Future[None] = loop.create_future()
                self._waiters.append(waiter)
                await waiter

    def stats(self) -> dict[str, Any]:
        return {
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "requests": len(self.requests),
            "queued": self.queued,
            "models": list(self.models),
        }


STATE_KEY: web.AppKey[EmulatorState] = web.AppKey("llm_proxy_emulator_state", EmulatorState)
