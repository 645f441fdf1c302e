"""The emulator's aiohttp app: its routes, auth, faults (delays, hangs, cut streams), and running it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any, Literal

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .answers import (
    _Answer,
    _ApiError,
    _chat_answer,
    _completion_answer,
    _embedding_answer,
    _error_response,
    _json_response,
    _new_id,
)
from .script import ScriptItem
from .state import STATE_KEY, EmulatorState

MODEL_CREATED = 1_700_000_000
CLIENT_MAX_SIZE = 128 * 1024 * 1024
_POLL_INTERVAL = 0.05


Kind = Literal["chat", "completion", "embedding", "responses"]


class _ClientGone(Exception):
    """The client closed the connection while we were waiting."""


class _ServerClosing(Exception):
    """The emulator is shutting down while a request was waiting."""


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _ApiError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        ) from None


def _request_model(state: EmulatorState, body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _ApiError(400, "you must provide a model parameter", param="model")
    if model not in state.models:
        raise _ApiError(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            code="model_not_found",
        )
    return model


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _wait(state: EmulatorState, request: web.Request, seconds: float | None) -> None:
    """Sleep `seconds` (None: forever) while watching for a client disconnect or server shutdown."""
    loop = asyncio.get_running_loop()
    deadline = None if seconds is None else loop.time() + seconds
    while True:
        if state.closing:
            raise _ServerClosing
        if _client_gone(request):
            raise _ClientGone
        if deadline is None:
            await asyncio.sleep(_POLL_INTERVAL)
            continue
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, _POLL_INTERVAL))


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


# --------------------------------------------------------------------------------------------------
# Completion endpoints
# --------------------------------------------------------------------------------------------------


async def _send(
    request: web.Request, state: EmulatorState, item: ScriptItem | None, answer: _Answer
) -> web.StreamResponse:
    headers = {"x-request-id": _new_id("req_")}
    if answer.events is None:
        payload = orjson.dumps(answer.body)
        if item is not None and item.truncate_body:
            resp = web.StreamResponse(headers=headers)
            resp.content_type = "application/json"
            resp.content_length = len(payload) + max(16, len(payload))
            await resp.prepare(request)
            await resp.write(payload[: len(payload) // 2])
            _abort(request)
            return resp
        return web.Response(body=payload, content_type="application/json", headers=headers)

    events = answer.events
    cut: int | None = None
    if item is not None:
        if item.disconnect_after_chunks is not None:
            cut = item.disconnect_after_chunks
        elif item.truncate_body:
            cut = len(events) // 2
    chunk_delay = item.chunk_delay_ms / 1000.0 if item is not None else 0.0
    headers["Cache-Control"] = "no-cache"
    resp = web.StreamResponse(headers=headers)
    resp.content_type = "text/event-stream"
    await resp.prepare(request)
    for n, event in enumerate(events):
        if cut is not None and n >= cut:
            _abort(request)
            return resp
        if chunk_delay and n:
            await _wait(state, request, chunk_delay)
        await resp.write(event)
    return resp


async def _completion(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.in_flight += 1
    state.notify()
    try:
        try:
            body = await _read_json(request)
        except _ApiError:
            state.record(request, None)
            raise
        state.record(request, body)
        if not isinstance(body, dict):
            raise _ApiError(400, "the request body must be a JSON object")
        model = _request_model(state, body)
        item = state.next_item(model, for_embeddings=kind == "embedding")
        answer: _Answer | None = None
        if item is None or item.error is None:
            try:
                if kind == "chat":
                    answer = _chat_answer(body, model, item)
                elif kind == "responses":
                    answer = _responses_answer(body, model, item)
                elif kind == "completion":
                    answer = _completion_answer(body, model, item)
                else:
                    answer = _embedding_answer(body, model)
            except _ApiError:
                if item is not None:  # an invalid request does not use up the scripted answer
                    state.unpop(item)
                raise
        if item is not None:
            if item.hang:
                await _wait(state, request, None)
            if item.delay_ms:
                await _wait(state, request, item.delay_ms / 1000.0)
            if item.error is not None:
                err = item.error
                return _error_response(err.status, err.message, err.type, err.code, err.param, err.headers)
        assert answer is not None
        return await _send(request, state, item, answer)
    except _ApiError as exc:
        return exc.response()
    except (_ClientGone, ConnectionResetError):
        state.cancelled += 1
        return web.Response(status=499)
    except _ServerClosing:
        _abort(request)
        return web.Response(status=503)
    except asyncio.CancelledError:
        if not state.closing:
            state.cancelled += 1
        raise
    finally:
        state.in_flight -= 1
        state.notify()


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "chat")


def _responses_answer(body: Mapping[str, Any], model: str, item: ScriptItem | None) -> _Answer:
    """OpenAI's Responses API: the chat answer, rendered by the proxy's own Responses translator (the emulator is
    an upstream that speaks it, as OpenAI does)."""
    from ..errors import BadRequest
    from ..ingress import responses_api

    try:
        chat, req = responses_api.parse(body)
    except BadRequest as exc:
        raise _ApiError(400, exc.message, param=exc.param, code=exc.code) from None
    answer = _chat_answer(chat, model, item)
    if answer.events is None:
        return _Answer(body=responses_api.render_response(req, orjson.dumps(answer.body)))
    framer = responses_api.ResponsesFramer(req)
    events = [framer.feed(e) for e in answer.events]
    events.append(framer.end())
    return _Answer(events=[e for e in events if e])


async def _responses(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "responses")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "completion")


async def _embeddings(request: web.Request) -> web.StreamResponse:
    return await _completion(request, "embedding")


# --------------------------------------------------------------------------------------------------
# Other routes
# --------------------------------------------------------------------------------------------------


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": MODEL_CREATED, "owned_by": "emulator"}


async def _list_models(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.record(request, None)
    return _json_response({"object": "list", "data": [_model_object(m) for m in state.models]})


async def _get_model(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.record(request, None)
    model = request.match_info["model"]
    if model not in state.models:
        return _error_response(
            404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
        )
    return _json_response(_model_object(model))


async def _health(request: web.Request) -> web.StreamResponse:
    return _json_response({"status": "ok"})


async def _script(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    try:
        body = await _read_json(request)
        return _json_response(state.script(body))
    except _ApiError as exc:
        return exc.response()
    except ValueError as exc:
        return _error_response(400, str(exc))


async def _requests(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[STATE_KEY].requests)


async def _reset(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE_KEY]
    state.reset()
    return _json_response({"status": "ok"})


async def _stats(request: web.Request) -> web.StreamResponse:
    return _json_response(request.app[STATE_KEY].stats())


def _auth_middleware(api_key: str) -> Middleware:
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            return _error_response(
                401,
                "Incorrect API key provided." if given else "You didn't provide an API key.",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return auth


@web.middleware
async def _http_errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text routing errors (404, 405, 413...) into OpenAI error envelopes."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
        code = "not_found" if exc.status == 404 else None
        return _error_response(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code, headers=headers)


def create_app(api_key: str | None = None) -> web.Application:
    """Build the emulator aiohttp application; its state is `app[STATE_KEY]`."""
    middlewares: list[Middleware] = [_http_errors_middleware]
    if api_key:
        middlewares.append(_auth_middleware(api_key))
    app = web.Application(middlewares=middlewares, client_max_size=CLIENT_MAX_SIZE)
    app[STATE_KEY] = EmulatorState()
    app.router.add_get("/health", _health)
    app.router.add_get("/v1/models", _list_models)
    app.router.add_get("/v1/models/{model:.+}", _get_model)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/responses", _responses)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/_emulator/script", _script)
    app.router.add_get("/_emulator/requests", _requests)
    app.router.add_post("/_emulator/reset", _reset)
    app.router.add_get("/_emulator/stats", _stats)
    return app


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


class EmulatorServer:
    """A running emulator: `.port`, `.base_url` (ends in /v1), `.state`, `await .close()`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, state: EmulatorState) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.state = state

    @property
    def url(self) -> str:
        """Root URL, e.g. http://127.0.0.1:PORT (the /_emulator/* routes live here)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI base URL, e.g. http://127.0.0.1:PORT/v1."""
        return f"{self.url}/v1"

    async def close(self) -> None:
        self.state.closing = True
        await self._runner.cleanup()

    async def __aenter__(self) -> EmulatorServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def start_emulator(host: str = "127.0.0.1", port: int = 0, api_key: str | None = None) -> EmulatorServer:
    """Start the emulator in the running loop (port 0: any free port) and return the running server."""
    app = create_app(api_key)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound_port = int(address[1])
            break
    return EmulatorServer(runner, host, bound_port, app[STATE_KEY])


async def _serve(host: str, port: int, api_key: str | None) -> None:
    server = await start_emulator(host, port, api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
    auth = "on" if api_key else "off"
    print(f"llm-proxy emulator listening on {server.base_url} (auth {auth})", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(host: str, port: int, api_key: str | None) -> None:
    """Run the emulator until interrupted (Ctrl-C or SIGTERM)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if sys.platform != "win32":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve(host, port, api_key))
