"""Azure OpenAI against a loopback fake that checks deployment URLs, api-version and the api-key header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from llm_proxy.config import ProviderSettings, load_config_text
from llm_proxy.errors import RateLimited, UpstreamError
from llm_proxy.providers import azure_openai as az
from llm_proxy.providers.base import Target
from llm_proxy.providers.registry import build_provider

from .support import (
    FakeUpstream,
    Received,
    accumulate,
    call,
    fake_upstream_fixture,
    fixture_bytes,
    fixture_json,
    json_response,
    stream_response,
)

KEY = "0123456789abcdef0123456789abcdef"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.entra-access-token"
P = "azure"
VERSION = "2024-10-21"


async def _handler(request: web.Request, rec: Received) -> web.StreamResponse:
    if rec.headers.get("api-key") != KEY and rec.headers.get("authorization") != f"Bearer {TOKEN}":
        return json_response({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}},
                             401)
    body = rec.json()
    if rec.path.startswith("/openai/v1/"):
        deployment = body["model"]
        if "api-version" in rec.query and rec.query["api-version"] != "preview":
            return json_response({"error": {"code": "BadRequest", "message": "bad api-version"}}, 400)
    elif rec.path.startswith("/openai/deployments/"):
        deployment = rec.path.split("/")[3]
        if rec.query.get("api-version") != VERSION:
            return json_response({"error": {"code": "404", "message": "Resource not found"}}, 404)
    else:
        return json_response({"error": {"code": "404", "message": "Resource not found"}}, 404)
    if not rec.path.endswith(("/chat/completions", "/embeddings")):
        return json_response({"error": {"code": "404", "message": "Resource not found"}}, 404)
    if deployment == "gpt4o-429":
        return json_response(fixture_json(P, "error_429.json"), 429, {"retry-after": "6", "retry-after-ms": "5800"})
    if deployment == "gpt4o-500":
        return json_response(fixture_json(P, "error_500.json"), 500)
    if deployment != "gpt4o-prod":
        return json_response(fixture_json(P, "error_404.json"), 404)
    if body.get("stream"):
        assert body["stream_options"]["include_usage"] is True
        return await stream_response(request, fixture_bytes(P, "stream.sse"), "text/event-stream")
    return json_response(fixture_bytes(P, "response.json"))


fake = fake_upstream_fixture(_handler)


def _provider(base_url: str, **kw: Any) -> Any:
    settings: dict[str, Any] = {"api_key": KEY, **kw}
    return build_provider(ProviderSettings(id="az", type="azure", base_url=base_url, **settings))


def _target(model: str = "gpt4o-prod") -> Target:
    return Target("az", model, "az/gpt-4o")


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": "az/gpt-4o", "messages": [{"role": "user", "content": "Hi"}], **kw}


def test_urls() -> None:
    p = _provider("https://res.openai.azure.com")
    assert p.build_request("chat.completions", _chat(), _target(), False).url == (
        "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21")
    assert p.build_request("embeddings", {"input": "x"}, _target("emb"), False).url == (
        "https://res.openai.azure.com/openai/deployments/emb/embeddings?api-version=2024-10-21")
    v1 = _provider("https://res.openai.azure.com/openai/v1")
    req = v1.build_request("chat.completions", _chat(), _target(), False)
    assert req.url == "https://res.openai.azure.com/openai/v1/chat/completions"
    assert orjson.loads(req.body)["model"] == "gpt4o-prod"
    pinned = _provider("https://res.openai.azure.com", api_version="2025-04-01-preview")
    assert pinned.build_request("chat.completions", _chat(), _target(), False).url.endswith(
        "?api-version=2025-04-01-preview")
    env = az.AzureOpenAIProvider(ProviderSettings(id="a", type="azure", base_url="https://r", api_key=KEY),
                                 env={"AZURE_OPENAI_API_VERSION": "2024-06-01"})
    assert env.api_version == "2024-06-01"


def test_missing_credentials() -> None:
    none = az.AzureOpenAIProvider(ProviderSettings(id="a", type="azure", base_url="https://r"), env={})
    assert none.missing_credentials() == ["AZURE_OPENAI_API_KEY"]
    entra = az.AzureOpenAIProvider(ProviderSettings(id="a", type="azure", base_url="https://r", auth="entra"), env={})
    assert entra.missing_credentials() == ["AZURE_OPENAI_AD_TOKEN"]
    hdr = az.AzureOpenAIProvider(ProviderSettings(id="a", type="azure", base_url="https://r",
                                                  headers={"Authorization": "Bearer x"}), env={})
    assert hdr.missing_credentials() == []
    with pytest.raises(ValueError):
        az.AzureOpenAIProvider(ProviderSettings(id="a", type="azure", base_url="https://r", auth="magic"), env={})


def test_config_aliases_reach_the_azure_provider() -> None:
    loaded = load_config_text(f"""
