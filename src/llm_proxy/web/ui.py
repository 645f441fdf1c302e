"""The usage dashboard at /ui/ (ui.enabled): static files from the package, its data from the ledger.

Login is the OIDC authorization-code flow with PKCE (S256) against the configured issuer. The login request's
state and code verifier travel in a short-lived signed cookie (SameSite=Lax: it must come back with the
provider's redirect); the callback checks the state, redeems the code, checks the access token exactly as the
API checks a bearer (signature, issuer, audience, expiry) and sets the session cookie: signed (HMAC-SHA256),
HttpOnly, SameSite=Strict, Path=/ui/, Secure over https, holding only the subject, name, admin flag and expiry.
Because a Strict cookie is not sent on a navigation that a cross-site redirect started, the callback answers
with a page that moves to /ui/ itself. Every data endpoint is a GET that changes nothing; logout is a POST that
must come from the page's own origin. A bearer (`Authorization`, as Konveyor's Hub sends it) works instead of
the cookie. Admins (policy) see everyone's usage, others their own: the numbers are the ledger's
(GET /v1/usage's report).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import orjson
from aiohttp import web

from ..config import UiSettings
from ..core.usage import UsageLedger
from ..core.usage_report import format_csv
from ..errors import BadRequest, Forbidden, NotFound, ServiceUnavailable, Unauthorized
from ..types import Principal
from .state import SERVICES, Services
from .usage_routes import report_for

log = logging.getLogger("llm_proxy.ui")

SESSION_COOKIE = "llmp_session"
LOGIN_COOKIE = "llmp_login"
LOGIN_SECONDS = 600
_STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "vendor/chart.umd.min.js": "text/javascript; charset=utf-8",
}
# No inline script or style, nothing from another origin; the page may not be framed.
_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sealer:
    """Signed cookie values: base64url(JSON) "." base64url(HMAC-SHA256), with an `exp` checked on opening."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def seal(self, payload: dict[str, Any]) -> str:
        body = _b64(orjson.dumps(payload))
        return body + "." + _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())

    def open(self, value: str | None) -> dict[str, Any] | None:
        if not value or value.count(".") != 1:
            return None
        body, sig = value.split(".")
        want = _b64(hmac.new(self._key, body.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(sig, want):
            return None
        try:
            payload = orjson.loads(_unb64(body))
        except (ValueError, orjson.JSONDecodeError):
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int | float):
            return None
        return payload if payload["exp"] > time.time() else None


class Dashboard:
    def __init__(self, settings: UiSettings, issuer: str | None, key: bytes, *, verify_tls: bool = True,
                 tls_cafile: str | None = None) -> None:
        from ..auth.jwks import Fetcher, make_ssl_context

        self.settings = settings
        self.issuer = settings.issuer or issuer
        self.sealer = Sealer(key)
        self._fetcher = Fetcher(make_ssl_context(verify_tls, tls_cafile))
        self._endpoints: dict[str, str] | None = None
        pkg = resources.files("llm_proxy") / "ui"
        self._files = {name: (pkg.joinpath(name).read_bytes(), ctype) for name, ctype in _STATIC.items()}

    @property
    def login_enabled(self) -> bool:
        return bool(self.settings.client_id and self.issuer)

    async def close(self) -> None:
        await self._fetcher.close()

    async def endpoints(self) -> dict[str, str]:
        if self._endpoints is None:
            assert self.issuer is not None
            url = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
            try:
                doc = await self._fetcher.get_json(url)
            except Exception as exc:
                log.warning("dashboard login: cannot read the issuer's discovery document: %s", exc)
                raise ServiceUnavailable("Login is unavailable: the identity provider cannot be reached",
                                         code="auth_unavailable") from None
            auth, token = (doc.get(k) if isinstance(doc, dict) else None
                           for k in ("authorization_endpoint", "token_endpoint"))
            if not isinstance(auth, str) or not isinstance(token, str):
                raise ServiceUnavailable("Login is unavailable: the identity provider names no authorization "
                                         "or token endpoint", code="auth_unavailable")
            self._endpoints = {"authorization": auth, "token": token}
        return self._endpoints

    # ---- pages ------------------------------------------------------------------------------------

    def static(self, name: str) -> web.Response:
        body, ctype = self._files[name]
        return web.Response(body=body, headers={"content-type": ctype, **_HEADERS})

    def _secure(self, request: web.Request) -> bool:
        """Secure cookies over https, also where TLS ends in front of the proxy (an https ui.redirect_uri)."""
        return request.secure or (self.settings.redirect_uri or "").startswith("https://")

    def redirect_uri(self, request: web.Request) -> str:
        return self.settings.redirect_uri or f"{request.scheme}://{request.host}/ui/callback"

    async def login(self, request: web.Request) -> web.StreamResponse:
        if not self.login_enabled:
            raise NotFound("Dashboard login is not configured (ui.client_id)", code="login_disabled")
        ends = await self.endpoints()
        verifier = secrets.token_urlsafe(48)
        state = secrets.token_urlsafe(24)
        challenge = _b64(hashlib.sha256(verifier.encode()).digest())
        redirect = self.redirect_uri(request)
        query = {
            "response_type": "code", "client_id": self.settings.client_id, "redirect_uri": redirect,
            "scope": " ".join(self.settings.scopes), "state": state,
            "code_challenge": challenge, "code_challenge_method": "S256",
        }
        sep = "&" if "?" in ends["authorization"] else "?"
        resp = web.Response(status=302, headers={"location": ends["authorization"] + sep + urlencode(query)})
        sealed = self.sealer.seal({"state": state, "verifier": verifier, "redirect": redirect,
                                   "exp": time.time() + LOGIN_SECONDS})
        resp.set_cookie(LOGIN_COOKIE, sealed, max_age=LOGIN_SECONDS, path="/ui/", httponly=True,
                        secure=self._secure(request), samesite="Lax")
        resp.headers.update(_HEADERS)
        return resp

    async def callback(self, request: web.Request) -> web.StreamResponse:
        if not self.login_enabled:
            raise NotFound("Dashboard login is not configured (ui.client_id)", code="login_disabled")
        q = request.query
        pending = self.sealer.open(request.cookies.get(LOGIN_COOKIE))
        if "error" in q:
            raise Unauthorized(f"Login failed: {str(q.get('error'))[:100]}", challenge=None)
        state, code = q.get("state"), q.get("code")
        if pending is None or not state or not code or not hmac.compare_digest(str(pending.get("state")), state):
            raise BadRequest("Login failed: the login request is unknown or expired; start again", code="bad_state")
        ends = await self.endpoints()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": str(pending["redirect"]),
                "client_id": str(self.settings.client_id), "code_verifier": str(pending["verifier"])}
        if self.settings.client_secret:
            form["client_secret"] = self.settings.client_secret
        try:
            status, body = await self._fetcher.call("POST", ends["token"], data=form, seconds=10.0)
        except Exception as exc:
            log.warning("dashboard login: token endpoint unreachable: %s", type(exc).__name__)
            raise ServiceUnavailable("Login failed: the identity provider cannot be reached",
                                     code="auth_unavailable") from None
        token = body.get("access_token") if isinstance(body, dict) and status == 200 else None
        if not isinstance(token, str):
            err = body.get("error") if isinstance(body, dict) else None
            log.info("dashboard login: the token endpoint refused the code", extra={"status": status,
                                                                                  "error": str(err)[:100]})
            raise Unauthorized("Login failed: the identity provider did not issue a token", challenge=None)
        svc = request.app[SERVICES]
        principal = await svc.authenticator.authenticate({"authorization": f"Bearer {token}"}, request.remote)
        session = {
            "sub": principal.subject, "name": principal.username or principal.email or principal.subject,
            "adm": bool(svc.policy.is_admin(principal)),
            "exp": time.time() + self.settings.session_hours * 3600,
        }
        # A page, not a redirect: the Strict session cookie is sent on the navigation it starts itself.
        page = ('<!doctype html><meta charset="utf-8"><title>Signed in</title>'
                '<meta http-equiv="refresh" content="0;url=/ui/"><p><a href="/ui/">Continue</a></p>')
        resp = web.Response(text=page, content_type="text/html", headers=_HEADERS)
        resp.set_cookie(SESSION_COOKIE, self.sealer.seal(session), max_age=int(self.settings.session_hours * 3600),
                        path="/ui/", httponly=True, secure=self._secure(request), samesite="Strict")
        resp.del_cookie(LOGIN_COOKIE, path="/ui/")
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        _same_origin(request)
        resp = web.Response(status=204, headers=_HEADERS)
        resp.del_cookie(SESSION_COOKIE, path="/ui/")
        return resp

    # ---- data -------------------------------------------------------------------------------------

    async def caller(self, request: web.Request) -> tuple[Services, Principal, bool]:
        svc = request.app[SERVICES]
        if "authorization" in request.headers:
            principal = await svc.authenticator.authenticate(request.headers, request.remote)
            return svc, principal, bool(svc.policy.is_admin(principal))
        session = self.sealer.open(request.cookies.get(SESSION_COOKIE))
        if session is None:
            raise Unauthorized("Sign in to see the dashboard", challenge=None, code="login_required")
        return svc, Principal(subject=str(session["sub"]), username=str(session.get("name") or ""),
                              auth_method="ui_session"), bool(session.get("adm"))

    async def me(self, request: web.Request) -> web.StreamResponse:
        try:
            _, principal, admin = await self.caller(request)
        except Unauthorized:
            return _json({"signed_in": False, "login": self.login_enabled}, 401)
        return _json({"signed_in": True, "subject": principal.subject, "name": principal.username,
                      "admin": admin, "login": self.login_enabled})

    async def usage(self, request: web.Request) -> web.StreamResponse:
        return _json(await self._report(request))

    async def usage_csv(self, request: web.Request) -> web.StreamResponse:
        doc = await self._report(request)
        return web.Response(text=format_csv(doc), headers={
            **_HEADERS, "content-type": "text/csv; charset=utf-8",
            "content-disposition": 'attachment; filename="llm-proxy-usage.csv"'})

    async def _report(self, request: web.Request) -> dict[str, Any]:
        svc, principal, admin = await self.caller(request)
        ledger = svc.usage
        if not isinstance(ledger, UsageLedger):
            raise NotFound("The usage ledger is disabled on this server (usage.enabled: false)", code="usage_disabled")
        return await report_for(ledger, principal, admin, request.query,
                                percentiles=request.query.get("percentiles") == "1")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, headers={**_HEADERS,
                                                                          "content-type": "application/json"})


