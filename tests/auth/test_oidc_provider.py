"""End to end against a real OpenID provider: openai SDK (api_key = access token) -> proxy -> emulator."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import jwt
import openai
import pytest
import pytest_asyncio

from llm_proxy.auth.oidc import OIDCAuthenticator
from llm_proxy.config import OIDCIssuerSettings, OIDCSettings

from ..conftest import Emulator
from ..helpers import ProxyServer
from .conftest import AUDIENCE, OpenIDProvider
from .util import bearer

MSG = [{"role": "user", "content": "hello through oidc"}]


def sdk(px: ProxyServer, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=px.base_url, api_key=token, max_retries=0, timeout=20)


def test_rs256_client_credentials_token(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider,
                                        emulator: Emulator) -> None:
    token = oidc_provider.token("llm-cli")
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    r = sdk(oidc_proxy, token).chat.completions.create(model="openai/gpt-4o", messages=MSG)
    assert r.choices[0].message.content == "Echo: hello through oidc"
    upstream = emulator.requests()[-1]["headers"]
    assert upstream.get("authorization") == "Bearer sk-upstream-secret-0123456789"
    assert token not in json.dumps(upstream)  # the caller's token never goes upstream


def test_es256_password_grant_token(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    token = oidc_provider.token("llm-cli-es", user="alice")
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    c = sdk(oidc_proxy, token)
    assert c.chat.completions.create(model="openai/gpt-4o", messages=MSG).choices[0].message.content
    assert [m.id for m in c.models.list()] == ["openai/gpt-4o"]  # the policy filters the listing


def test_external_route_issuer_of_the_same_realm(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    token = oidc_provider.token("llm-cli", user="alice", host="localhost")
    assert jwt.decode(token, options={"verify_signature": False})["iss"] == oidc_provider.issuer_for("localhost")
    assert sdk(oidc_proxy, token).chat.completions.create(model="openai/gpt-4o", messages=MSG).choices


def test_policy_forbids_models_the_roles_do_not_allow(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    alice = sdk(oidc_proxy, oidc_provider.token("llm-cli", user="alice"))  # llm-user: openai/gpt-4o only
    with pytest.raises(openai.PermissionDeniedError) as exc:
        alice.chat.completions.create(model="openai/gpt-4o-mini", messages=MSG)
    assert exc.value.status_code == 403
    assert exc.value.code == "model_not_allowed"

    bob = sdk(oidc_proxy, oidc_provider.token("llm-cli", user="bob"))  # guest: nothing
    with pytest.raises(openai.PermissionDeniedError):
        bob.chat.completions.create(model="openai/gpt-4o", messages=MSG)

    root = sdk(oidc_proxy, oidc_provider.token("llm-cli", user="root"))  # llm-admin: everything
    assert root.chat.completions.create(model="openai/gpt-4o-mini", messages=MSG).choices


def test_restart_rotates_keys_without_restarting_the_proxy(
    oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider
) -> None:
    old_rs = oidc_provider.token("llm-cli", user="alice")
    old_es = oidc_provider.token("llm-cli-es", user="alice")
    assert bearer(oidc_proxy, old_rs).status == 200
    assert bearer(oidc_proxy, old_es).status == 200  # both now in the verified-token cache
    old_kids = dict(oidc_provider.kids)

    oidc_provider.restart()
    assert set(oidc_provider.kids.values()).isdisjoint(old_kids.values())

    # A new token names a kid the proxy has never seen: one JWKS refresh picks the new keys up...
    new = oidc_provider.token("llm-cli", user="alice")
    assert bearer(oidc_proxy, new).status == 200
    assert bearer(oidc_proxy, oidc_provider.token("llm-cli-es", user="alice")).status == 200
    # ...and retires the old ones: tokens they signed fail, cached or not.
    for old in (old_rs, old_es):
        r = bearer(oidc_proxy, old)
        assert r.status == 401, r.body
        assert r.error["message"] == "Invalid bearer token: signing key ('kid') is unknown"


@pytest_asyncio.fixture
async def op_authenticator(oidc_provider: OpenIDProvider) -> AsyncIterator[OIDCAuthenticator]:
    settings = OIDCSettings(issuers=[OIDCIssuerSettings(issuer=oidc_provider.issuer, audiences=[AUDIENCE])])
    auth = OIDCAuthenticator(settings)
    await auth.start()
    yield auth
    await auth.close()


async def test_keycloak_claims_become_the_principal(
    op_authenticator: OIDCAuthenticator, oidc_provider: OpenIDProvider
) -> None:
    token = oidc_provider.token("llm-cli", user="alice", scope="openid models:read")
    p = await op_authenticator.authenticate({"Authorization": f"Bearer {token}"}, "127.0.0.1")
    assert p.subject == "f3b1c1a0-0000-4000-8000-00000000a11c"
    assert p.username == "alice"
    assert p.email == "alice@example.com"
    assert p.groups == ("/llm-users",)
    assert p.roles == ("llm-user", "offline_access", "chat")  # realm roles + resource_access.konveyor-api
    assert p.scopes == ("openid", "models:read")
    assert p.issuer == oidc_provider.issuer
    assert p.auth_method == "oidc"
    hash(p)  # principals key the policy cache

    svc = await op_authenticator.authenticate({"Authorization": f"Bearer {oidc_provider.token('llm-cli')}"}, None)
    assert svc.subject == "llm-cli"
    assert svc.username == "service-account-llm-cli"
    assert svc.roles == ("llm-user",)

    health = op_authenticator.health()
    assert health["ok"] is True
    entry = health["issuers"][oidc_provider.issuer]
    assert entry["keys"] == 2 and entry["error"] is None and entry["last_refresh"]
