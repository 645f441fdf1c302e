"""Issue 19.6: every provider type sends the proxy's request id upstream (and the caller's own id), so a request
can be found in the upstream's log; on Bedrock the headers stay outside the SigV4 signature."""

from __future__ import annotations

import re
import uuid

import pytest

from .test_e2e_sdk import HELLO, PROVIDERS, PUBLIC_MODEL, Env, ask, env  # noqa: F401 (env is a fixture)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_ids_reach_every_provider(env: Env, provider: str) -> None:  # noqa: F811
    raw = env.client.chat.completions.with_raw_response.create(
        model=PUBLIC_MODEL[provider], messages=ask(HELLO), extra_headers={"x-client-request-id": "ide.run-9"})
    assert raw.status_code == 200  # Bedrock's fake verified the SigV4 signature
    received = env.fakes[provider].received[-1].headers
    assert "req_" + received["x-request-id"] == raw.headers["x-request-id"]
    uuid.UUID(received["x-request-id"])  # 32 hex digits: llama-cpp-python's server refuses any other form
    assert received["x-client-request-id"] == "ide.run-9"
    if provider == "bedrock":
        m = re.search(r"SignedHeaders=([a-z0-9;-]+)", received["authorization"])
        assert m is not None and "x-request-id" not in m[1].split(";")
