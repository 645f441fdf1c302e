"""`/v1/messages` to an Anthropic provider is passed through (provider `native_client_api`, on by default for type
anthropic): the upstream gets the client's request as it came (the model renamed), the client the upstream's reply
and events (the public model in them), the row the upstream's usage. With `native_client_api: false` the same
provider gets the translation. The anthropic SDK on one side, the Anthropic fake (which checks every request
against Anthropic's schema) on the other."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink

from ..helpers import LoopThread, ProxyServer, native_config
from ..providers.support import FakeUpstream
from ..providers.test_e2e_sdk import ANTHROPIC_KEY, ANTHROPIC_MODEL, BOTH, HANDLERS, HELLO, SCRIPT, Reply
from . import sdk

NATIVE, TRANSLATED, FALLBACK = "claude/native", "claude/translated", "claude/fallback"


@dataclass
class Env:
    fake: FakeUpstream
    usage: MemoryUsageSink
    ant: anthropic.Anthropic


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    lt = LoopThread("messages-native")
    fake = lt.run(FakeUpstream(HANDLERS["anthropic"]).start())
    text = f"""
providers:
  - {{id: native, type: anthropic, base_url: "{fake.url}", api_key: {ANTHROPIC_KEY}}}
  - {{id: translated, type: anthropic, base_url: "{fake.url}", api_key: {ANTHROPIC_KEY}, native_client_api: false}}
  - {{id: gone, type: anthropic, base_url: "http://127.0.0.1:9", api_key: {ANTHROPIC_KEY}}}
models:
  - id: "{FALLBACK}"
    deployments:
      - {{provider: gone, upstream_model: {ANTHROPIC_MODEL}}}
      - {{provider: translated, upstream_model: {ANTHROPIC_MODEL}}}
  - {{id: "{NATIVE}", provider: native, upstream_model: {ANTHROPIC_MODEL}}}
  - {{id: "{TRANSLATED}", provider: translated, upstream_model: {ANTHROPIC_MODEL}}}
auth: {{mode: none, allow_unauthenticated: true}}
server: {{drain_delay_seconds: 0}}
"""
    sink = MemoryUsageSink()
    try:
        with ProxyServer(native_config(text), usage=sink) as px, anthropic.Anthropic(
                base_url=px.url, api_key="k", max_retries=0, timeout=20) as ant:
            yield Env(fake, sink, ant)
    finally:
        lt.run(fake.close())
        lt.stop()


def reply(prompt: str) -> Reply:
    r = SCRIPT[prompt]
    assert isinstance(r, Reply)
    return r


def sent(env: Env) -> dict[str, Any]:
    body: dict[str, Any] = env.fake.received[-1].json()
    return body


REQUEST: dict[str, Any] = {"max_tokens": 100, "system": "You are terse.", "metadata": {"user_id": "u-1"},
                           "messages": [{"role": "user", "content": [
                               {"type": "text", "text": HELLO, "cache_control": {"type": "ephemeral"}}]}]}


def test_passed_through_as_it_came(env: Env) -> None:
    r = reply(HELLO)
    msg = env.ant.messages.create(model=NATIVE, **REQUEST)
    # Exactly the client's request, for the upstream model: cache_control (which the translation drops) included.
    assert sent(env) == {**REQUEST, "model": ANTHROPIC_MODEL}
    sdk.message(msg.model_dump(mode="json", exclude_unset=True))
    assert msg.model == NATIVE and msg.content[0].text == r.text  # type: ignore[union-attr]
    row = env.usage.events[-1]
    assert (row.status, row.provider_id, row.prompt_tokens, row.completion_tokens, row.client_api) == (
        200, "native", r.prompt, r.completion, "anthropic.messages")


def test_translated_when_the_provider_says_so(env: Env) -> None:
    msg = env.ant.messages.create(model=TRANSLATED, **REQUEST)
    body = sent(env)
    assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": HELLO}]}]  # rebuilt
    assert msg.model == TRANSLATED and msg.content[0].text == reply(HELLO).text  # type: ignore[union-attr]


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
def test_streamed_tool_use(env: Env, model: str) -> None:
    r = reply(BOTH)
    tools: Any = [{"name": n, "description": n, "input_schema": {"type": "object"}} for n in {c[0] for c in r.calls}]
    with env.ant.messages.stream(model=model, max_tokens=100, tools=tools,
                                 messages=[{"role": "user", "content": BOTH}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    if model == NATIVE:
        assert sent(env)["messages"] == [{"role": "user", "content": BOTH}] and sent(env)["stream"] is True
    start = next(e for e in events if e.type == "message_start")
    assert start.message.model == model  # the public id, not the upstream's
    assert final.stop_reason == "tool_use" and final.content[0].text == r.text  # type: ignore[union-attr]
    assert [(u.name, u.input) for u in final.content if u.type == "tool_use"] == [(n, a) for n, a in r.calls]
    row = env.usage.events[-1]
    assert (row.status, row.streamed, row.prompt_tokens, row.completion_tokens) == (200, True, r.prompt,
                                                                                   r.completion)


@pytest.mark.parametrize("stream", [False, True])
def test_a_failed_pass_through_falls_back_to_a_translated_deployment(env: Env, stream: bool) -> None:
    """The first deployment (passed through) is unreachable; the second gets the translation, and its reply is
    rendered as a translated one."""
    r = reply(HELLO)
    if stream:
        with env.ant.messages.stream(model=FALLBACK, **REQUEST) as s:
            text = "".join(s.text_stream)
            final = s.get_final_message()
        assert text == r.text and final.model == FALLBACK
    else:
        msg = env.ant.messages.create(model=FALLBACK, **REQUEST)
        sdk.message(msg.model_dump(mode="json", exclude_unset=True))
        assert msg.content[0].text == r.text and msg.model == FALLBACK  # type: ignore[union-attr]
    assert "cache_control" not in str(sent(env))  # the translation reached the fake
    row = env.usage.events[-1]
    assert (row.status, row.provider_id, row.attempts, row.completion_tokens) == (200, "translated", 2,
                                                                                  r.completion)
