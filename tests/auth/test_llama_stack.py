"""A llama-stack run.yaml with server.auth oauth2_token works end to end with a token from the real OP."""

from __future__ import annotations

import openai
import pytest

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .conftest import OpenIDProvider

RUN_YAML = """
version: 2
image_name: konveyor
apis: [inference]
providers:
  inference:
    - provider_id: openai
      provider_type: remote::openai
      config:
        api_key: ${{env.OPENAI_API_KEY}}
        base_url: {base_url}
registered_resources:
  models:
    - model_id: proxied-model
      provider_id: openai
      model_type: llm
      provider_model_id: gpt-4o
server:
  port: 8321
  auth:
    provider_config:
      type: oauth2_token
      issuer: {issuer}
      audience: konveyor-api
      jwks:
        uri: {jwks_uri}
"""


def test_run_yaml_oauth2_token(emulator: Emulator, oidc_provider: OpenIDProvider) -> None:
    text = RUN_YAML.format(base_url=emulator.base_url, issuer=oidc_provider.issuer, jwks_uri=oidc_provider.jwks_uri)
    loaded = native_config(text, env={"OPENAI_API_KEY": "sk-upstream-secret-0123456789"})
    assert loaded.source == "llama-stack"
    assert loaded.settings.auth.mode == "oidc"
    loaded.settings.server.drain_delay_seconds = 0  # run.yaml cannot say it; keep the test's shutdown quick
    with ProxyServer(loaded) as px:
        token = oidc_provider.token("llm-cli", user="alice")
        c = openai.OpenAI(base_url=px.base_url, api_key=token, max_retries=0, timeout=20)
        reply = c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert reply.choices[0].message.content == "Echo: hi"
        assert c.chat.completions.create(model="proxied-model", messages=[{"role": "user", "content": "x"}]).choices

        anonymous = openai.OpenAI(base_url=px.base_url, api_key="not-a-token", max_retries=0, timeout=20)
        with pytest.raises(openai.AuthenticationError) as exc:
            anonymous.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 401
        assert "not-a-token" not in str(exc.value)
