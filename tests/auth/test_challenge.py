"""WWW-Authenticate on 401: a Bearer challenge where the client can present a bearer token (oidc), none where its
identity comes from the authenticating gateway in front (trusted_header)."""

from __future__ import annotations

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .conftest import LocalIdP, oidc_proxy_config
from .test_trusted_header import ALICE, SECRET
from .test_trusted_header import config as trusted_header_config
from .util import request


def test_trusted_header_401_has_no_bearer_challenge_oidc_401_has_one(emulator: Emulator, local_idp: LocalIdP) -> None:
    trusted = f"    secret: {SECRET}\n    trusted_networks: [192.0.2.0/24]"
    with ProxyServer(native_config(trusted_header_config(emulator.base_url, trusted))) as px:
        rejections = {
            "untrusted peer, no secret": ALICE,
            "wrong secret": [("X-LLM-Proxy-Secret", SECRET + "x"), *ALICE],
            "no subject header": [("X-LLM-Proxy-Secret", SECRET), ("X-Forwarded-Email", "a@example.com")],
            "repeated subject header": [("X-LLM-Proxy-Secret", SECRET), *ALICE, ("X-Forwarded-User", "mallory")],
        }
        for case, headers in rejections.items():
            reply = request(px, headers)
            assert reply.status == 401, case
            assert reply.error["type"] == "authentication_error", case
            assert "WWW-Authenticate" not in reply.headers, case
        assert request(px, [("X-LLM-Proxy-Secret", SECRET), *ALICE]).status == 200

    local_idp.realm("challenge")
    issuers = [{"issuer": local_idp.issuer("challenge"), "jwks_uri": local_idp.jwks_uri("challenge")}]
    with ProxyServer(native_config(oidc_proxy_config(emulator.base_url, issuers))) as px:
        challenges = {
            "no token": ([], 'Bearer realm="llm-proxy"'),
            "malformed token": ([("Authorization", "Bearer not-a-jwt")], 'Bearer error="invalid_token"'),
            "expired token": (
                [("Authorization", "Bearer " + local_idp.sign("challenge", exp=1))],
                'Bearer error="invalid_token"',
            ),
        }
        for case, (headers, challenge) in challenges.items():
            reply = request(px, headers)
            assert reply.status == 401, case
            assert reply.headers.get("WWW-Authenticate") == challenge, case
        assert request(px, [("Authorization", "Bearer " + local_idp.sign("challenge"))]).status == 200
