"""Fuzzing the live proxy from its own OpenAPI document (`GET /openapi.json`) with schemathesis.

Every operation gets valid and invalid requests (schemathesis' positive and negative modes; half of the bodies
name a configured model so that the requests get past routing to the emulator upstream). Whatever is sent, the
proxy answers no 5xx and every error is OpenAI's envelope with the request id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from .conftest import Emulator
from .helpers import ProxyServer, native_config

MODEL = "openai/gpt-4o"


@pytest.fixture(scope="module")
def fuzz_proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    text = f"""
server: {{drain_delay_seconds: 0, access_log: false}}
providers:
  - {{id: openai, type: openai, base_url: "{emulator.base_url}", api_key: sk-fuzz-upstream-0123456789}}
models:
  - {{id: {MODEL}, provider: openai, upstream_model: gpt-4o}}
  - {{id: openai/embed, provider: openai, upstream_model: text-embedding-3-small, type: embedding}}
auth: {{mode: none, allow_unauthenticated: true}}
"""
    emulator.script({"reset": True})
    with ProxyServer(native_config(text)) as px:
        yield px


def test_openapi_document_is_served_and_names_the_validated_schemas(fuzz_proxy: ProxyServer) -> None:
    doc = requests.get(fuzz_proxy.url + "/openapi.json", timeout=10).json()
    assert doc["openapi"].startswith("3.1")
    schemas = doc["components"]["schemas"]
    assert schemas["ChatCompletionRequest"]["required"] == ["model", "messages"]
    assert schemas["ChatCompletionRequest"]["properties"]["n"]["maximum"] == 128
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses",
            "/v1/responses/{response_id}", "/v1/messages", "/v1/messages/count_tokens"} <= set(doc["paths"])
    assert schemas["ResponseRequest"]["required"] == ["model", "input"]
    assert schemas["MessageRequest"]["properties"]["stop_sequences"]["maxItems"] == 4


def _check(resp: requests.Response, where: str, anthropic: bool = False) -> None:
    assert resp.status_code < 500, f"{where}: {resp.status_code} {resp.text[:300]}"
    assert resp.headers.get("x-request-id"), where
    if resp.status_code >= 400:
        body = orjson.loads(resp.content)
        err = body["error"]
        if anthropic:  # the Messages routes answer in Anthropic's envelope
            assert body["type"] == "error" and set(err) == {"type", "message"}, where
        else:
            assert set(err) == {"message", "type", "param", "code"}, where
        assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str), where


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_every_operation(fuzz_proxy: ProxyServer, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(fuzz_proxy.url + "/openapi.json")
    session = requests.Session()
    ops = [r.ok() for r in schema.get_all_operations()]
    assert len(ops) >= 9
    for op in ops:
        raw = op.definition.raw
        if mode == GenerationMode.NEGATIVE and not (raw.get("requestBody") or raw.get("parameters")):
            continue  # nothing to get wrong
        where = f"{op.method.upper()} {op.path} ({mode.value})"

        @settings(max_examples=40, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), known_model=st.booleans())
        def run(case: Any, known_model: bool) -> None:
            if known_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = "openai/embed" if op.path.endswith("/embeddings") else MODEL
            resp = case.call(base_url=fuzz_proxy.url, session=session, timeout=30)
            _check(resp, where, anthropic=op.path.startswith("/v1/messages"))

        run()