def _same_origin(request: web.Request) -> None:
    """A state-changing request must come from the dashboard's own origin (the browser says so)."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None and site != "same-origin":
        raise Forbidden("Cross-site request refused", code="csrf")
    if origin is not None and origin != f"{request.scheme}://{request.host}":
        raise Forbidden("Cross-site request refused", code="csrf")
    if site is None and origin is None:
        raise Forbidden("Cross-site request refused: no Origin", code="csrf")


def add_ui_routes(app: web.Application, dashboard: Dashboard) -> None:
    async def index(request: web.Request) -> web.StreamResponse:
        return dashboard.static("index.html")

    def static(name: str) -> Any:
        async def handler(request: web.Request) -> web.StreamResponse:
            return dashboard.static(name)

        return handler

    async def to_index(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/ui", to_index)
    app.router.add_get("/ui/", index)
    for name in _STATIC:
        if name != "index.html":
            app.router.add_get("/ui/" + name, static(name))
    app.router.add_get("/ui/login", dashboard.login)
    app.router.add_get("/ui/callback", dashboard.callback)
    app.router.add_post("/ui/logout", dashboard.logout)
    app.router.add_get("/ui/api/me", dashboard.me)
    app.router.add_get("/ui/api/usage", dashboard.usage)
    app.router.add_get("/ui/api/usage.csv", dashboard.usage_csv)


def session_key(settings: UiSettings, shared: str | None) -> bytes:
    """The cookie-signing key: ui.session_secret, else the one `serve --workers N` made for its workers, else a
    random one for this process."""
    secret = settings.session_secret or shared
    return hashlib.sha256(secret.encode()).digest() if secret else secrets.token_bytes(32)

