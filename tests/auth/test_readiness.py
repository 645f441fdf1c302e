"""Readiness with several OIDC issuers: ready only when every trusted issuer has signing keys; the 503 names the
issuers that have none."""

from __future__ import annotations

from typing import Any

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from .conftest import LocalIdP, oidc_proxy_config
from .util import bearer, request


def ready(px: ProxyServer) -> tuple[int, dict[str, Any]]:
    reply = request(px, [], method="GET", path="/v1/health/ready", body=None)
    return reply.status, reply.json()


def test_ready_only_when_every_issuer_has_keys(emulator: Emulator, local_idp: LocalIdP) -> None:
    local_idp.realm("ready-up")
    down = local_idp.realm("ready-down", up=False)
    up_iss, down_iss = local_idp.issuer("ready-up"), local_idp.issuer("ready-down")
    issuers = [
        {"issuer": up_iss, "jwks_uri": local_idp.jwks_uri("ready-up")},
        {"issuer": down_iss},  # by discovery, which fails too while the realm is down
    ]
    with ProxyServer(native_config(oidc_proxy_config(emulator.base_url, issuers))) as px:
        status, report = ready(px)
        assert status == 503
        assert report["status"] == "NOT_READY" and report["failing"] == ["auth"]
        auth = report["checks"]["auth"]
        assert auth["ok"] is False
        assert auth["failing_issuers"] == [down_iss]
        assert auth["issuers"][up_iss]["keys"] > 0
        assert auth["issuers"][down_iss]["keys"] == 0 and "HTTP 503" in auth["issuers"][down_iss]["error"]
        # The issuer that has keys still serves its users meanwhile; the other one's get 503, not 401.
        assert bearer(px, local_idp.sign("ready-up")).status == 200
        assert bearer(px, local_idp.sign("ready-down")).status == 503

        down.up = True  # the IdP comes back: the next token of that issuer loads its keys
        token = local_idp.sign("ready-down")
        # (the first may join a background retry that began while the realm was still down; a second cannot)
        assert 200 in (bearer(px, token).status, bearer(px, token).status)
        status, report = ready(px)
        assert status == 200, report
        assert report["checks"]["auth"]["ok"] is True and report["checks"]["auth"]["failing_issuers"] == []
