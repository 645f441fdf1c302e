"""The IDE's real client: LangChain JS `ChatOpenAI` (npm @langchain/openai, pinned in tests/ide) through the proxy.

Konveyor's editor extension builds ChatOpenAI with the caller's bearer token as API key and the proxy as base URL.
Here the token comes from the real OpenID provider (tests/oidc), the proxy validates it (oidc mode) and forwards
to the emulator. One Node process runs every scenario (invoke, stream with and without streamed usage, bound
tools, streamed tool calls, a bad token) and reports what the client library itself saw.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Emulator
from .conftest_oidc import AUDIENCE, OpenIDProvider, ensure_node_modules, oidc_provider
from .helpers import ProxyServer, native_config

__all__ = ["oidc_provider"]

IDE_DIR = Path(__file__).parent / "ide"
MODEL = "openai/gpt-4o"


@pytest.fixture(scope="module")
def ide_proxy(emulator: Emulator, oidc_provider: OpenIDProvider) -> Iterator[ProxyServer]:
    text = f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 2}}
providers:
  - {{id: openai, type: openai, base_url: "{emulator.base_url}", api_key: sk-upstream-secret-0123456789}}
models:
  - {{id: {MODEL}, provider: openai, upstream_model: gpt-4o}}
auth:
  mode: oidc
  oidc:
    issuers:
      - {{issuer: "{oidc_provider.issuer}", audiences: [{AUDIENCE}]}}
"""
    with ProxyServer(native_config(text)) as px:
        yield px


def _run_client(cfg: dict[str, Any]) -> dict[str, Any]:
    ensure_node_modules(IDE_DIR, "@langchain/openai")
    proc = subprocess.run(
        ["node", "client.mjs", json.dumps(cfg)], cwd=IDE_DIR, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, f"client.mjs failed:\n{proc.stdout}\n{proc.stderr}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_langchain_js_chatopenai_through_the_proxy(
    ide_proxy: ProxyServer, emulator: Emulator, oidc_provider: OpenIDProvider
) -> None:
    calls = [{"name": "get_weather", "arguments": {"city": c}} for c in ("Paris", "Rome")]
    emulator.script({"reset": True, "responses": [
        "Hello, IDE.",
        "A streamed answer.",
        "Streamed without usage.",
        {"tool_calls": calls},
        {"tool_calls": calls},
    ]})
    token = oidc_provider.token(user="alice")
    out = _run_client({"baseURL": ide_proxy.base_url, "token": token, "badToken": token[:-4] + "AAAA", "model": MODEL})

    invoke = out["invoke"]
    assert invoke["ok"], invoke
    assert invoke["content"] == "Hello, IDE."
    assert invoke["usage"]["input_tokens"] > 0 and invoke["usage"]["output_tokens"] > 0
    assert invoke["model"] == MODEL  # the id the client asked for, not the upstream's

    stream = out["stream"]
    assert stream["ok"], stream
    assert stream["content"] == "A streamed answer." and stream["chunks"] > 2
    # ChatOpenAI asks for stream_options.include_usage: the usage chunk reaches it.
    assert stream["usage"] is not None and stream["usage"]["output_tokens"] > 0

    plain = out["stream_no_usage"]
    assert plain["ok"], plain
    # The proxy always asks the upstream for usage; a client that did not ask must not get the extra chunk.
    assert plain["content"] == "Streamed without usage." and plain["usage"] is None

    for name in ("tools", "stream_tools"):
        r = out[name]
        assert r["ok"], r
        assert [(c["name"], c["args"]) for c in r["tool_calls"]] == [
            ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
        assert all(c["id"] for c in r["tool_calls"])
    assert out["stream_tools"]["chunks"] > 2

    bad = out["bad_token"]
    assert not bad["ok"] and bad["status"] == 401, bad
    assert bad["code"] == "MODEL_AUTHENTICATION"  # LangChain's own classification of a 401

    # Every scripted answer was used by the five good calls; the bad token never reached the upstream.
    sent = [r for r in emulator.requests() if r["path"].endswith("/chat/completions")][-5:]
    assert [r["json"].get("stream", False) for r in sent] == [False, True, True, False, True]
    assert all(r["headers"].get("authorization", "").endswith("sk-upstream-secret-0123456789") for r in sent)
    assert sent[3]["json"]["tools"][0]["function"]["name"] == "get_weather"
