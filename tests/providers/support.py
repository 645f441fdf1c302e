"""Provider-level test plumbing: fake upstreams on loopback, and build_request -> sign -> send -> decode."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestServer
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from llm_proxy.errors import ProxyError
from llm_proxy.providers.base import Endpoint, Provider, Target, UpstreamRequest
from llm_proxy.types import Usage

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def fixture_bytes(provider: str, name: str) -> bytes:
    return (FIXTURES / provider / name).read_bytes()


def fixture_json(provider: str, name: str) -> Any:
    return orjson.loads(fixture_bytes(provider, name))


@dataclass
class Received:
    method: str
    path: str  # raw, still percent-encoded, as it came on the wire
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


Handler = Callable[[web.Request, Received], Awaitable[web.StreamResponse]]


class FakeUpstream:
    """One aiohttp server on 127.0.0.1 answering every request with `handler`, recording what it got."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.received: list[Received] = []
        self.server: TestServer | None = None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        rec = Received(
            request.method,
            request.raw_path.split("?", 1)[0],
            dict(request.query),
            {k.lower(): v for k, v in request.headers.items()},
            await request.read(),
        )
        self.received.append(rec)
        return await self.handler(request, rec)

    async def start(self) -> FakeUpstream:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.server = TestServer(app, host="127.0.0.1")
        await self.server.start_server()
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"

    async def close(self) -> None:
        if self.server is not None:
            await self.server.close()


def fake_upstream_fixture(handler: Handler) -> Any:
    """A module-scoped `fake` fixture: one FakeUpstream answering with `handler` for the module's tests."""

    @pytest_asyncio.fixture(scope="module", loop_scope="session")
    async def fake() -> AsyncIterator[FakeUpstream]:
        up = await FakeUpstream(handler).start()
        yield up
        await up.close()

    return fake


async def stream_response(request: web.Request, data: bytes, content_type: str, piece: int = 37,
                          headers: dict[str, str] | None = None) -> web.StreamResponse:
    """Write `data` in small pieces so decoders see events split across reads."""
    resp = web.StreamResponse(status=200, headers={"content-type": content_type, **(headers or {})})
    await resp.prepare(request)
    for i in range(0, len(data), piece):
        await resp.write(data[i : i + piece])
    await resp.write_eof()
    return resp


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    body = data if isinstance(data, bytes) else orjson.dumps(data)
    return web.Response(status=status, body=body, headers={"content-type": "application/json", **(headers or {})})


@dataclass
class Result:
    request: UpstreamRequest
    status: int = 0
    body: dict[str, Any] | None = None
    usage: Usage | None = None
    frames: list[bytes] = field(default_factory=list)
    chunks: list[dict[str, Any]] = field(default_factory=list)
    error: ProxyError | None = None
    decoder: Any = None


async def call(
    provider: Provider,
    endpoint: Endpoint,
    body: dict[str, Any],
    target: Target,
    *,
    stream: bool = False,
    want_usage: bool = True,
) -> Result:
    """Drive one request the way the gateway does: build, sign, send (URL as a str, like the core), decode."""
    req = provider.build_request(endpoint, copy.deepcopy(body), target, stream)
    await provider.sign(req)
    res = Result(req)
    async with aiohttp.ClientSession() as session, session.request(
        req.method, req.url, data=req.body, headers=req.headers
    ) as resp:
        res.status = resp.status
        if resp.status >= 400:
            res.error = provider.parse_error(resp.status, resp.headers, await resp.read())
            return res
        if not stream:
            out, res.usage = provider.parse_response(endpoint, await resp.read(), target)
            res.body = orjson.loads(out)
            if endpoint == "chat.completions":
                ChatCompletion.model_validate(res.body)
            return res
        decoder = provider.stream_decoder(endpoint, target, want_usage)
        res.decoder = decoder
        while True:
            data = await resp.content.readany()
            if not data:
                break
            res.frames.extend(decoder.feed(data))
        res.frames.extend(decoder.close())
        res.usage = decoder.usage
    res.chunks = parse_frames(res.frames)
    return res


def parse_frames(frames: list[bytes]) -> list[dict[str, Any]]:
    """Each frame must be one complete `data: <json>` SSE event; chunks are checked against the SDK type."""
    out: list[dict[str, Any]] = []
    for f in frames:
        assert f.startswith(b"data: ") and f.endswith(b"\n\n") and f.count(b"\n\n") == 1, f
        payload = f[len(b"data: ") : -2]
        assert payload != b"[DONE]"
        data = orjson.loads(payload)
        if "error" not in data:
            ChatCompletionChunk.model_validate(data)
        out.append(data)
    return out


def accumulate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Fold chunks into per-choice messages, the way OpenAI clients do."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    ids = set()
    for ch in chunks:
        if "error" in ch:
            continue
        ids.add(ch["id"])
        if ch.get("usage"):
            usage = ch["usage"]
        for c in ch["choices"]:
            acc = choices.setdefault(c["index"], {"role": None, "content": "", "tool_calls": {}, "finish_reason": None})
            d = c["delta"]
            if d.get("role"):
                acc["role"] = d["role"]
            if d.get("content"):
                acc["content"] += d["content"]
            for tc in d.get("tool_calls") or []:
                slot = acc["tool_calls"].setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                if tc.get("id"):
                    slot["id"] = tc["id"]
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot["name"] = fn["name"]
                slot["arguments"] += fn.get("arguments") or ""
            if c.get("finish_reason"):
                assert acc["finish_reason"] is None, "finish_reason sent twice"
                acc["finish_reason"] = c["finish_reason"]
    assert len(ids) <= 1, "all chunks of one response share an id"
    for acc in choices.values():
        acc["tool_calls"] = [acc["tool_calls"][k] for k in sorted(acc["tool_calls"])]
    return {"choices": choices, "usage": usage}


def strip_volatile(data: dict[str, Any]) -> dict[str, Any]:
    """A response without the fields that change per call (id, created)."""
    return {k: v for k, v in data.items() if k not in ("id", "created")}


def split_every(data: bytes, n: int) -> list[bytes]:
    return [data[i : i + n] for i in range(0, len(data), n)]
