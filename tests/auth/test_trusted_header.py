"""trusted_header mode: identity headers honoured only with the shared secret or from a trusted network."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llm_proxy.auth.trusted_header import TrustedHeaderAuthenticator
from llm_proxy.config import TrustedHeaderSettings
from llm_proxy.errors import Unauthorized

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .conftest import POLICY
from .util import proxy_config, request

SECRET = "s3cr3t-from-the-oauth2-proxy-sidecar"
ALICE = [("X-Forwarded-User", "alice-id"), ("X-Forwarded-Preferred-Username", "alice"),
         ("X-Forwarded-Email", "alice@example.com"), ("X-Forwarded-Groups", "/llm-users, /team-a"),
         ("X-Forwarded-Roles", "llm-user")]


def config(emulator_url: str, trusted: str) -> str:
    return proxy_config(emulator_url, f"auth:\n  mode: trusted_header\n  trusted_header:\n{trusted}\n{POLICY}")


@pytest.fixture(scope="module")
def secret_proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    trusted = f"    secret: {SECRET}\n    trusted_networks: [192.0.2.0/24]"
    with ProxyServer(native_config(config(emulator.base_url, trusted))) as px:
        yield px


@pytest.fixture(scope="module")
def network_proxy(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(config(emulator.base_url, "    trusted_networks: [127.0.0.0/8, '::1/128']"))) as px:
        yield px


def test_secret_admits_the_identity(secret_proxy: ProxyServer) -> None:
    assert request(secret_proxy, [("X-LLM-Proxy-Secret", SECRET), *ALICE]).status == 200


def test_without_secret_from_an_untrusted_network(secret_proxy: ProxyServer) -> None:
    reply = request(secret_proxy, ALICE)
    assert reply.status == 401
    assert "trusted authenticating proxy" in reply.error["message"]
    assert "WWW-Authenticate" not in reply.headers  # no bearer token to offer: the gateway in front logs users in


def test_wrong_secret(secret_proxy: ProxyServer) -> None:
    reply = request(secret_proxy, [("X-LLM-Proxy-Secret", SECRET[:-1] + "X"), *ALICE])
    assert reply.status == 401
    assert SECRET not in reply.body.decode()


def test_policy_applies_to_header_identities(secret_proxy: ProxyServer) -> None:
    reply = request(secret_proxy, [("X-LLM-Proxy-Secret", SECRET), *ALICE],
                    body={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status == 403
    assert reply.error["code"] == "model_not_allowed"


def test_trusted_network_needs_no_secret(network_proxy: ProxyServer) -> None:
    assert request(network_proxy, ALICE).status == 200


def test_missing_subject_header(network_proxy: ProxyServer) -> None:
    reply = request(network_proxy, [("X-Forwarded-Email", "x@example.com")])
    assert reply.status == 401
    assert "x-forwarded-user" in reply.error["message"]


async def test_principal_and_peer_matching() -> None:
    auth = TrustedHeaderAuthenticator(
        TrustedHeaderSettings(secret=SECRET, trusted_networks=["10.0.0.0/8", "2001:db8::/32"])
    )
    headers = dict(ALICE)
    p = await auth.authenticate(headers, "10.1.2.3")
    assert (p.subject, p.username, p.email) == ("alice-id", "alice", "alice@example.com")
    assert p.groups == ("/llm-users", "/team-a") and p.roles == ("llm-user",)
    assert p.auth_method == "trusted_header"
    hash(p)
    assert await auth.authenticate(headers, "::ffff:10.9.9.9")  # IPv4-mapped IPv6 peer
    assert await auth.authenticate(headers, "2001:db8::1")
    assert await auth.authenticate({**headers, "x-llm-proxy-secret": SECRET}, "203.0.113.9")
    for peer in ("203.0.113.9", "11.0.0.1", None, "not-an-ip"):
        with pytest.raises(Unauthorized):
            await auth.authenticate(headers, peer)
    with pytest.raises(Unauthorized):  # a presented secret must be right, even from a trusted network
        await auth.authenticate({**headers, "x-llm-proxy-secret": "wrong"}, "10.1.2.3")


def test_bad_network_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="not a CIDR"):
        TrustedHeaderAuthenticator(TrustedHeaderSettings(trusted_networks=["10.0.0.0/33"]))
