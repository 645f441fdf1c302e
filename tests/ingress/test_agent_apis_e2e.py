"""End to end: the official openai SDK's Responses API and the anthropic SDK's Messages API -> llm-proxy ->
an OpenAI-compatible fake, an Anthropic fake and a Gemini fake (tests/providers/test_e2e_sdk.py's, which check
every request against the upstream's own schema), with service API keys through the configured authenticator
(`auth.mode: api_keys`): the anthropic SDK sends its key as `x-api-key`, the openai SDK as a bearer token."""

from __future__ import annotations

import contextlib
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import openai
import pytest

from llm_proxy.cli import main
from llm_proxy.core import usage_estimate
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.ingress import anthropic_messages

from ..helpers import LoopThread, ProxyServer, native_config
from ..providers.support import FakeUpstream
from ..providers.test_e2e_sdk import BOTH, BUSY, HANDLERS, HELLO, PUBLIC_MODEL, SCRIPT, TOOLS, WEATHER, Reply, _config
from . import sdk

PROVIDERS = ["openai", "anthropic", "gemini"]
RESPONSES_TOOLS = [{"type": "function", **t["function"], "strict": False} for t in TOOLS]
MESSAGES_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                   "input_schema": t["function"]["parameters"]} for t in TOOLS]


def reply(prompt: str) -> Reply:
    r = SCRIPT[prompt]
    assert isinstance(r, Reply)
    return r


@dataclass
class Env:
    proxy: ProxyServer
    key: str
    usage: MemoryUsageSink
    oai: openai.OpenAI
    ant: anthropic.Anthropic


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("agentapis")
    lt = LoopThread("agentapis-fakes")
    fakes: dict[str, FakeUpstream] = {}
    try:
        for name in PROVIDERS:
            fakes[name] = lt.run(FakeUpstream(HANDLERS[name]).start())
        urls = {n: fakes[n].url if n in fakes else "http://127.0.0.1:9" for n in HANDLERS}
        # The OpenAI fake speaks chat completions only: its provider gets Responses translated (passed through to
        # an upstream that speaks them: tests/store/test_stored_responses.py, against the emulator).
        text = _config(urls).replace("type: openai,", "type: openai, native_client_api: false,").replace(
            "auth: {mode: none, allow_unauthenticated: true}",
            f'auth: {{mode: api_keys}}\ndatabase: {{url: "sqlite+aiosqlite:///{tmp / "ledger.db"}"}}')
        cfg = tmp / "config.yaml"
        cfg.write_text(text)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["keys", "create", "--config", str(cfg), "--name", "agents", "--models", "*"]) == 0
        key = out.getvalue().strip()
        sink = MemoryUsageSink()
        with ProxyServer(native_config(text), usage=sink) as px, openai.OpenAI(
            base_url=px.base_url, api_key=key, max_retries=0, timeout=20
        ) as oai, anthropic.Anthropic(base_url=px.url, api_key=key, max_retries=0, timeout=20) as ant:
            yield Env(px, key, sink, oai, ant)
    finally:
        for f in fakes.values():
            lt.run(f.close())
        lt.stop()


def _row(env: Env, model: str) -> Any:
    """The last usage row (the exchange records it before the stream's last write)."""
    rows = [e for e in env.usage.events if e.model == model]
    assert rows
    return rows[-1]


