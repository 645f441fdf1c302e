#!/usr/bin/env python3
"""Reference point for bench/run.py: the least an aiohttp + uvloop pass-through can do.

Not the proxy: a few lines that read the POST body, send it upstream with one pooled ClientSession
and relay the answer (JSON in one piece, SSE chunk by chunk), with none of the proxy's work (no
JSON parsing, routing, auth, logging, usage). The distance between this and the proxy is the
proxy's own overhead; the distance between this and "direct" is the cost of aiohttp itself.

    python bench/floor.py --port 9000 --upstream http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web


def build_app(upstream: str) -> web.Application:
    session: aiohttp.ClientSession | None = None

    async def on_startup(app: web.Application) -> None:
        nonlocal session
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), skip_auto_headers=("User-Agent",))

    async def on_cleanup(app: web.Application) -> None:
        if session is not None:
            await session.close()

    async def handle(request: web.Request) -> web.StreamResponse:
        assert session is not None
        body = await request.read()
        stream = b'"stream":true' in body
        url = upstream + ("/stream/v1/chat/completions" if stream else "/v1/chat/completions")
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as up:
            if not stream:
                return web.Response(body=await up.read(), content_type="application/json")
            resp = web.StreamResponse(headers={"content-type": "text/event-stream", "cache-control": "no-cache"})
            try:
                await resp.prepare(request)
                async for chunk in up.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except ConnectionError:  # the client went away (wrk stopping mid-stream)
                pass
            return resp

    async def ready(request: web.Request) -> web.Response:
        return web.json_response({"status": "OK"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    app.router.add_get("/v1/health/ready", ready)
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8080")
    a = p.parse_args()
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    web.run_app(build_app(a.upstream.rstrip("/")), host=a.host, port=a.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
