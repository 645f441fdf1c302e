"""Config loading: native format, llama-stack run.yaml, env substitution, every problem reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_proxy.config import load_config, load_config_text
from llm_proxy.errors import ConfigError

SEED = Path(__file__).parent / "fixtures" / "seed"

NATIVE = """
server: {port: 9000}
providers:
  - id: openai
    type: openai
    api_key: ${env.OPENAI_API_KEY}
  - id: local
    type: remote::vllm
    base_url: ${env.VLLM_URL:=http://127.0.0.1:8000/v1}
models:
  - {id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o, aliases: [proxied-model]}
  - {id: local/llama, provider: local, upstream_model: meta-llama/Llama-3.1-8B}
auth: {mode: none, allow_unauthenticated: true}
"""


def test_native_config_with_substitution() -> None:
    loaded = load_config_text(NATIVE, env={"OPENAI_API_KEY": "sk-1"})
    s = loaded.settings
    assert loaded.source == "native"
    assert s.server.port == 9000
    assert s.providers[0].api_key == "sk-1"
    assert s.providers[1].type == "vllm"
    assert s.providers[1].base_url == "http://127.0.0.1:8000/v1"
    assert s.models[0].aliases == ["proxied-model"]
    assert loaded.disabled_providers == {}


def test_unset_key_disables_only_that_provider() -> None:
    loaded = load_config_text(NATIVE, env={})
    assert set(loaded.disabled_providers) == {"openai"}
    assert "OPENAI_API_KEY" in loaded.disabled_providers["openai"]


def test_alt_and_broken_default_forms() -> None:
    text = """
providers:
  - id: az
    type: remote::azure-openai
    api_key: k
    base_url: https://x.openai.azure.com
    api_version: ${env.AZURE_OPENAI_API_VERSION:2024-02-15-preview}
    headers:
      x-extra: "${env.EXTRA:+yes}"
auth: {mode: none, allow_unauthenticated: true}
"""
    loaded = load_config_text(text, env={"EXTRA": "1"})
    p = loaded.settings.providers[0]
    assert p.type == "azure"
    assert p.api_version == "2024-02-15-preview"
    assert p.headers == {"x-extra": "yes"}
    broken = [w for w in loaded.warnings if "AZURE_OPENAI_API_VERSION" in w]
    assert broken and ":7:" in broken[0], loaded.warnings  # names the line


def test_every_problem_reported_at_once() -> None:
    text = """
providers:
  - {id: a, type: remote::nonsense}
  - {id: b, type: openai, api_key: k, base_url: "ftp://nowhere"}
  - {id: b, type: openai, api_key: k}
models:
  - {id: m, provider: b, upstream_model: x}
  - {id: m, provider: b, upstream_model: y}
  - {id: n, provider: missing, upstream_model: y}
auth:
  mode: oidc
  oidc:
    issuers: [{issuer: "${env.KEYCLOAK_ISSUER}", audiences: []}]
"""
    with pytest.raises(ConfigError) as ei:
        load_config_text(text, env={})
    problems = "\n".join(ei.value.problems)
    assert "unknown provider type 'remote::nonsense'" in problems
    assert "remote::openai" in problems  # the list of known types
    assert "not an http(s) URL" in problems
    assert "duplicate provider id 'b'" in problems
    assert "duplicate model id 'm'" in problems
    assert "unknown provider 'missing'" in problems
    assert "KEYCLOAK_ISSUER is not set" in problems
    assert "at least one audience" in problems
    assert len(ei.value.problems) >= 7


def test_unknown_keys_warn_not_dropped_silently() -> None:
    loaded = load_config_text(
        "providers: []\nauth: {mode: none, allow_unauthenticated: true}\nsrever: {port: 1}\n"
        "server: {prot: 2}\n",
        env={},
    )
    assert any("srever" in w for w in loaded.warnings)
    assert any("server.prot" in w for w in loaded.warnings)


def test_none_auth_requires_explicit_opt_in() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config_text("providers: []\n", env={})
    assert "allow_unauthenticated" in ei.value.problems[0]


def test_seed_run_yaml_maps_to_native_model() -> None:
    loaded = load_config(SEED / "run.yaml", env={"OPENAI_API_KEY": "dummy", "POSTGRESQL_PASSWORD": "p@ss/w"})
    s = loaded.settings
    assert loaded.source == "llama-stack"
    assert s.server.port == 8321
    (p,) = s.providers
    assert (p.id, p.type, p.api_key) == ("openai", "openai", "dummy")
    assert p.base_url == "http://llemulator.konveyor-tackle.svc.cluster.local/v1"
    (m,) = s.models
    assert (m.id, m.upstream_model, m.aliases) == ("openai/gpt-4o", "gpt-4o", ["proxied-model"])
    assert s.database.url == "postgresql+asyncpg://kai:p%40ss%2Fw@kai-db.konveyor-tackle.svc:5432/kai"
    assert s.auth.mode == "oidc"
    (iss,) = s.auth.oidc.issuers
    assert iss.issuer == "http://keycloak-sso.konveyor-tackle.svc:8080/auth/realms/tackle"
    assert iss.jwks_uri == "http://keycloak-sso:8080/auth/realms/tackle/protocol/openid-connect/certs"
    assert iss.audiences == ["konveyor-api"]
    assert loaded.warnings == []  # everything in the seed is understood
    assert any("telemetry" in n for n in loaded.notes)


def test_seed_without_keys_disables_provider_and_reports_db_password() -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(SEED / "run.yaml", env={})
    # The DB password is needed for the ledger: reported; the missing OpenAI key is not fatal.
    assert any("POSTGRESQL_PASSWORD" in p for p in ei.value.problems)
    assert not any("OPENAI_API_KEY" in p for p in ei.value.problems)
    loaded = load_config(SEED / "run.yaml", env={"POSTGRESQL_PASSWORD": "x"})
    assert "openai" in loaded.disabled_providers


def test_llama_stack_without_auth_serves_unauthenticated_with_warning() -> None:
    loaded = load_config(SEED / "run-noauth.yaml", env={"OPENAI_API_KEY": "k", "POSTGRESQL_PASSWORD": "x"})
    assert loaded.settings.auth.mode == "none"
    assert any("WITHOUT authentication" in w for w in loaded.warnings)


def test_llama_stack_without_models_passes_provider_models_through() -> None:
    text = """
version: 2
providers:
  inference:
  - {provider_id: ollama, provider_type: remote::ollama, config: {url: "http://127.0.0.1:11434/v1"}}
registered_resources:
  models: []
"""
    loaded = load_config_text(text, env={})
    (p,) = loaded.settings.providers
    assert p.passthrough_models and p.base_url == "http://127.0.0.1:11434/v1"


def test_default_key_env_and_provider_id_fallback() -> None:
    text = """
providers:
  - {id: my-gemini.prod, type: remote::google}
  - {id: corp-llm, type: openai}
auth: {mode: none, allow_unauthenticated: true}
"""
    loaded = load_config_text(text, env={"GOOGLE_API_KEY": "g", "CORP_LLM_API_KEY": "c"})
    assert [p.api_key for p in loaded.settings.providers] == ["g", "c"]
    assert [p.type for p in loaded.settings.providers] == ["gemini", "openai"]


def test_llama_stack_claims_mapping_is_translated() -> None:
    text = """
version: 2
providers:
  inference: [{provider_id: openai, provider_type: remote::openai, config: {api_key: k}}]
server:
  auth:
    provider_config:
      type: oauth2_token
      issuer: https://kc.example/realms/r
      audience: konveyor-api
      jwks: {uri: "https://kc.example/realms/r/protocol/openid-connect/certs", key_recheck_period: 600}
      claims_mapping: {"realm_access.roles": roles, groups: teams, sub: namespaces}
"""
    oidc = load_config_text(text, env={}).settings.auth.oidc
    assert oidc.claims_mapping == {"roles": "realm_access.roles", "groups": "groups,sub"}
    assert oidc.key_recheck_period == 600