# --------------------------------------------------------------------------------------------------
# OpenAI Responses
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_responses_create(env: Env, provider: str) -> None:
    model, r = PUBLIC_MODEL[provider], reply(HELLO)
    resp = env.oai.responses.create(model=model, input=HELLO, instructions="You are terse.")
    sdk.response(resp.model_dump(mode="json", exclude_unset=True))
    assert resp.id.startswith("resp_") and resp.status == "completed" and resp.model == model
    assert resp.output_text == r.text
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (r.prompt, r.completion)
    assert resp.usage.input_tokens_details.cached_tokens == r.cached
    row = _row(env, model)
    assert (row.status, row.prompt_tokens, row.completion_tokens, row.provider_id) == (
        200, r.prompt, r.completion, provider)
    assert (row.client_api, row.endpoint) == ("openai.responses", "chat.completions")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_responses_stream(env: Env, provider: str) -> None:
    model, r = PUBLIC_MODEL[provider], reply(HELLO)
    with env.oai.responses.stream(model=model, input=HELLO) as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == r.text and final.usage is not None
    assert (final.usage.input_tokens, final.usage.output_tokens) == (r.prompt, r.completion)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_responses_tool_call(env: Env, provider: str) -> None:
    r = reply(WEATHER)
    resp = env.oai.responses.create(model=PUBLIC_MODEL[provider], input=WEATHER, tools=RESPONSES_TOOLS)  # type: ignore[arg-type]
    calls = [o for o in resp.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(n, a) for n, a in r.calls]
    assert all(c.call_id for c in calls)
    # The answer goes back as a function_call_output item: the conversation reaches the upstream whole.
    follow = env.oai.responses.create(model=PUBLIC_MODEL[provider], tools=RESPONSES_TOOLS, input=[  # type: ignore[arg-type]
        {"role": "user", "content": "x"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": calls[0].name, "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
        {"role": "user", "content": HELLO},
    ])
    assert follow.output_text == reply(HELLO).text


@pytest.mark.parametrize("provider", PROVIDERS)
def test_responses_streamed_parallel_tool_calls(env: Env, provider: str) -> None:
    r = reply(BOTH)
    with env.oai.responses.stream(model=PUBLIC_MODEL[provider], input=BOTH, tools=RESPONSES_TOOLS) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_response()
    assert any(e.type == "response.function_call_arguments.delta" for e in events)
    assert final.output_text == r.text
    calls = [o for o in final.output if o.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [(n, a) for n, a in r.calls]


def test_responses_errors(env: Env) -> None:
    with pytest.raises(openai.RateLimitError) as rl:
        env.oai.responses.create(model=PUBLIC_MODEL["openai"], input=BUSY)
    assert rl.value.status_code == 429
    with pytest.raises(openai.BadRequestError) as bad:
        env.oai.responses.create(model=PUBLIC_MODEL["openai"], input=HELLO, tools=[{"type": "web_search"}])
    assert "web_search" in bad.value.message
    with pytest.raises(openai.BadRequestError) as prev:
        env.oai.responses.create(model=PUBLIC_MODEL["openai"], input=HELLO, previous_response_id="resp_x")
    assert isinstance(prev.value.body, dict) and prev.value.body.get("param") == "previous_response_id"
    with pytest.raises(openai.AuthenticationError):
        env.oai.with_options(api_key="llmp_not-a-key").responses.create(model=PUBLIC_MODEL["openai"], input=HELLO)


def test_responses_under_the_llama_stack_prefix(env: Env) -> None:
    with openai.OpenAI(base_url=env.proxy.url + "/v1/openai/v1", api_key=env.key, max_retries=0) as client:
        assert client.responses.create(model=PUBLIC_MODEL["openai"], input=HELLO).output_text == reply(HELLO).text


# --------------------------------------------------------------------------------------------------
# Anthropic Messages
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_messages_create(env: Env, provider: str) -> None:
    model, r = PUBLIC_MODEL[provider], reply(HELLO)
    msg = env.ant.messages.create(model=model, max_tokens=100, system="You are terse.",
                                  messages=[{"role": "user", "content": HELLO}])
    sdk.message(msg.model_dump(mode="json", exclude_unset=True))
    assert msg.id.startswith("msg_") and msg.model == model and msg.stop_reason == "end_turn"
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text == r.text  # type: ignore[union-attr]
    assert msg.usage.input_tokens + (msg.usage.cache_read_input_tokens or 0) == r.prompt
    assert msg.usage.output_tokens == r.completion
    row = _row(env, model)
    assert (row.status, row.prompt_tokens, row.completion_tokens) == (200, r.prompt, r.completion)
    assert (row.client_api, row.endpoint) == ("anthropic.messages", "chat.completions")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_messages_stream(env: Env, provider: str) -> None:
    r = reply(HELLO)
    with env.ant.messages.stream(model=PUBLIC_MODEL[provider], max_tokens=100,
                                 messages=[{"role": "user", "content": HELLO}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == r.text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == r.completion


@pytest.mark.parametrize("provider", PROVIDERS)
def test_messages_tool_use_streamed(env: Env, provider: str) -> None:
    r = reply(BOTH)
    with env.ant.messages.stream(model=PUBLIC_MODEL[provider], max_tokens=100, tools=MESSAGES_TOOLS,  # type: ignore[arg-type]
                                 messages=[{"role": "user", "content": BOTH}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    assert final.content[0].type == "text" and final.content[0].text == r.text
    uses = [b for b in final.content if b.type == "tool_use"]
    assert [(u.name, u.input) for u in uses] == [(n, a) for n, a in r.calls]
    # The results go back as tool_result blocks, and the conversation reaches the upstream whole.
    follow = env.ant.messages.create(model=PUBLIC_MODEL[provider], max_tokens=100, tools=MESSAGES_TOOLS,  # type: ignore[arg-type]
                                     messages=[
        {"role": "user", "content": BOTH},
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]},  # type: ignore[misc]
        {"role": "user", "content": [
            *({"type": "tool_result", "tool_use_id": u.id, "content": "fine"} for u in uses),
            {"type": "text", "text": HELLO}]},
    ])
    assert follow.content[0].text == reply(HELLO).text  # type: ignore[union-attr]


def test_messages_count_tokens(env: Env) -> None:
    model = PUBLIC_MODEL["anthropic"]
    body: dict[str, Any] = {"model": model, "system": "You are terse.",
                            "messages": [{"role": "user", "content": HELLO}]}
    count = env.ant.messages.count_tokens(**body)
    texts, framing = usage_estimate.prompt_texts("chat.completions", anthropic_messages.count_request(body))
    assert count.input_tokens == usage_estimate.count(model, texts, framing, ()).prompt_tokens > 0
    longer = env.ant.messages.count_tokens(model=model, messages=[{"role": "user", "content": HELLO * 10}],
                                           tools=MESSAGES_TOOLS)  # type: ignore[arg-type]
    assert longer.input_tokens > count.input_tokens
    with pytest.raises(anthropic.NotFoundError) as nf:
        env.ant.messages.count_tokens(model="nope/none", messages=[{"role": "user", "content": "x"}])
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_messages_credentials_and_errors(env: Env) -> None:
    # The key as a bearer token (the SDK's auth_token) works too; a wrong key is Anthropic's 401.
    with anthropic.Anthropic(base_url=env.proxy.url, auth_token=env.key, max_retries=0) as bearer:
        msg = bearer.messages.create(model=PUBLIC_MODEL["openai"], max_tokens=10,
                                     messages=[{"role": "user", "content": HELLO}])
        assert msg.content[0].text == reply(HELLO).text  # type: ignore[union-attr]
    with anthropic.Anthropic(base_url=env.proxy.url, api_key="llmp_wrong", max_retries=0) as wrong, \
            pytest.raises(anthropic.AuthenticationError) as auth:
        wrong.messages.create(model=PUBLIC_MODEL["openai"], max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert auth.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                          "message": auth.value.body["error"]["message"]}}  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as rl:
        env.ant.messages.create(model=PUBLIC_MODEL["anthropic"], max_tokens=10,
                                messages=[{"role": "user", "content": BUSY}])
    assert rl.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    req = urllib.request.Request(
        env.proxy.url + "/v1/messages", method="POST",
        headers={"x-api-key": env.key, "content-type": "application/json"},
        data=json.dumps({"model": PUBLIC_MODEL["openai"], "messages": [{"role": "user", "content": "x"}]}).encode())
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=10)
    assert raw.value.code == 400
    data = json.loads(raw.value.read())
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in data["error"]["message"]
