"""Through the proxy to a real model server (llama.cpp on gemma-3-270m), with the openai SDK as the client."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from .conftest import MODEL, N_CTX, LlamaServer, RealProxy

MSG = [{"role": "user", "content": "Name three colours."}]


def sdk(px: RealProxy) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key="unused", max_retries=0, timeout=120)


def last_event(px: RealProxy, endpoint: str = "chat.completions"):  # type: ignore[no-untyped-def]
    return next(e for e in reversed(px.usage.events) if e.endpoint == endpoint)


def test_chat_non_streamed_tokens_in_the_ledger_are_the_servers(real_proxy: RealProxy) -> None:
    r = sdk(real_proxy).chat.completions.create(model=MODEL, messages=MSG, temperature=0, max_tokens=24)
    assert r.model == MODEL
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens > 0
    ev = last_event(real_proxy)
    assert ev.status == 200 and ev.streamed is False
    # The server's own counts, as it reported them, are what the ledger holds.
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens) == (
        r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)


def test_max_completion_tokens_is_honoured(real_proxy: RealProxy, llama_server: LlamaServer) -> None:
    # What current LangChain Python sends; llama.cpp only knows max_tokens (the proxy maps it for this provider).
    r = sdk(real_proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a ship."}],
        temperature=0, max_completion_tokens=12)
    assert r.usage is not None and r.usage.completion_tokens <= 12


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_streamed_ends_cleanly_and_is_recorded(real_proxy: RealProxy, include_usage: bool) -> None:
    kw = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = sdk(real_proxy).chat.completions.create(
        model=MODEL, messages=MSG, temperature=0, max_tokens=24, stream=True, **kw)
    text, usage = "", None
    for chunk in stream:  # the SDK raises on an in-band error event
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
    assert text
    ev = last_event(real_proxy)
    assert ev.status == 200 and ev.streamed is True and ev.error_type is None
    # llama.cpp reports no usage in streams: the proxy's counts are estimated, never missing.
    assert ev.completion_tokens is not None and ev.completion_tokens > 0
    if include_usage:
        assert usage is not None and usage.completion_tokens == ev.completion_tokens
    else:
        assert usage is None


def test_concurrent_streams_all_end_cleanly(real_proxy: RealProxy) -> None:
    client = openai.AsyncOpenAI(base_url=real_proxy.base_url, api_key="unused", max_retries=0, timeout=120)

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}], temperature=0,
            max_tokens=16, stream=True)
        out = ""
        async for chunk in stream:
            for ch in chunk.choices:
                out += ch.delta.content or ""
        return out

    async def main() -> list[str]:
        try:
            return await asyncio.gather(*(one(i) for i in range(6)))
        finally:
            await client.close()

    before = len(real_proxy.usage.events)
    asyncio.run(main())
    rows = list(real_proxy.usage.events)[before:]
    assert len(rows) == 6
    assert [r.status for r in rows] == [200] * 6, [(r.status, r.error_type) for r in rows]


def test_completions_and_embeddings(real_proxy: RealProxy) -> None:
    c = sdk(real_proxy)
    r = c.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    assert r.model == MODEL and r.choices[0].text
    ev = last_event(real_proxy, "completions")
    assert ev.status == 200 and r.usage is not None and ev.completion_tokens == r.usage.completion_tokens
    e = c.embeddings.create(model="local/embed", input=["hello", "world"])
    # gemma is not a pooled embedding model: llama.cpp answers one vector per token; the proxy relays it as is.
    assert [d.index for d in e.data] == [0, 1] and all(d.embedding for d in e.data)
    assert e.model == "local/embed" and e.usage.prompt_tokens > 0
    assert last_event(real_proxy, "embeddings").status == 200


def test_prompt_over_the_context_window_is_a_clear_4xx(real_proxy: RealProxy) -> None:
    long = "word " * (N_CTX * 2)
    with pytest.raises(openai.BadRequestError) as info:
        sdk(real_proxy).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}],
                                                max_tokens=8)
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and "context" in str(body.get("message", "")).lower()
    assert last_event(real_proxy).status == 400


def test_client_disconnect_stops_generation(real_proxy: RealProxy, llama_server: LlamaServer) -> None:
    stream = sdk(real_proxy).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a very long story about the sea."}],
        temperature=0.8, max_tokens=N_CTX - 64, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()  # the client goes away after the first words
    # Generating ~1000 tokens takes the server many seconds; once the proxy drops the upstream request the
    # server's CPU time stops growing. Poll for that (bounded), well before the generation could have finished.
    started = time.monotonic()
    last, since = llama_server.cpu_seconds(), time.monotonic()
    while time.monotonic() - since < 1.0:
        assert time.monotonic() - started < 15, "the model server kept generating after the client left"
        time.sleep(0.1)
        now = llama_server.cpu_seconds()
        if now - last > 0.05:
            last, since = now, time.monotonic()
    ev = last_event(real_proxy)
    assert ev.status == 499 and ev.error_type == "client_disconnected"
