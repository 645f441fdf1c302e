"""The auth section's shapes: one mode or a list, what may be combined, the environment overrides."""

from __future__ import annotations

import pytest

from llm_proxy.auth.policy import RulePolicy
from llm_proxy.config import PolicySettings, load_config_text
from llm_proxy.errors import ConfigError
from llm_proxy.types import Principal


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config_text(text, env=env or {}, path="c.yaml")
    return err.value.problems


def test_single_mode_keeps_working_and_a_list_is_ordered() -> None:
    one = load_config_text("auth: {mode: api_keys}\n", env={}, path="c.yaml").settings.auth
    assert one.mode == "api_keys" and one.modes == ("api_keys",)
    text = "auth:\n  mode: [api_keys, hub]\n  hub: {url: 'http://hub:8080'}\n"
    both = load_config_text(text, env={}, path="c.yaml").settings.auth
    assert both.modes == ("api_keys", "hub") and both.mode_label == "api_keys,hub"


@pytest.mark.parametrize(
    ("mode", "needle"),
    [
        ("[api_keys, none]", "cannot be combined"),
        ("[oidc, trusted_header]", "cannot be combined"),
        ("[api_keys, api_keys]", "names a mode twice"),
        ("[]", "list of modes is empty"),
        ("kerberos", "auth.mode"),
    ],
)
def test_invalid_mode_lists(mode: str, needle: str) -> None:
    assert any(needle in p for p in problems(f"auth: {{mode: {mode}}}\n"))


def test_introspection_needs_its_endpoint_and_client_credentials() -> None:
    found = problems("auth: {mode: introspection}\n")
    assert any("auth.introspection.url" in p for p in found)
    assert any("client_id and client_secret" in p for p in found)
    userinfo = "auth: {mode: introspection, introspection: {kind: userinfo, url: 'https://idp/userinfo'}}\n"
    assert load_config_text(userinfo, env={}, path="c.yaml").settings.auth.introspection.kind == "userinfo"


def test_environment_overrides_a_native_config() -> None:
    env = {"LLM_PROXY_AUTH_MODE": "api_keys, hub", "LLM_PROXY_HUB_URL": "http://tackle-hub.ns.svc:8080",
           "LLM_PROXY_HUB_ISSUERS": "https://a.example/oidc, https://b.example/oidc"}
    loaded = load_config_text("auth: {mode: none, allow_unauthenticated: true}\n", env=env, path="c.yaml")
    auth = loaded.settings.auth
    assert auth.modes == ("api_keys", "hub")
    assert auth.hub.url == "http://tackle-hub.ns.svc:8080"
    assert auth.hub.issuers == ["https://a.example/oidc", "https://b.example/oidc"]
    assert any("LLM_PROXY_AUTH_MODE" in n for n in loaded.notes)
    assert any("LLM_PROXY_HUB_CACHE_TTL" in p for p in problems("{}\n", {**env, "LLM_PROXY_HUB_CACHE_TTL": "soon"}))


def test_an_api_key_is_limited_to_its_models_and_never_admin() -> None:
    rules = PolicySettings.model_validate(
        {"rules": [{"match": {}, "models": ["*"], "admin": True}]}
    )
    policy = RulePolicy(rules)
    key = Principal(subject="apikey:abc", auth_method="api_key", models=("openai/gpt-4o", "azure/*"))
    assert policy.may_use(key, "openai/gpt-4o") and policy.may_use(key, "azure/gpt-4o")
    assert not policy.may_use(key, "openai/gpt-4o-mini")
    assert not policy.is_admin(key)
    assert policy.is_admin(Principal(subject="someone"))
