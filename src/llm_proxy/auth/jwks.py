"""JWKS key sets: OIDC discovery, fetching over TLS, caching, single-flight refresh and the stale window."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

log = logging.getLogger("llm_proxy.auth")

# Every asymmetric JWS algorithm PyJWT verifies. `none` and HMAC are never usable, whatever the config says.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES256K", "ES384", "ES512", "EdDSA"}
)
_EC_CURVE_ALG = {"P-256": "ES256", "secp256k1": "ES256K", "P-384": "ES384", "P-521": "ES512"}
_OKP_CURVES = frozenset({"Ed25519", "Ed448"})
MIN_RSA_BITS = 2048
MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_KEYS = 100
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=5)

Clock = Callable[[], float]
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


@dataclass(eq=False)
class SigningKey:
    """One public verification key from a JWKS. `retired` turns true once a refresh no longer lists it."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None  # the JWK's own "alg", when it pins one
    key: PublicKey
    thumbprint: str
    retired: bool = False

    def accepts(self, alg: str) -> bool:
        """Whether this key may verify a token signed with `alg` (key type, curve and pinned alg agree)."""
        if alg not in SUPPORTED_ALGORITHMS or (self.alg is not None and self.alg != alg):
            return False
        if self.kty == "RSA":
            return alg.startswith(("RS", "PS"))
        if self.kty == "EC":
            return _EC_CURVE_ALG.get(self.crv or "") == alg
        if self.kty == "OKP":
            return alg == "EdDSA" and self.crv in _OKP_CURVES
        return False


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    """RFC 7638 thumbprint: identifies the same key across refreshes whatever its kid."""
    members = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[str(jwk["kty"])]
    canonical = orjson.dumps({m: jwk[m] for m in members}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def parse_jwk(jwk: Mapping[str, Any]) -> SigningKey | None:
    """A usable signature-verification key, or None (symmetric, encryption-only, weak, or malformed)."""
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        return None
    if kty not in ("RSA", "EC", "OKP"):
        if kty == "oct":
            log.warning("JWKS lists a symmetric (oct) key; ignored", extra={"kid": kid})
        return None
    if jwk.get("use") not in (None, "sig"):
        return None
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return None
    alg = jwk.get("alg")
    if alg is not None and (not isinstance(alg, str) or alg not in SUPPORTED_ALGORITHMS):
        return None
    # Only the public members: a JWKS that (wrongly) carries private parts must not make us hold them.
    public = {k: v for k, v in jwk.items() if k not in ("d", "p", "q", "dp", "dq", "qi", "oth", "k")}
    try:
        key: Any
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(dict(public))
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(dict(public))
        else:
            key = OKPAlgorithm.from_jwk(dict(public))
        thumb = _thumbprint(public)
    except Exception:  # any malformed key is skipped, never fatal
        log.warning("JWKS key could not be parsed; ignored", extra={"kid": kid, "kty": kty})
        return None
    if not isinstance(key, PublicKey):
        return None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        log.warning("JWKS RSA key is shorter than %d bits; ignored", MIN_RSA_BITS, extra={"kid": kid})
        return None
    crv = public.get("crv")
    return SigningKey(kid, str(kty), crv if isinstance(crv, str) else None, alg, key, thumb)


def parse_jwks(doc: Any) -> list[SigningKey]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")
    keys = [k for k in (parse_jwk(j) for j in doc["keys"][:MAX_KEYS] if isinstance(j, dict)) if k is not None]
    return keys


def make_ssl_context(verify_tls: bool, cafile: str | None) -> ssl.SSLContext | bool:
    """TLS for discovery and JWKS: system trust plus `tls_cafile` (or $SSL_CERT_FILE); False disables checks."""
    if not verify_tls:
        return False
    ctx = ssl.create_default_context()
    extra = cafile or os.environ.get("SSL_CERT_FILE")
    if extra:
        ctx.load_verify_locations(cafile=extra)
    return ctx


class Fetcher:
    """GETs small JSON documents (discovery, JWKS) with one shared aiohttp session."""

    def __init__(self, ssl_context: ssl.SSLContext | bool) -> None:
        self._ssl = ssl_context
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            # force_close: fetches are rare, and a pooled connection to an IdP that restarted is a dead one.
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=16, force_close=True)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=FETCH_TIMEOUT, headers={"Accept": "application/json"}
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_json(self, url: str) -> Any:
        await self.start()
        assert self._session is not None
        async with self._session.get(url, allow_redirects=True, max_redirects=3) as resp:
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status} from {url}")
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            if len(body) > MAX_DOCUMENT_BYTES:
                raise FetchError(f"document at {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise FetchError(f"{url} did not return JSON") from None


    async def call(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        data: Mapping[str, str] | None = None,
        json: Any = None,
        seconds: float | None = None,
    ) -> tuple[int, Any]:
        """One call that carries a credential (a token check): never follows redirects (the token would go
        along). Returns (status, parsed JSON body or None)."""
        await self.start()
        assert self._session is not None
        kw: dict[str, Any] = {"allow_redirects": False}
        if seconds is not None:
            kw["timeout"] = aiohttp.ClientTimeout(total=seconds, connect=min(seconds, 5.0))
        async with self._session.request(method, url, headers=headers, data=data, json=json, **kw) as resp:
            body = await resp.content.read(MAX_DOCUMENT_BYTES + 1)
            status = resp.status
        if len(body) > MAX_DOCUMENT_BYTES:
            raise FetchError(f"the answer from {url} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            return status, orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            return status, None


def describe_error(exc: BaseException) -> str:
    """A fetch failure in one line that is safe to log and report (no token, no body)."""
    return _describe(exc)


class FetchError(Exception):
    """Discovery or JWKS could not be fetched or understood; the message is safe to log and report."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FetchError):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate verification failed: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect to {exc.host}:{exc.port}: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ClientError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Timing:
    recheck: float  # refresh keys at least this often
    stale: float  # after a failed refresh, keys stay usable this long past `recheck`
    min_interval: float  # at most one on-demand refresh per this many seconds


@dataclass(eq=False)
class KeySource:
    """The keys behind one JWKS URL (given, or found by discovery), shared by issuers that use the same URL."""

    name: str  # the JWKS URL, or the issuer while discovery is pending
    fetcher: Fetcher
    timing: Timing
    clock: Clock = time.time
    jwks_uri: str | None = None
    discovery_issuer: str | None = None
    discovered_issuer: str | None = None  # the `issuer` the discovery document names
    keys: list[SigningKey] = field(default_factory=list)
    fetched_at: float | None = None  # last successful fetch (clock time)
    last_attempt: float | None = None
    last_ok: bool = False
    error: str | None = None
    failures: int = 0  # failed refreshes (llm_proxy_auth_refresh_failures_total)
    _inflight: asyncio.Task[bool] | None = None
    _background: asyncio.Task[None] | None = None

    # ---- state -----------------------------------------------------------------------------------

    def usable(self, now: float | None = None) -> bool:
        """Keys present and not older than recheck + stale window."""
        if not self.keys or self.fetched_at is None:
            return False
        now = self.clock() if now is None else now
        return now - self.fetched_at <= self.timing.recheck + self.timing.stale

    def due(self, now: float) -> bool:
        return self.fetched_at is None or now - self.fetched_at >= self.timing.recheck

    def may_refresh(self, now: float) -> bool:
        return self.last_attempt is None or now - self.last_attempt >= self.timing.min_interval

    def find(self, kid: str | None) -> list[SigningKey]:
        if kid is None:
            return list(self.keys)
        return [k for k in self.keys if k.kid == kid]

    # ---- refresh ---------------------------------------------------------------------------------

    async def refresh(self, *, wait: float | None = None) -> bool:
        """Fetch now, joining a refresh already in flight (single flight). Returns whether keys are fresh."""
        task = self._inflight
        if task is None or task.done():
            task = self._inflight = asyncio.ensure_future(self._fetch())
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except TimeoutError:
            return False

    def refresh_soon(self) -> None:
        """Start a refresh in the background (single flight) without waiting for it."""
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._fetch())

    @property
    def refreshing(self) -> bool:
        return self._inflight is not None and not self._inflight.done()

    async def _fetch(self) -> bool:
        self.last_attempt = self.clock()
        try:
            if self.jwks_uri is None:
                await self._discover()
            assert self.jwks_uri is not None
            doc = await self.fetcher.get_json(self.jwks_uri)
            try:
                keys = parse_jwks(doc)
            except ValueError as exc:
                raise FetchError(f"{self.jwks_uri}: {exc}") from None
            if not keys:
                raise FetchError(f"{self.jwks_uri} lists no usable signing keys")
        except Exception as exc:  # every failure is reported in health and retried
            self.last_ok = False
            self.failures += 1
            self.error = _describe(exc)
            log.warning(
                "cannot refresh OIDC signing keys: %s", self.error,
                extra={"jwks": self.name, "keys_cached": len(self.keys), "keys_usable": self.usable()},
            )
            return False
        self._install(keys)
        return True

    def _install(self, fresh: list[SigningKey]) -> None:
        old = {(k.kid, k.thumbprint): k for k in self.keys}
        merged = [old.pop((k.kid, k.thumbprint), k) for k in fresh]  # keep identities: token-cache entries stay valid
        for gone in old.values():
            gone.retired = True
        if old or len(merged) != len(self.keys):
            log.info("OIDC signing keys changed", extra={"jwks": self.name, "keys": len(merged), "retired": len(old)})
        self.keys = merged
        self.fetched_at = self.clock()
        self.last_ok = True
        self.error = None

    async def _discover(self) -> None:
        issuer = self.discovery_issuer
        assert issuer is not None
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        doc = await self.fetcher.get_json(url)
        if not isinstance(doc, dict):
            raise FetchError(f"{url} is not a JSON object")
        uri = doc.get("jwks_uri")
        parts = urlsplit(uri) if isinstance(uri, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"{url} has no usable jwks_uri")
        if doc.get("issuer") != issuer:
            log.warning(
                "OIDC discovery document names another issuer; using its jwks_uri anyway",
                extra={"configured": issuer, "discovered": str(doc.get("issuer"))[:200]},
            )
        self.jwks_uri = uri
        self.name = str(uri)
        found = doc.get("issuer")
        self.discovered_issuer = found if isinstance(found, str) and found else None

    # ---- background ------------------------------------------------------------------------------

    def start_background(self) -> None:
        if self._background is None:
            self._background = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        """Refresh ahead of `recheck`; after a failure retry with backoff (1 s doubling, capped)."""
        floor = max(self.timing.min_interval, 1.0)  # never more than one background attempt per floor
        cap = max(floor, min(300.0, self.timing.recheck))
        backoff = floor
        while True:
            if self.last_ok and self.fetched_at is not None:
                wait = self.fetched_at + 0.8 * self.timing.recheck - self.clock()
            else:
                wait = backoff
            await asyncio.sleep(max(wait, floor))
            ok = await self.refresh()
            backoff = floor if ok else min(backoff * 2, cap)

    async def close(self) -> None:
        for task in (self._background, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._background = self._inflight = None
