"""Attacks on bearer-token authentication, each one a single clear assertion on the proxy's answer."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from ..helpers import ProxyServer
from .conftest import OCT_SECRET, LocalIdP, OpenIDProvider
from .util import Reply, assemble, b64, bearer, parts, request


@pytest.fixture(autouse=True)
def _capture_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.DEBUG)
    yield


def rejected(reply: Reply, reason: str, token: str | None = None, caplog: pytest.LogCaptureFixture | None = None,
             status: int = 401) -> None:
    """The OpenAI-shaped error with `reason` in its message, WWW-Authenticate on 401, the token echoed nowhere."""
    assert reply.status == status, reply.body
    err = reply.error
    assert reason in err["message"], err["message"]
    if status == 401:
        assert err["type"] == "authentication_error"
        assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")
    if token:
        for piece in {token, *token.split(".")} - {""}:
            if len(piece) > 8:
                assert piece not in reply.body.decode()
                if caplog is not None:
                    assert piece not in caplog.text
                    for rec in caplog.records:
                        assert piece not in json.dumps(rec.__dict__, default=str)


def op_token(op: OpenIDProvider) -> str:
    return op.token("llm-cli", user="alice")


# ---- algorithm confusion ---------------------------------------------------------------------------


def test_alg_none(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider, caplog: pytest.LogCaptureFixture) -> None:
    header, payload, _ = parts(op_token(oidc_provider))
    forged = assemble({**header, "alg": "none"}, {**payload, "realm_access": {"roles": ["llm-admin"]}}, "")
    rejected(bearer(oidc_proxy, forged), "signature algorithm 'none' is not allowed", forged, caplog)


def test_hs256_signed_with_the_rsa_public_key_pem(
    oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider, caplog: pytest.LogCaptureFixture
) -> None:
    header, payload, _ = parts(op_token(oidc_provider))
    rsa_jwk = next(k for k in oidc_provider.jwks()["keys"] if k["kid"] == header["kid"])
    pem = RSAAlgorithm.from_jwk(rsa_jwk).public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    h = b64(json.dumps({**header, "alg": "HS256"}).encode())
    p = b64(json.dumps(payload).encode())
    sig = b64(hmac.new(pem, f"{h}.{p}".encode(), hashlib.sha256).digest())
    forged = f"{h}.{p}.{sig}"
    rejected(bearer(oidc_proxy, forged), "signature algorithm 'HS256' is not allowed", forged, caplog)


def test_jwks_oct_key_is_never_used(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    # The forge realm's JWKS also serves {"kty": "oct", "kid": "forge-oct"}; its RSA/EC keys still work.
    assert bearer(oidc_proxy, local_idp.sign("forge")).status == 200
    hs = local_idp.sign("forge", alg="HS256", kid="forge-oct", key=OCT_SECRET)
    rejected(bearer(oidc_proxy, hs), "signature algorithm 'HS256' is not allowed", hs)
    # Claiming an asymmetric alg under the oct key's kid finds no key: the oct key was ignored when loaded.
    rs = local_idp.sign("forge", kid="forge-oct")
    rejected(bearer(oidc_proxy, rs), "signing key ('kid') is unknown", rs)


def test_header_alg_must_fit_the_key(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    # RS256 under the EC key's kid: the alg in the header is allowed, but not for that key.
    token = local_idp.sign("forge", alg="RS256", kid="forge-ec")
    rejected(bearer(oidc_proxy, token), "does not match the signing key", token)
    # PS256 with the RSA key whose JWK pins RS256.
    token = local_idp.sign("forge", alg="PS256", kid="forge-rsa")
    rejected(bearer(oidc_proxy, token), "does not match the signing key", token)


# ---- claims ----------------------------------------------------------------------------------------


def test_expired(oidc_proxy: ProxyServer, local_idp: LocalIdP, caplog: pytest.LogCaptureFixture) -> None:
    now = int(time.time())
    token = local_idp.sign("forge", iat=now - 7200, exp=now - 3600)
    rejected(bearer(oidc_proxy, token), "token has expired", token, caplog)


def test_expired_within_leeway_is_accepted(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    now = int(time.time())
    assert bearer(oidc_proxy, local_idp.sign("forge", iat=now - 600, exp=now - 5)).status == 200


def test_nbf_in_the_future(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", nbf=int(time.time()) + 3600)
    rejected(bearer(oidc_proxy, token), "token is not valid yet ('nbf')", token)


def test_iat_in_the_future(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", iat=int(time.time()) + 3600)
    rejected(bearer(oidc_proxy, token), "token was issued in the future ('iat')", token)


def test_no_exp(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", exp=None)
    rejected(bearer(oidc_proxy, token), "token has no expiry ('exp')", token)


def test_wrong_iss_is_logged_with_the_trusted_list_but_not_the_token(
    oidc_proxy: ProxyServer, local_idp: LocalIdP, oidc_provider: OpenIDProvider, caplog: pytest.LogCaptureFixture
) -> None:
    evil = "https://evil.example.com/realms/konveyor"
    token = local_idp.sign("forge", iss=evil)
    rejected(bearer(oidc_proxy, token), "issuer ('iss') is not trusted", token, caplog)
    warning = next(r for r in caplog.records if r.levelno == logging.WARNING and "not trusted" in r.getMessage())
    assert evil in warning.getMessage()
    assert oidc_provider.issuer in warning.getMessage()
    assert local_idp.issuer("forge") in warning.getMessage()


def test_issuer_must_match_exactly(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", iss=local_idp.issuer("forge") + "/")
    rejected(bearer(oidc_proxy, token), "issuer ('iss') is not trusted", token)


def test_wrong_aud(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", aud=["account", "other-api"])
    rejected(bearer(oidc_proxy, token), "audience ('aud') is not accepted", token)


def test_azp_is_not_an_audience_unless_accept_azp(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", aud="account", azp="konveyor-api")
    rejected(bearer(oidc_proxy, token), "audience ('aud') is not accepted", token)


def test_id_and_other_non_access_tokens(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    id_token = local_idp.sign("forge", typ="ID")  # Keycloak marks its ID tokens in the payload
    rejected(bearer(oidc_proxy, id_token), "not an access token", id_token)
    logout = local_idp.sign("forge", headers={"typ": "logout+jwt"})
    rejected(bearer(oidc_proxy, logout), "token type ('typ') is not an access token", logout)
    assert bearer(oidc_proxy, local_idp.sign("forge", typ="Bearer", headers={"typ": "JWT"})).status == 200


def test_no_subject(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", sub=None)
    rejected(bearer(oidc_proxy, token), "token has no subject", token)


# ---- keys and signatures ---------------------------------------------------------------------------


def test_unknown_kid(oidc_proxy: ProxyServer, local_idp: LocalIdP, caplog: pytest.LogCaptureFixture) -> None:
    token = local_idp.sign("forge", kid="no-such-kid")
    rejected(bearer(oidc_proxy, token), "signing key ('kid') is unknown", token, caplog)


def test_tampered_payload(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider,
                          caplog: pytest.LogCaptureFixture) -> None:
    header, payload, sig = parts(op_token(oidc_provider))
    forged = assemble(header, {**payload, "realm_access": {"roles": ["llm-admin"]}}, sig)
    rejected(bearer(oidc_proxy, forged), "signature is invalid", forged, caplog)


def test_tampered_header(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    token = op_token(oidc_provider)
    h, p, s = token.split(".")
    header, _, _ = parts(token)
    forged = f"{b64(json.dumps({**header, 'typ': 'JWT'}).encode())}.{p}.{s}"
    assert forged.split(".")[0] != h
    rejected(bearer(oidc_proxy, forged), "signature is invalid", forged)


def test_signed_by_another_key_under_a_known_kid(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    header, payload, _ = parts(op_token(oidc_provider))
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(payload, other, algorithm="RS256", headers={"kid": header["kid"], "typ": "at+jwt"})
    rejected(bearer(oidc_proxy, forged), "signature is invalid", forged)


def test_signature_is_checked_on_a_valid_looking_es256_token(
    oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider
) -> None:
    token = oidc_provider.token("llm-cli-es", user="alice")
    h, p, s = token.split(".")
    flipped = s[:-2] + ("A" if s[-2] != "A" else "B") + s[-1]
    rejected(bearer(oidc_proxy, f"{h}.{p}.{flipped}"), "signature is invalid")


# ---- the Authorization header itself ---------------------------------------------------------------


def test_missing_token(oidc_proxy: ProxyServer) -> None:
    reply = request(oidc_proxy, [])
    rejected(reply, "Missing bearer token")


def test_100_kb_token_is_rejected_before_parsing(oidc_proxy: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    # Over server.max_authorization_bytes (32 KiB): the HTTP layer answers 431 and echoes none of it.
    huge = "eyJ" + "A" * (100 * 1024)
    rejected(bearer(oidc_proxy, huge), "Request headers are larger than the limit", huge, caplog, status=431)
    # Under it, auth gets the token and refuses it with its own reason.
    rejected(bearer(oidc_proxy, "eyJ" + "A" * (20 * 1024)), "token is larger than 16384 bytes")


def test_just_over_16_kb(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    token = local_idp.sign("forge", padding="x" * 16 * 1024)
    assert len(token) > 16 * 1024
    rejected(bearer(oidc_proxy, token), "token is larger than 16384 bytes", token)


def test_non_bearer_scheme(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    token = op_token(oidc_provider)
    rejected(request(oidc_proxy, [("Authorization", "Basic YWxpY2U6YWxpY2UtcGFzc3dvcmQ=")]), "only 'Bearer'")
    rejected(request(oidc_proxy, [("Authorization", f"Token {token}")]), "only 'Bearer'", token)


def test_two_authorization_headers(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider) -> None:
    token = op_token(oidc_provider)
    assert bearer(oidc_proxy, token).status == 200
    reply = request(oidc_proxy, [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")])
    rejected(reply, "more than one Authorization header", token)


@pytest.mark.parametrize("value", ["Bearer {t} {t}", "Bearer {t},Bearer {t}", "Bearer {t}, {t}", "Bearer {t}\t{t}"])
def test_two_tokens_in_one_header(oidc_proxy: ProxyServer, oidc_provider: OpenIDProvider, value: str) -> None:
    token = op_token(oidc_provider)
    reply = request(oidc_proxy, [("Authorization", value.format(t=token))])
    rejected(reply, "more than one token", token)
    assert "JWE" not in reply.error["message"]


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-jwt", "malformed token"),
        ("a.b.c.d.e", "encrypted tokens (JWE) are not supported"),
        ("e30.e30.", "signature algorithm 'unsupported' is not allowed"),
        ("%%%.e30.e30", "malformed token"),
        ("bm90IGpzb24.e30.AAAA", "header is not base64url-encoded JSON"),
    ],
)
def test_malformed_tokens(oidc_proxy: ProxyServer, token: str, reason: str) -> None:
    rejected(bearer(oidc_proxy, token), reason)


# ---- the identity provider going away -------------------------------------------------------------


def test_jwks_down_with_cached_keys_still_works(oidc_proxy: ProxyServer, local_idp: LocalIdP) -> None:
    realm = local_idp.realms["cached"]
    assert bearer(oidc_proxy, local_idp.sign("cached")).status == 200
    realm.up = False
    try:
        fresh = local_idp.sign("cached", alg="ES256")  # never seen before: verified with the cached EC key
        assert bearer(oidc_proxy, fresh).status == 200
        # A kid the cache lacks cannot be looked up while the IdP is away: 503, not a misleading 401.
        unknown = local_idp.sign("cached", kid="rotated-in-while-down")
        rejected(bearer(oidc_proxy, unknown), "identity provider cannot be reached", status=503)
        assert bearer(oidc_proxy, unknown).error["code"] == "auth_unavailable"
    finally:
        realm.up = True


def test_jwks_down_without_cached_keys_is_503_until_keys_arrive(
    oidc_proxy: ProxyServer, local_idp: LocalIdP
) -> None:
    realm = local_idp.realms["cold"]
    token = local_idp.sign("cold")
    reply = bearer(oidc_proxy, token)
    rejected(reply, "signing keys could not be loaded", token, status=503)
    assert reply.error["code"] == "auth_unavailable"
    health = oidc_proxy.lt.call(oidc_proxy.services.authenticator.health)
    cold = health["issuers"][local_idp.issuer("cold")]
    assert cold["keys"] == 0 and "HTTP 503" in cold["error"]
    assert health["ok"] is False  # not ready while any trusted issuer has no keys (the others still serve)
    assert health["failing_issuers"] == [local_idp.issuer("cold")]

    realm.up = True  # the IdP comes back: the next request fetches the keys, no restart
    try:
        assert bearer(oidc_proxy, token).status == 200
    finally:
        realm.up = False


def test_health_endpoints_need_no_token(oidc_proxy: ProxyServer) -> None:
    assert request(oidc_proxy, [], method="GET", path="/v1/health", body=None).status == 200
    ready = request(oidc_proxy, [], method="GET", path="/v1/health/ready", body=None)
    assert ready.json()["checks"]["auth"]["mode"] == "oidc"
