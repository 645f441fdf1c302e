"""OIDC bearer-token authentication: JWT access tokens verified against trusted issuers' JWKS."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from jwt.algorithms import get_default_algorithms

from ..config import OIDCIssuerSettings, OIDCSettings
from ..errors import AuthUnavailable, Unauthorized
from ..types import Principal
from .claims import ClaimsMapper
from .headers import header_values
from .jwks import SUPPORTED_ALGORITHMS, Clock, Fetcher, KeySource, SigningKey, Timing, make_ssl_context

log = logging.getLogger("llm_proxy.auth")

MAX_TOKEN_BYTES = 16 * 1024
# How long a request waits for a JWKS fetch it needs (no keys yet, or an unknown kid) before giving up.
KEY_WAIT_SECONDS = 5.0
START_WAIT_SECONDS = 5.0
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_JWE_RE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){4}")
_SAFE_ALG = re.compile(r"[A-Za-z0-9+-]{1,16}")
# Keycloak's own token kinds, in its payload `typ`: only access tokens ("Bearer") may call the API.
_NOT_ACCESS_TOKENS = frozenset({"ID", "Refresh", "Logout", "Offline"})
_VERIFIERS = {name: alg for name, alg in get_default_algorithms().items() if name in SUPPORTED_ALGORITHMS}


def _reject(reason: str) -> Unauthorized:
    return Unauthorized(f"Invalid bearer token: {reason}")


def bearer_token(headers: Mapping[str, str]) -> str:
    """The token from the one `Authorization: Bearer` header, size-checked before anything parses it."""
    values = header_values(headers, "Authorization")
    if not values:
        raise Unauthorized(
            "Missing bearer token: send 'Authorization: Bearer <access token>'",
            headers={"WWW-Authenticate": 'Bearer realm="llm-proxy"'},
        )
    if len(values) > 1:
        raise Unauthorized("Invalid request: more than one Authorization header", headers={
            "WWW-Authenticate": 'Bearer error="invalid_request"'})
    value = values[0]
    if len(value) > MAX_TOKEN_BYTES + len("Bearer "):
        raise _reject(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("Invalid authorization scheme: only 'Bearer' tokens are accepted")
    token = token.strip()
    if not token:
        raise _reject("the Authorization header carries no token")
    if " " in token or "," in token or "\t" in token:
        raise Unauthorized("Invalid request: the Authorization header carries more than one token", headers={
            "WWW-Authenticate": 'Bearer error="invalid_request"'})
    if len(token.encode("utf-8", "surrogatepass")) > MAX_TOKEN_BYTES:
        raise _reject(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    return token


def _b64json(segment: str, what: str) -> dict[str, Any]:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        raise _reject(f"malformed token ({what} is not base64url-encoded JSON)") from None
    if not isinstance(value, dict):
        raise _reject(f"malformed token ({what} is not a JSON object)")
    return value


def _access_token_typ(typ: Any) -> bool:
    """JWT, or an access-token media type (at+jwt, application/at+jwt, vendor-at+jwt); not logout+jwt etc."""
    if not isinstance(typ, str):
        return False
    t = typ.lower().removeprefix("application/")
    return t == "jwt" or t.endswith("at+jwt")


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _reject(f"'{name}' claim is not a number")
    return float(value)


@dataclass(eq=False)
class _Issuer:
    settings: OIDCIssuerSettings
    algorithms: frozenset[str]
    audiences: frozenset[str]
    source: KeySource
    mapper: ClaimsMapper


@dataclass(eq=False)
class _Cached:
    principal: Principal
    expires: float
    key: SigningKey
    source: KeySource


class OIDCAuthenticator:
    """Authenticates `Authorization: Bearer <JWT>` against one or more trusted issuers."""

    mode = "oidc"

    def __init__(
        self,
        settings: OIDCSettings,
        *,
        cache_size: int = 10000,
        cache_seconds: float = 300.0,
        admin_check: Callable[[Principal], bool] | None = None,
        clock: Clock = time.time,
        auth_method: str = "oidc",
        audience_optional: bool = False,
        issuer_aliases: Sequence[str] = (),
    ) -> None:
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._auth_method = auth_method
        self._audience_optional = audience_optional
        self._admin_check = admin_check
        self._cache: OrderedDict[bytes, _Cached] = OrderedDict()
        self._cache_size = cache_size
        self._fetcher = Fetcher(make_ssl_context(settings.verify_tls, settings.tls_cafile))
        timing = Timing(settings.key_recheck_period, settings.stale_keys_seconds, settings.min_refresh_interval)
        self._sources: dict[str, KeySource] = {}
        self._issuers: dict[str, _Issuer] = {}
        for iss in settings.issuers:
            unknown = sorted(set(iss.algorithms) - SUPPORTED_ALGORITHMS)
            if unknown:
                raise ValueError(
                    f"auth.oidc issuer {iss.issuer}: algorithms {unknown} are not supported; "
                    f"use some of {sorted(SUPPORTED_ALGORITHMS)}"
                )
            if not iss.algorithms:
                raise ValueError(f"auth.oidc issuer {iss.issuer}: algorithms is empty")
            if iss.issuer in self._issuers:
                raise ValueError(f"auth.oidc: issuer {iss.issuer} is listed twice")
            if iss.jwks_uri:
                source = self._sources.get(iss.jwks_uri)
                if source is None:
                    source = KeySource(iss.jwks_uri, self._fetcher, timing, clock, jwks_uri=iss.jwks_uri)
                    self._sources[iss.jwks_uri] = source
            else:
                source = KeySource(iss.issuer, self._fetcher, timing, clock, discovery_issuer=iss.issuer)
                self._sources["discovery:" + iss.issuer] = source
            client_ids = [settings.client_id] if settings.client_id else list(iss.audiences)
            self._issuers[iss.issuer] = _Issuer(
                iss,
                frozenset(iss.algorithms),
                frozenset(iss.audiences),
                source,
                ClaimsMapper(settings.claims_mapping, client_ids),
            )
        # More `iss` values for the (single) issuer configured: the Hub's JWTs name the host they came through.
        self._aliases = frozenset(issuer_aliases)

    # ---- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """First discovery/JWKS fetch, bounded in time; an unreachable IdP never fails startup."""
        await self._fetcher.start()
        sources = list(self._sources.values())
        if sources:
            await asyncio.wait(
                [asyncio.ensure_future(s.refresh()) for s in sources], timeout=START_WAIT_SECONDS
            )
        for s in sources:
            s.start_background()
        for iss, state in self._issuers.items():
            if not state.source.usable():
                log.warning(
                    "no signing keys yet for trusted issuer; requests get 503 until they arrive",
                    extra={"issuer": iss, "error": state.source.error},
                )

    async def close(self) -> None:
        for s in self._sources.values():
            await s.close()
        await self._fetcher.close()

    def health(self) -> dict[str, Any]:
        now = self._clock()
        issuers: dict[str, Any] = {}
        for iss, state in self._issuers.items():
            src = state.source
            issuers[iss] = {
                "keys": len(src.keys) if src.usable(now) else 0,
                "last_refresh": (
                    datetime.fromtimestamp(src.fetched_at, UTC).isoformat(timespec="seconds")
                    if src.fetched_at is not None else None
                ),
                "stale": src.fetched_at is not None and src.due(now),
                "error": src.error,
                "refresh_failures": src.failures,
            }
        # Ready only when every trusted issuer's tokens can be verified. Keys outlive an IdP outage by the stale
        # window (default 24 h), so this mostly holds back a pod that could not load some issuer's keys at start:
        # it stays out of rotation (and a rollout waits) instead of answering that issuer's users 503.
        failing = [iss for iss, v in issuers.items() if v["keys"] == 0]
        return {"ok": bool(issuers) and not failing, "mode": "oidc", "issuers": issuers, "failing_issuers": failing,
                "refresh_failures": sum(s.failures for s in self._sources.values())}

    # ---- authentication ----------------------------------------------------------------------------

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        return await self.authenticate_token(bearer_token(headers))

    def owns(self, token: str) -> bool:
        """Whether this token is this authenticator's to judge (in a list of modes): a JWT whose `iss` (read
        before any verification) is a trusted issuer. Its verdict is then final."""
        if not _TOKEN_RE.fullmatch(token):
            return False
        try:
            iss = _b64json(token.split(".", 2)[1], "payload").get("iss")
        except Unauthorized:
            return False
        return isinstance(iss, str) and self._issuer(iss) is not None

    def _issuer(self, iss: str) -> _Issuer | None:
        issuer = self._issuers.get(iss)
        if issuer is None and self._issuers:
            if iss in self._aliases:
                return next(iter(self._issuers.values()))
            for state in self._issuers.values():
                if state.source.discovered_issuer == iss:
                    return state
        return issuer

    async def authenticate_token(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        return self._cached(digest, now) or await self._verify_and_cache(token, digest, now)

    async def authenticate_if_mine(self, token: str) -> Principal | None:
        """In a list of modes: the principal, or None when the token is not this mode's (see owns())."""
        if token.count(".") != 2:
            return None  # not a JWS at all (an API key, a Hub personal access token): no hashing, no parsing
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        now = self._clock()
        hit = self._cached(digest, now)
        if hit is not None:
            return hit
        if not self.owns(token):
            return None
        return await self._verify_and_cache(token, digest, now)

    def _cached(self, digest: bytes, now: float) -> Principal | None:
        hit = self._cache.get(digest)
        if hit is not None:
            if now < hit.expires and not hit.key.retired and hit.source.usable(now):
                self._cache.move_to_end(digest)
                return hit.principal
            del self._cache[digest]
        return None

    async def _verify_and_cache(self, token: str, digest: bytes, now: float) -> Principal:
        try:
            principal, expires, key, source = await self._verify(token, now)
        except Unauthorized as exc:
            log.info("bearer token rejected: %s", exc.message)
            raise
        if self._cache_size > 0 and expires > now:
            # Cached until `exp`, but not beyond token_cache_seconds: a token minted with an absurd expiry
            # is verified again (and its key's retirement noticed) like any other.
            expires = min(expires, now + self._cache_seconds)
            self._cache[digest] = _Cached(principal, expires, key, source)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _verify(self, token: str, now: float) -> tuple[Principal, float, SigningKey, KeySource]:
        if _JWE_RE.fullmatch(token):
            raise _reject("encrypted tokens (JWE) are not supported")
        if not _TOKEN_RE.fullmatch(token):
            raise _reject("malformed token (expected a signed JWT: header.payload.signature)")
        h64, p64, s64 = token.split(".")
        header = _b64json(h64, "header")
        claims = _b64json(p64, "payload")

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in _VERIFIERS:
            shown = alg if isinstance(alg, str) and _SAFE_ALG.fullmatch(alg) else "unsupported"
            raise _reject(f"signature algorithm '{shown}' is not allowed")
        if "crit" in header:
            raise _reject("critical header parameters are not supported")
        typ = header.get("typ")
        if typ is not None and not _access_token_typ(typ):
            raise _reject("token type ('typ') is not an access token")
        if claims.get("typ") in _NOT_ACCESS_TOKENS:
            raise _reject("token is not an access token (an ID or refresh token?)")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise _reject("malformed token ('kid' is not a string)")

        iss = claims.get("iss")
        if not isinstance(iss, str) or not iss:
            raise _reject("token has no issuer ('iss')")
        issuer = self._issuer(iss)
        if issuer is None:
            log.warning(
                "token issuer %r is not trusted; trusted issuers: %s", iss[:256], list(self._issuers),
                extra={"iss": iss[:256], "trusted": list(self._issuers)},
            )
            raise _reject("issuer ('iss') is not trusted")
        if alg not in issuer.algorithms:
            raise _reject(f"signature algorithm '{alg}' is not allowed for this issuer")

        key = await self._check_signature(issuer.source, kid, alg, f"{h64}.{p64}".encode("ascii"), s64, now)
        expires = self._check_claims(issuer, claims, now)
        principal = issuer.mapper.principal(claims, issuer=iss, auth_method=self._auth_method)
        if principal is None:
            raise _reject("token has no subject")
        if self._admin_check is not None and self._admin_check(principal):
            principal = dataclasses.replace(principal, is_admin=True)
        return principal, expires, key, issuer.source

    async def _check_signature(
        self, source: KeySource, kid: str | None, alg: str, signing_input: bytes, s64: str, now: float
    ) -> SigningKey:
        if not source.usable(now):
            await self._fetch_keys(source, now)
            if not source.usable():
                raise AuthUnavailable(
                    "Authentication is temporarily unavailable: the identity provider's signing keys "
                    "could not be loaded"
                )
        elif source.due(now) and source.may_refresh(now):
            source.refresh_soon()  # keys still work; renew them without holding this request

        candidates = source.find(kid)
        if not candidates and kid is not None:
            # Maybe the IdP rotated its keys: one refresh (single flight, rate-limited), then look again.
            await self._fetch_keys(source, now)
            candidates = source.find(kid)
            if not candidates:
                if not source.last_ok or not source.usable():
                    raise AuthUnavailable(
                        "Authentication is temporarily unavailable: the token's signing key is unknown and "
                        "the identity provider cannot be reached to look it up"
                    )
                raise _reject("signing key ('kid') is unknown")
        usable = [k for k in candidates if k.accepts(alg)]
        if not usable:
            raise _reject(f"signature algorithm '{alg}' does not match the signing key")
        try:
            signature = base64.urlsafe_b64decode(s64 + "=" * (-len(s64) % 4))
        except binascii.Error:
            raise _reject("malformed token (signature is not base64url)") from None
        verifier = _VERIFIERS[alg]
        for key in usable[:10]:
            try:
                if verifier.verify(signing_input, key.key, signature):
                    return key
            except Exception:  # noqa: S112 - a key of an unexpected shape simply does not verify
                continue
        raise _reject("signature is invalid")

    async def _fetch_keys(self, source: KeySource, now: float) -> None:
        """Join a refresh in flight, or start one unless one was attempted less than min_refresh_interval ago."""
        if source.refreshing or source.may_refresh(now):
            await source.refresh(wait=KEY_WAIT_SECONDS)

    def _check_claims(self, issuer: _Issuer, claims: Mapping[str, Any], now: float) -> float:
        leeway = issuer.settings.leeway_seconds
        exp = _number(claims, "exp")
        if exp is None:
            raise _reject("token has no expiry ('exp')")
        if now > exp + leeway:
            raise _reject("token has expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise _reject("token is not valid yet ('nbf')")
        iat = _number(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise _reject("token was issued in the future ('iat')")
        aud = claims.get("aud")
        if isinstance(aud, str):
            auds = [aud]
        elif isinstance(aud, list):
            auds = [a for a in aud if isinstance(a, str)]
        else:
            auds = []
        if not issuer.audiences and self._audience_optional:
            pass  # hub mode: the Hub sets `aud` to its own client ids
        elif not issuer.audiences.intersection(auds):
            azp = claims.get("azp")
            if not (issuer.settings.accept_azp and isinstance(azp, str) and azp in issuer.audiences):
                raise _reject("audience ('aud') is not accepted")
        return exp
