"""OpenAI-compatible servers' quirks (issue 19): no usage reported, `max_completion_tokens` ignored, request ids,
llama-stack's `api_token`; and translators that leave the client's body alone (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llm_proxy.config import ProviderSettings, load_config_text
from llm_proxy.core import usage_estimate
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.emulator import start_emulator
from llm_proxy.providers.base import Target
from llm_proxy.providers.openai_compat import OpenAICompatProvider
from llm_proxy.types import UsageEvent

from .conftest import Emulator
from .helpers import LoopThread, ProxyServer, native_config

MSG = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello proxy"}]
LLAMA_CPP = {"content": "The answer is 42, as always.", "no_usage": True}


def _config(base_url: str, ptype: str = "openai_compat", extra: str = "") -> str:
    return f"""
providers:
  - id: local
    type: {ptype}
    base_url: {base_url}
    api_key: sk-local-0123456789
{extra}
models:
  - {{id: local/gpt-4o, provider: local, upstream_model: gpt-4o}}
  - {{id: local/llama, provider: local, upstream_model: gpt-4o-mini}}
auth: {{mode: none, allow_unauthenticated: true}}
"""


@pytest.fixture(scope="module")
def compat_proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(_config(emulator.base_url)), usage=MemoryUsageSink()) as px:
        yield px


def client(px: ProxyServer, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key="client-key", max_retries=0, timeout=20, **kw)


def last_event(px: ProxyServer) -> UsageEvent:
    ev: UsageEvent = px.services.usage.events[-1]  # type: ignore[attr-defined]
    return ev


def _expected(model: str, reply: str) -> tuple[int, int]:
    prompt, framing = usage_estimate.prompt_texts("chat.completions", {"messages": MSG})
    u = usage_estimate.count(model, prompt, framing, [reply])
    return u.prompt_tokens, u.completion_tokens


# -- 19.2: usage estimated when the upstream reports none ---------------------------------------------------------


def test_stream_without_upstream_usage_gets_estimated_usage_chunk(compat_proxy: ProxyServer,
                                                                  emulator: Emulator) -> None:
    emulator.script({"responses": [LLAMA_CPP]})
    chunks = list(client(compat_proxy).chat.completions.create(
        model="local/gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}))
    assert emulator.requests()[-1]["json"]["stream_options"] == {"include_usage": True}  # asked, ignored
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == LLAMA_CPP["content"]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None  # the chunk the client asked for, before [DONE]
    assert last.model == "local/gpt-4o" and last.id == chunks[0].id
    prompt, completion = _expected("gpt-4o", text)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (prompt, completion)
    assert last.usage.total_tokens == prompt + completion
    assert completion == 9  # cl100k_base (tiktoken, from the bundled file); ceil(chars / 4) would be 7
    ev = last_event(compat_proxy)
    assert ev.usage_estimated and ev.streamed and ev.status == 200
    assert (ev.prompt_tokens, ev.completion_tokens, ev.total_tokens) == (prompt, completion, prompt + completion)


def test_stream_without_usage_request_records_estimate_without_extra_chunk(compat_proxy: ProxyServer,
                                                                           emulator: Emulator) -> None:
    emulator.script({"responses": [LLAMA_CPP]})
    chunks = list(client(compat_proxy).chat.completions.create(model="local/gpt-4o", messages=MSG, stream=True))
    assert chunks and all(c.choices for c in chunks)  # the client did not ask for usage: none sent
    ev = last_event(compat_proxy)
    assert ev.usage_estimated and ev.completion_tokens == 9


def test_non_stream_without_usage_is_estimated_for_client_and_ledger(compat_proxy: ProxyServer,
                                                                     emulator: Emulator) -> None:
    emulator.script({"responses": [LLAMA_CPP]})
    r = client(compat_proxy).chat.completions.create(model="local/gpt-4o", messages=MSG)
    assert r.choices[0].message.content == LLAMA_CPP["content"]
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == _expected(
        "gpt-4o", LLAMA_CPP["content"])
    ev = last_event(compat_proxy)
    assert ev.usage_estimated and ev.total_tokens == r.usage.total_tokens


def test_reported_usage_is_not_marked_estimated(compat_proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "one two three", "usage": {"prompt_tokens": 7,
                                                                         "completion_tokens": 3}}]})
    chunks = list(client(compat_proxy).chat.completions.create(
        model="local/gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    ev = last_event(compat_proxy)
    assert not ev.usage_estimated and (ev.prompt_tokens, ev.completion_tokens) == (7, 3)


def test_upstream_known_to_report_usage_keeps_no_frames(compat_proxy: ProxyServer, emulator: Emulator) -> None:
    """After a stream that reported usage the next streams of that model keep no frames; one that then reports
    none gets no counts (NULL: `llm-proxy usage` counts it as without tokens) and the one after is estimated."""
    def stream() -> list[Any]:
        return list(client(compat_proxy).chat.completions.create(
            model="local/gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}))

    emulator.script({"responses": ["reported", LLAMA_CPP, LLAMA_CPP]})
    assert stream()[-1].usage is not None and not last_event(compat_proxy).usage_estimated
    chunks = stream()
    assert all(c.usage is None for c in chunks)  # nothing kept to estimate from: no made-up numbers
    ev = last_event(compat_proxy)
    assert ev.total_tokens is None and not ev.usage_estimated and ev.status == 200
    assert stream()[-1].usage is not None and last_event(compat_proxy).usage_estimated


def test_legacy_completions_stream_without_usage(compat_proxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"responses": [{"content": "abcdefgh ijkl", "no_usage": True}]})
    chunks = list(client(compat_proxy).completions.create(
        model="local/llama", prompt="say something", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].object == "text_completion"
    ev = last_event(compat_proxy)
    assert ev.usage_estimated and ev.completion_tokens and ev.prompt_tokens


def test_estimates_tiktoken_for_openai_models_and_approximation_otherwise() -> None:
    assert usage_estimate.is_openai_family("gpt-4o") and usage_estimate.is_openai_family("openai/o3-mini")
    assert not usage_estimate.is_openai_family("meta-llama/Llama-3.1-8B-Instruct")
    text = "Tokenization of unbelievably long words"
    exact = usage_estimate.count("gpt-4o-mini", [text], 0, [])
    assert exact.prompt_tokens == 7 and exact.estimated
    approx = usage_estimate.count("Llama-3.1-8B", [text], 0, ["x" * 9])
    assert (approx.prompt_tokens, approx.completion_tokens) == (10, 3)  # ceil(chars / 4)


def test_tiktoken_needs_no_download_and_is_imported_only_when_estimating(tmp_path: Path) -> None:
    """In a fresh process with an empty tiktoken cache and every proxy variable pointing nowhere: serving
    modules do not import tiktoken, and the first estimate loads cl100k_base without the network."""
    code = (
        "import sys\n"
        "import llm_proxy.app, llm_proxy.core.gateway, llm_proxy.core.usage_estimate as ue\n"
        "assert 'tiktoken' not in sys.modules, 'tiktoken imported at start'\n"
        "u = ue.count('gpt-4', ['hello world'], 0, [])\n"
        "assert 'tiktoken' in sys.modules and u.prompt_tokens == 2, u\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path), "HTTPS_PROXY": "http://127.0.0.1:9",
           "HTTP_PROXY": "http://127.0.0.1:9"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr


# -- 19.4: max_completion_tokens for servers that read only max_tokens ----------------------------------------


def _body(provider: OpenAICompatProvider, body: dict[str, Any]) -> dict[str, Any]:
    import orjson

    req = provider.build_request("chat.completions", body, Target("p", "up-model", "p/model"), False)
    out: dict[str, Any] = orjson.loads(req.body)
    return out


@pytest.mark.parametrize(
    ("ptype", "field", "expected"),
    [
        ("vllm", None, {"max_tokens": 24}),
        ("ollama", None, {"max_tokens": 24}),
        ("openai_compat", None, {"max_tokens": 24}),
        ("openai", None, {"max_completion_tokens": 24}),
        ("openai", "max_tokens", {"max_tokens": 24}),
        ("vllm", "as_sent", {"max_completion_tokens": 24}),
        ("vllm", "both", {"max_tokens": 24, "max_completion_tokens": 24}),
    ],
)
def test_max_completion_tokens_mapping(ptype: str, field: str | None, expected: dict[str, int]) -> None:
    p = OpenAICompatProvider(ProviderSettings(id="p", type=ptype, base_url="http://x", max_tokens_field=field))
    out = _body(p, {"model": "p/model", "messages": MSG, "max_completion_tokens": 24})
    assert {k: v for k, v in out.items() if k.startswith("max_")} == expected


def test_client_max_tokens_wins_over_mapped_value() -> None:
    p = OpenAICompatProvider(ProviderSettings(id="p", type="vllm", base_url="http://x"))
    out = _body(p, {"model": "p/model", "messages": MSG, "max_completion_tokens": 50, "max_tokens": 10})
    assert out["max_tokens"] == 10 and "max_completion_tokens" not in out


def test_max_completion_tokens_reaches_llama_cpp_style_upstream_as_max_tokens(compat_proxy: ProxyServer,
                                                                              emulator: Emulator) -> None:
    client(compat_proxy).chat.completions.create(model="local/gpt-4o", messages=MSG, max_completion_tokens=24)
    sent = emulator.requests()[-1]["json"]
    assert sent["max_tokens"] == 24 and "max_completion_tokens" not in sent


# -- issue 12: translators are pure -------------------------------------------------------------------------------


def test_build_request_leaves_the_clients_body_alone() -> None:
    p = OpenAICompatProvider(ProviderSettings(id="p", type="vllm", base_url="http://x"))
    body = {"model": "p/model", "messages": MSG, "stream": True, "max_completion_tokens": 5,
            "stream_options": {"include_usage": False}}
    snapshot = {**body, "stream_options": dict(body["stream_options"])}  # type: ignore[arg-type]
    for target in (Target("p", "first", "p/model"), Target("p", "second", "p/model")):
        req = p.build_request("chat.completions", body, target, True)
        assert target.upstream_model.encode() in req.body
    assert body == snapshot


# -- 19.6: request ids upstream ---------------------------------------------------------------------------------


def test_request_id_sent_upstream_and_client_id_forwarded(compat_proxy: ProxyServer, emulator: Emulator) -> None:
    raw = client(compat_proxy).chat.completions.with_raw_response.create(
        model="local/gpt-4o", messages=MSG, extra_headers={"x-client-request-id": "ide-7f3a:42"})
    ours = raw.headers["x-request-id"]
    headers = emulator.requests()[-1]["headers"]
    # Upstream: the same id without its `req_` prefix, 32 hex digits (servers that insist on a UUID take it).
    assert ours.startswith("req_") and headers["x-request-id"] == ours[4:] and uuid.UUID(headers["x-request-id"])
    assert headers["x-client-request-id"] == "ide-7f3a:42"
    ev = last_event(compat_proxy)
    assert ev.request_id == ours and ev.extra["client_request_id"] == "ide-7f3a:42"

    # A client's x-request-id is taken as its id too; the ledger key stays ours (a reused id loses no row).
    for _ in range(2):
        client(compat_proxy).chat.completions.create(model="local/gpt-4o", messages=MSG,
                                                     extra_headers={"x-request-id": "same-id"})
        assert emulator.requests()[-1]["headers"]["x-client-request-id"] == "same-id"
    events = list(compat_proxy.services.usage.events)[-2:]  # type: ignore[attr-defined]
    assert events[0].request_id != events[1].request_id


def test_unsafe_client_request_id_is_ignored(compat_proxy: ProxyServer, emulator: Emulator) -> None:
    client(compat_proxy).chat.completions.create(model="local/gpt-4o", messages=MSG,
                                                 extra_headers={"x-client-request-id": "a b<script>" + "x" * 200})
    headers = emulator.requests()[-1]["headers"]
    assert "x-client-request-id" not in headers and uuid.UUID(headers["x-request-id"])
    assert "client_request_id" not in last_event(compat_proxy).extra


# -- 19.3: llama-stack's api_token ---------------------------------------------------------------------------------

RUN_YAML = """
version: 2
image_name: starter
apis: [inference]
providers:
  inference:
  - provider_id: vllm
    provider_type: remote::vllm
    config:
      url: {url}
      api_token: ${{env.VLLM_API_TOKEN}}
registered_resources:
  models:
  - {{model_id: granite, provider_id: vllm, provider_model_id: gpt-4o}}
"""


def test_llama_stack_api_token_is_the_provider_key() -> None:
    loaded = load_config_text(RUN_YAML.format(url="http://127.0.0.1:1/v1"), env={"VLLM_API_TOKEN": "tok-123"})
    (p,) = loaded.settings.providers
    assert p.api_key == "tok-123"
    assert not [w for w in loaded.warnings if "api_token" in w]
    unset = load_config_text(RUN_YAML.format(url="http://127.0.0.1:1/v1"), env={})
    assert "VLLM_API_TOKEN" in unset.disabled_providers["vllm"]


def test_token_protected_vllm_gets_authorization() -> None:
    lt = LoopThread("vllm")
    emu = lt.run(start_emulator(api_key="tok-123"))
    try:
        loaded = load_config_text(RUN_YAML.format(url=emu.base_url), env={"VLLM_API_TOKEN": "tok-123"})
        with ProxyServer(loaded) as px:
            r = client(px).chat.completions.create(model="granite", messages=MSG)
            assert r.choices[0].message.content
    finally:
        lt.run(emu.close())
        lt.stop()