providers:
  - {{id: az, type: remote::azure-openai, base_url: https://res.openai.azure.com/, api_key: {KEY}}}
auth: {{mode: none, allow_unauthenticated: true}}
""", env={})
    p = build_provider(loaded.settings.providers[0])
    assert isinstance(p, az.AzureOpenAIProvider) and p.missing_credentials() == []


async def test_plain_chat(fake: FakeUpstream) -> None:
    res = await call(_provider(fake.url), "chat.completions", _chat(), _target())
    rec = fake.received[-1]
    assert rec.path == "/openai/deployments/gpt4o-prod/chat/completions" and rec.query == {"api-version": VERSION}
    assert rec.headers["api-key"] == KEY and "authorization" not in rec.headers
    assert res.body is not None and res.body["model"] == "az/gpt-4o"
    assert res.body["choices"][0]["message"]["content"] == "Hello!"
    assert res.usage is not None and (res.usage.total_tokens, res.usage.cached_tokens) == (12, 0)


async def test_v1_surface_with_entra_token_file(fake: FakeUpstream, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    p = _provider(fake.url + "/openai/v1", api_key=None, api_key_file=str(token_file), auth="entra")
    res = await call(p, "chat.completions", _chat(), _target())
    rec = fake.received[-1]
    assert rec.path == "/openai/v1/chat/completions" and rec.query == {}
    assert rec.headers["authorization"] == f"Bearer {TOKEN}" and "api-key" not in rec.headers
    assert res.body is not None and res.body["choices"][0]["finish_reason"] == "stop"


async def test_streamed_answer_and_parallel_tool_calls(fake: FakeUpstream) -> None:
    res = await call(_provider(fake.url), "chat.completions", _chat(stream=True), _target(), stream=True)
    assert all(c["choices"] or c.get("usage") for c in res.chunks)  # Azure's prompt-filter chunk is dropped
    assert all(c["model"] == "az/gpt-4o" for c in res.chunks)
    acc = accumulate(res.chunks)
    c0 = acc["choices"][0]
    assert c0["content"] == "Hello" and c0["finish_reason"] == "tool_calls"
    assert [(t["id"], t["name"], orjson.loads(t["arguments"])) for t in c0["tool_calls"]] == [
        ("call_a", "get_weather", {"city": "Paris"}), ("call_b", "get_weather", {"city": "Tokyo"})]
    assert acc["usage"]["total_tokens"] == 70
    res2 = await call(_provider(fake.url), "chat.completions", _chat(stream=True), _target(), stream=True,
                      want_usage=False)
    assert all(c["choices"] for c in res2.chunks) and res2.usage is not None and res2.usage.total_tokens == 70


async def test_429_keeps_retry_after(fake: FakeUpstream) -> None:
    res = await call(_provider(fake.url), "chat.completions", _chat(), _target("gpt4o-429"))
    assert isinstance(res.error, RateLimited)
    assert res.error.headers == {"retry-after": "6", "retry-after-ms": "5800"}
    assert res.error.code == "rate_limit_exceeded" and "exceeded token rate limit" in res.error.message


async def test_500_and_unknown_deployment(fake: FakeUpstream) -> None:
    res = await call(_provider(fake.url), "chat.completions", _chat(), _target("gpt4o-500"))
    assert isinstance(res.error, UpstreamError) and (res.error.status, res.error.type) == (500, "api_error")
    res = await call(_provider(fake.url), "chat.completions", _chat(), _target("nope"))
    assert res.error is not None and (res.error.status, res.error.code) == (404, "DeploymentNotFound")


async def test_bad_key_is_an_upstream_auth_failure(fake: FakeUpstream) -> None:
    res = await call(_provider(fake.url, api_key="wrong-key-123"), "chat.completions", _chat(), _target())
    assert res.error is not None and (res.error.status, res.error.code) == (502, "upstream_auth_failed")
