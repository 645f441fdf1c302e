"""Dotted claims_mapping from Keycloak-shaped claims to a Principal."""

from __future__ import annotations

import pytest

from llm_proxy.auth.claims import ClaimsMapper, claim_path

KEYCLOAK = {
    "sub": "u-1",
    "preferred_username": "alice",
    "email": "alice@example.com",
    "groups": ["/llm-users", "/team-a"],
    "realm_access": {"roles": ["llm-user", "offline_access"]},
    "resource_access": {"konveyor-api": {"roles": ["chat"]}, "my.client": {"roles": ["dotted"]}},
    "scope": "openid email models:read",
    "custom": {"team": {"name": "blue"}, "tags": ["x", 3, None, "y"]},
}


def test_claim_path() -> None:
    assert claim_path(KEYCLOAK, "realm_access.roles") == ["llm-user", "offline_access"]
    assert claim_path(KEYCLOAK, "resource_access.my.client.roles") == ["dotted"]  # a key with dots
    assert claim_path(KEYCLOAK, "custom.team.name") == "blue"
    assert claim_path(KEYCLOAK, "custom.team.missing") is None
    assert claim_path(KEYCLOAK, "email.domain") is None


def test_default_mapping_is_keycloak() -> None:
    p = ClaimsMapper(client_ids=["konveyor-api"]).principal(KEYCLOAK, issuer="https://kc/realms/r", auth_method="oidc")
    assert p is not None
    assert (p.subject, p.username, p.email) == ("u-1", "alice", "alice@example.com")
    assert p.groups == ("/llm-users", "/team-a")
    assert p.roles == ("llm-user", "offline_access", "chat")
    assert p.scopes == ("openid", "email", "models:read")
    assert isinstance(p.roles, tuple)
    hash(p)


def test_custom_mapping() -> None:
    mapper = ClaimsMapper({
        "username": "email",
        "groups": "custom.team.name",
        "roles": "realm_access.roles, resource_access.my.client.roles",
        "scopes": "custom.tags",
    })
    p = mapper.principal(KEYCLOAK, issuer=None, auth_method="oidc")
    assert p is not None
    assert p.username == "alice@example.com"
    assert p.groups == ("blue",)
    assert p.roles == ("llm-user", "offline_access", "dotted")
    assert p.scopes == ("x", "y")


def test_missing_subject_gives_no_principal() -> None:
    assert ClaimsMapper().principal({"preferred_username": "x"}, issuer=None, auth_method="oidc") is None


def test_unknown_mapping_key_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown key 'team'"):
        ClaimsMapper({"team": "groups"})
