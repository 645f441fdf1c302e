"""End-to-end: the official openai SDK -> llm-proxy on a real port -> the emulator as upstream."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import openai
import pytest

from .conftest import Emulator, basic_config
from .helpers import ProxyServer, native_config

MSG = [{"role": "user", "content": "hello proxy"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def client(px: ProxyServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key="client-key", max_retries=0, timeout=20)


def test_seed_script_replies_in_order(proxy: ProxyServer, emulator: Emulator) -> None:
    replies = ["first scripted", "second scripted", "third scripted"]
    emulator.script({"reset": True, "models": ["gpt-4o", "gpt-4o-mini"], "responses": replies})
    c = client(proxy)
    got = [
        c.chat.completions.create(model="openai/gpt-4o", messages=MSG, max_tokens=100).choices[0].message.content
        for _ in replies
    ]
    assert got == replies


def test_non_streaming_shape_model_and_usage(proxy: ProxyServer, emulator: Emulator) -> None:
    r = client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG)
    assert r.model == "openai/gpt-4o"  # the id the client asked for
    assert r.choices[0].message.content == "Echo: hello proxy"
    assert r.usage is not None and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    upstream = emulator.requests()[-1]
    assert upstream["json"]["model"] == "gpt-4o"  # the upstream gets its own name
    assert upstream["headers"].get("authorization") == "Bearer sk-upstream-secret-0123456789"
    assert "client-key" not in json.dumps(upstream["headers"])  # client's Authorization never forwarded


def test_alias_is_accepted_and_echoed(proxy: ProxyServer) -> None:
    r = client(proxy).chat.completions.create(model="proxied-model", messages=MSG)
    assert r.model == "proxied-model"


def test_streaming_with_usage(proxy: ProxyServer) -> None:
    chunks = list(
        client(proxy).chat.completions.create(
            model="openai/gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Echo: hello proxy"
    assert all(c.model == "openai/gpt-4o" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_streaming_without_usage_hides_extra_chunk_but_records_it(proxy: ProxyServer, emulator: Emulator) -> None:
    chunks = list(client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True))
    assert all(c.choices for c in chunks)  # no usage-only chunk reached the client
    assert emulator.requests()[-1]["json"]["stream_options"] == {"include_usage": True}
    ev = proxy.services.usage.events[-1]  # type: ignore[attr-defined]
    assert ev.streamed and ev.completion_tokens == 3 and ev.status == 200


def test_raw_stream_ends_with_done(proxy: ProxyServer) -> None:
    async def go() -> bytes:
        async with aiohttp.ClientSession() as s:
            async with s.post(
                proxy.base_url + "/chat/completions", json={"model": "openai/gpt-4o", "messages": MSG, "stream": True}
            ) as r:
                assert r.headers["content-type"].startswith("text/event-stream")
                assert r.headers["x-request-id"].startswith("req_")
                return await r.read()

    body = asyncio.run(go())
    assert body.endswith(b"data: [DONE]\n\n")
    assert body.count(b"data: [DONE]") == 1


def test_tool_calls_parallel_non_stream(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script(
        {
            "responses": [
                {
                    "tool_calls": [
                        {"name": "get_weather", "arguments": {"city": "Paris"}},
                        {"name": "get_weather", "arguments": {"city": "Rome"}},
                    ]
                }
            ]
        }
    )
    r = client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG, tools=TOOLS, tool_choice="auto")
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls"
    assert calls is not None and [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    sent = emulator.requests()[-1]["json"]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto"  # passed intact


def test_streamed_tool_call_deltas(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script(
        {
            "responses": [
                {
                    "tool_calls": [
                        {"name": "get_weather", "arguments": {"city": "Paris"}},
                        {"name": "get_weather", "arguments": {"city": "Rome"}},
                    ]
                }
            ]
        }
    )
    stream = client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG, tools=TOOLS, stream=True)
    args: dict[int, str] = {}
    names: dict[int, str] = {}
    finish = None
    for ch in stream:
        for choice in ch.choices:
            finish = choice.finish_reason or finish
            for tc in choice.delta.tool_calls or []:
                if tc.function and tc.function.name:
                    names[tc.index] = tc.function.name
                args[tc.index] = args.get(tc.index, "") + ((tc.function and tc.function.arguments) or "")
    assert names == {0: "get_weather", 1: "get_weather"}
    assert [json.loads(args[i])["city"] for i in (0, 1)] == ["Paris", "Rome"]
    assert finish == "tool_calls"


def test_async_client_stream_and_not(proxy: ProxyServer) -> None:
    async def go() -> tuple[str, str]:
        c = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0)
        r = await c.chat.completions.create(model="openai/gpt-4o-mini", messages=MSG)
        s = await c.chat.completions.create(model="openai/gpt-4o-mini", messages=MSG, stream=True)
        text = "".join([ch.choices[0].delta.content or "" async for ch in s if ch.choices])
        await c.close()
        return r.choices[0].message.content or "", text

    assert asyncio.run(go()) == ("Echo: hello proxy", "Echo: hello proxy")


def test_completions_and_embeddings(proxy: ProxyServer) -> None:
    c = client(proxy)
    comp = c.completions.create(model="openai/gpt-4o", prompt="say hi")
    assert comp.model == "openai/gpt-4o" and comp.choices[0].text
    emb = c.embeddings.create(model="openai/text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) > 0
    assert emb.model == "openai/text-embedding-3-small"


def test_models_list_and_get(proxy: ProxyServer) -> None:
    c = client(proxy)
    ids = [m.id for m in c.models.list()]
    assert ids == ["openai/gpt-4o", "openai/gpt-4o-mini", "openai/text-embedding-3-small"]
    assert c.models.retrieve("openai/gpt-4o").id == "openai/gpt-4o"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("openai/nope")


def test_llama_stack_prefix_routes(proxy: ProxyServer) -> None:
    c = openai.OpenAI(base_url=proxy.url + "/v1/openai/v1", api_key="k", max_retries=0)
    assert c.chat.completions.create(model="openai/gpt-4o", messages=MSG).choices[0].message.content
    assert next(m.id for m in c.models.list()) == "openai/gpt-4o"


def test_unknown_model_404_openai_shape(proxy: ProxyServer) -> None:
    with pytest.raises(openai.NotFoundError) as ei:
        client(proxy).chat.completions.create(model="openai/unknown", messages=MSG)
    err = ei.value.body
    assert isinstance(err, dict) and err["code"] == "model_not_found" and err["param"] == "model"


async def _raw(
    proxy: ProxyServer, path: str, data: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession() as s:
        async with s.post(proxy.url + path, data=data, headers=headers or {"content-type": "application/json"}) as r:
            return r.status, r.headers.copy(), await r.json()  # type: ignore[return-value]


def test_malformed_json_400(proxy: ProxyServer) -> None:
    status, headers, body = asyncio.run(_raw(proxy, "/v1/chat/completions", b"{not json"))
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["x-request-id"].startswith("req_")


def test_missing_fields_400(proxy: ProxyServer) -> None:
    status, _, body = asyncio.run(_raw(proxy, "/v1/chat/completions", b'{"model": "openai/gpt-4o"}'))
    assert status == 400 and body["error"]["param"] == "messages"
    status, _, body = asyncio.run(_raw(proxy, "/v1/chat/completions", b'{"messages": []}'))
    assert status == 400 and body["error"]["param"] == "model"


def test_body_over_limit_413(emulator: Emulator) -> None:
    cfg = native_config(basic_config(emulator.base_url, "server: {max_body_bytes: 2048}"))
    with ProxyServer(cfg) as px:
        big = json.dumps({"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
        status, _, body = asyncio.run(_raw(px, "/v1/chat/completions", big))
        assert status == 413 and body["error"]["code"] == "request_too_large"
        # and without a Content-Length (chunked upload)
        async def chunked() -> int:
            async def gen():  # type: ignore[no-untyped-def]
                yield big

            async with aiohttp.ClientSession() as s:
                async with s.post(px.base_url + "/chat/completions", data=gen(),
                                  headers={"content-type": "application/json"}) as r:
                    return r.status

        assert asyncio.run(chunked()) == 413


def test_unknown_route_404_envelope(proxy: ProxyServer) -> None:
    async def go() -> tuple[int, dict]:
        async with aiohttp.ClientSession() as s:
            async with s.get(proxy.url + "/v1/nothing-here") as r:
                return r.status, await r.json()

    status, body = asyncio.run(go())
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    ("status", "exc", "etype"),
    [(400, openai.BadRequestError, "invalid_request_error"), (429, openai.RateLimitError, "rate_limit_error"),
     (500, openai.InternalServerError, "server_error"), (503, openai.InternalServerError, "api_error")],
)
def test_upstream_errors_keep_status_and_message(
    proxy: ProxyServer, emulator: Emulator, status: int, exc: type[Exception], etype: str
) -> None:
    emulator.script(
        {"responses": [{"error": {"status": status, "message": f"upstream says {status}", "type": etype,
                                  "headers": {"retry-after": "7"}}}]}
    )
    with pytest.raises(exc) as ei:
        client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG)
    e = ei.value
    assert isinstance(e, openai.APIStatusError)
    assert e.status_code == status
    assert e.message.endswith(f"upstream says {status}")
    if status == 429:
        assert e.response.headers["retry-after"] == "7"
    assert proxy.services.usage.events[-1].status == status  # type: ignore[attr-defined]


def test_upstream_auth_failure_is_not_a_client_401(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"error": {"status": 401, "message": "bad key sk-upstream-secret-0123456789"}}]})
    with pytest.raises(openai.APIStatusError) as ei:
        client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG)
    assert ei.value.status_code == 502
    assert "sk-upstream" not in ei.value.response.text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_upstream_unreachable_502() -> None:
    cfg = native_config(basic_config(f"http://127.0.0.1:{_free_port()}/v1"))
    with ProxyServer(cfg) as px:
        with pytest.raises(openai.APIStatusError) as ei:
            client(px).chat.completions.create(model="openai/gpt-4o", messages=MSG)
        assert ei.value.status_code == 502
        assert ei.value.body["code"] == "upstream_unreachable"  # type: ignore[index]


def test_upstream_timeout_504(emulator: Emulator) -> None:
    cfg = native_config(
        basic_config(emulator.base_url).replace(
            "api_key: sk-upstream-secret-0123456789",
            "api_key: k\n    timeouts: {connect: 2, first_byte: 0.3, idle: 0.3, total: 5}",
        )
    )
    with ProxyServer(cfg) as px:
        emulator.script({"responses": [{"hang": True}]})
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as ei:
            client(px).chat.completions.create(model="openai/gpt-4o", messages=MSG)
        assert ei.value.status_code == 504
        assert time.monotonic() - t0 < 3
        emulator.wait_until(lambda: emulator.server.state.cancelled >= 1)  # upstream request dropped


def test_stream_is_not_buffered(proxy: ProxyServer, emulator: Emulator) -> None:
    """With an upstream pausing 300 ms between events, the first content arrives long before the end."""
    emulator.script({"responses": [{"content": "one two three four", "chunks": 4, "chunk_delay_ms": 300}]})
    t0 = time.monotonic()
    arrivals = []
    for ch in client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True):
        if ch.choices and ch.choices[0].delta.content:
            arrivals.append(time.monotonic() - t0)
    assert len(arrivals) == 4
    assert arrivals[0] < arrivals[-1] - 0.6  # spread over time, as the upstream sent them


def test_client_disconnect_cancels_upstream(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": " ".join(["w"] * 50), "chunk_delay_ms": 100}]})

    async def go() -> None:
        async with aiohttp.ClientSession() as s:
            r = await s.post(
                proxy.base_url + "/chat/completions", json={"model": "openai/gpt-4o", "messages": MSG, "stream": True}
            )
            await r.content.readline()  # first event arrived, then hang up
            r.close()

    asyncio.run(go())
    emulator.wait_until(lambda: emulator.server.state.cancelled >= 1)
    st = emulator.stats()
    assert st["cancelled"] >= 1


def test_stream_cut_by_upstream_sends_error_event(proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "a b c d e f", "disconnect_after_chunks": 2}]})
    with pytest.raises(openai.APIError):
        for _ in client(proxy).chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True):
            pass


def test_health_endpoints_open(proxy: ProxyServer) -> None:
    async def go() -> list[tuple[int, dict]]:
        out = []
        async with aiohttp.ClientSession() as s:
            for p in ("/v1/health", "/v1/health/live", "/v1/health/ready", "/v1/version", "/v1/client-config"):
                async with s.get(proxy.url + p) as r:
                    out.append((r.status, await r.json()))
        return out

    (h, b1), (lv, _), (rd, ready), (v, ver), (cc, cfg) = asyncio.run(go())
    assert (h, b1) == (200, {"status": "OK"})
    assert lv == 200 and rd == 200 and ready["status"] == "OK"
    assert v == 200 and ver["version"]
    assert cc == 200 and cfg == {"model": "openai/gpt-4o", "enabled": "true"}


def test_ready_503_lists_failing_checks_when_no_provider_usable(emulator: Emulator) -> None:
    text = basic_config(emulator.base_url).replace("api_key: sk-upstream-secret-0123456789", "api_key: ${env.NOPE}")
    with ProxyServer(native_config(text)) as px:

        async def go() -> tuple[int, dict]:
            async with aiohttp.ClientSession() as s:
                async with s.get(px.url + "/v1/health/ready") as r:
                    return r.status, await r.json()

        status, body = asyncio.run(go())
        assert status == 503 and body["failing"] == ["providers"]
        assert "NOPE" in body["checks"]["providers"]["providers"]["openai"]["reason"]
        with pytest.raises(openai.APIStatusError) as ei:
            client(px).chat.completions.create(model="openai/gpt-4o", messages=MSG)
        assert ei.value.status_code == 503 and "NOPE" in ei.value.message


def test_seed_run_yaml_without_auth_serves_end_to_end(emulator: Emulator) -> None:
    """The operator's run.yaml (e2e values, auth block removed) as the proxy's config, unchanged but for
    the emulator's address."""
    from pathlib import Path

    from llm_proxy.config import load_config_text

    text = (Path(__file__).parent / "fixtures" / "seed" / "run-noauth.yaml").read_text()
    text = text.replace("http://llemulator.konveyor-tackle.svc.cluster.local/v1", emulator.base_url)
    loaded = load_config_text(text, env={"OPENAI_API_KEY": "dummy-key-for-llemulator", "POSTGRESQL_PASSWORD": "x"})
    with ProxyServer(loaded) as px:
        c = client(px)
        assert [m.id for m in c.models.list()] == ["openai/gpt-4o"]
        for model in ("openai/gpt-4o", "proxied-model"):
            r = c.chat.completions.create(model=model, messages=MSG)
            assert r.model == model and r.choices[0].message.content == "Echo: hello proxy"
        assert emulator.requests()[-1]["headers"]["authorization"] == "Bearer dummy-key-for-llemulator"
