"""The usage dashboard at /ui/: login through the real OpenID provider (authorization code + PKCE) in headless
Chromium (Debian's `chromium`, driven by PyPI playwright), the page's totals against the ledger's for seeded rows,
admins and others, the CSV export, the session cookie, and screenshots kept under docs/."""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from llm_proxy.core.usage import UsageLedger
from llm_proxy.types import UsageEvent

from .auth.conftest import oidc_proxy_config
from .conftest import Emulator
from .conftest_oidc import OpenIDProvider, oidc_provider  # noqa: F401 (fixture)
from .helpers import ProxyServer, native_config
from .store.dbutil import create_pg_database, drop_pg_database, pg_available, pg_url

ROOT = Path(__file__).resolve().parents[1]
# Screenshots: under docs/ (committed) when LLM_PROXY_SCREENSHOTS=docs, else in a temporary directory, so that a
# test run leaves the work tree as it was.
DOCS = ROOT / "docs" if os.environ.get("LLM_PROXY_SCREENSHOTS") == "docs" else Path(tempfile.gettempdir())
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ALICE = "f3b1c1a0-0000-4000-8000-00000000a11c"  # tests/oidc/op.mjs's users (the login form takes the sub)
BOB = "f3b1c1a0-0000-4000-8000-000000000b0b"
ROOT_USER = "f3b1c1a0-0000-4000-8000-0000000000ad"  # role llm-admin: a policy admin


def _events() -> list[UsageEvent]:
    """Rows over the last three weeks: two users, two models, groups (several, one, none), some errors and streams."""
    now = time.time()
    out = []
    for i in range(24):
        who = (ALICE, "alice") if i % 3 else (BOB, "bob")
        model = "openai/gpt-4o" if i % 2 else "openai/gpt-4o-mini"
        status = 502 if i % 7 == 0 else 200
        started = now - (i % 20) * 86400 - 60
        if who[0] == ALICE:
            groups: tuple[str, ...] | None = None if i % 5 == 0 else ("eng", "ml") if i % 2 else ("eng",)
        else:
            groups = ("sales",) if i % 2 else None
        out.append(UsageEvent(
            request_id=f"req_dash_{i:04d}_{int(now)}", started_at=started, ended_at=started + 0.5,
            endpoint="chat.completions", status=status, subject=who[0], username=who[1], model=model,
            provider_id="openai", upstream_model=model.split("/")[1], streamed=bool(i % 4 == 0),
            error_type="api_error" if status != 200 else None,
            prompt_tokens=None if status != 200 else 100 + i, completion_tokens=None if status != 200 else 10 * i,
            total_tokens=None if status != 200 else 100 + 11 * i, latency_ms=200.0 + i, ttft_ms=50.0 if i % 4 == 0
            else None, groups=groups,
        ))
    return out


def _sums(events: list[UsageEvent], subject: str | None) -> dict[str, int]:
    rows = [e for e in events if subject is None or e.subject == subject]
    return {
        "requests": len(rows),
        "errors": sum(1 for e in rows if e.status >= 400),
        "prompt_tokens": sum(e.prompt_tokens or 0 for e in rows),
        "completion_tokens": sum(e.completion_tokens or 0 for e in rows),
        "total_tokens": sum(e.total_tokens or 0 for e in rows),
    }


NO_GROUP = "(no group)"  # the page's name for rows without groups (the report's null group)


def _group_sums(events: list[UsageEvent], subject: str | None) -> dict[str, tuple[int, int]]:
    """(requests, total tokens) per group of the seeded rows: a row counts under each of its groups."""
    out: dict[str, tuple[int, int]] = {}
    for e in events:
        if subject is None or e.subject == subject:
            for g in e.groups or (NO_GROUP,):
                n, t = out.get(g, (0, 0))
                out[g] = (n + 1, t + (e.total_tokens or 0))
    return out


def _config(emulator: Emulator, op: OpenIDProvider, db_url: str, spool: Path) -> str:
    """The auth tests' oidc config (root is a policy admin), the ledger on `db_url`, and the dashboard."""
    return oidc_proxy_config(emulator.base_url, [{"issuer": op.issuer}]) + f"""
database: {{url: "{db_url}"}}
usage: {{spool_dir: "{spool}", flush_interval_seconds: 0.05}}
ui: {{enabled: true, client_id: llm-proxy-ui}}
"""


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    loop = asyncio.new_event_loop()
    try:
        if loop.run_until_complete(pg_available()):
            name = loop.run_until_complete(create_pg_database("dashboard"))
            yield pg_url(name)
            loop.run_until_complete(drop_pg_database(name))
        else:
            yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('dash') / 'ledger.db'}"
    finally:
        loop.close()


@pytest.fixture(scope="module")
def seeded(emulator: Emulator, oidc_provider: OpenIDProvider, database: str,  # noqa: F811
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ProxyServer, list[UsageEvent]]]:
    loaded = native_config(_config(emulator, oidc_provider, database, tmp_path_factory.mktemp("spool")))
    events = _events()
    with ProxyServer(loaded, usage=UsageLedger.from_config(loaded)) as px:
        ledger = px.services.usage
        assert isinstance(ledger, UsageLedger)

        async def seed() -> None:
            for e in events:
                ledger.record(e)
            assert await ledger.flush(10)

        px.lt.run(seed())
        yield px, events


def _ledger_totals(px: ProxyServer, subject: str | None) -> dict[str, Any]:
    ledger = px.services.usage
    assert isinstance(ledger, UsageLedger)
    from datetime import UTC, datetime, timedelta

    since = datetime.now(UTC) - timedelta(days=30)
    _, totals = px.lt.run(ledger.db.usage_report(since=since, until=None, group_by=[], subject=subject))
    return dict(totals)


def _ledger_groups(px: ProxyServer, subject: str | None) -> dict[str, tuple[int, int]]:
    ledger = px.services.usage
    assert isinstance(ledger, UsageLedger)
    from datetime import UTC, datetime, timedelta

    since = datetime.now(UTC) - timedelta(days=30)
    rows, _ = px.lt.run(ledger.db.usage_report(since=since, until=None, group_by=["group"], subject=subject))
    return {r["group"] or NO_GROUP: (int(r["requests"]), int(r["total_tokens"])) for r in rows}


# ---- without a browser ------------------------------------------------------------------------------


def test_api_needs_a_session_or_a_bearer(seeded: tuple[ProxyServer, list[UsageEvent]],
                                         oidc_provider: OpenIDProvider) -> None:  # noqa: F811
    px, events = seeded
    r = httpx.get(px.url + "/ui/api/usage")
    assert r.status_code == 401 and r.json()["error"]["code"] == "login_required"
    forged = "eyJzdWIiOiJ4IiwiYWRtIjp0cnVlLCJleHAiOjk5OTk5OTk5OTl9.AAAA"  # {"sub":"x","adm":true,...}, bad MAC
    r = httpx.get(px.url + "/ui/api/usage", cookies={"llmp_session": forged})
    assert r.status_code == 401
    token = oidc_provider.token(user="bob")  # behind a gateway: its bearer instead of the cookie
    r = httpx.get(px.url + "/ui/api/usage", params={"group_by": "model"}, headers={"authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["scope"] == "user" and doc["user"] == BOB
    assert {k: doc["totals"][k] for k in _sums(events, BOB)} == _sums(events, BOB)
    page = httpx.get(px.url + "/ui/")
    assert page.status_code == 200 and "script-src" not in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert "https://" not in page.text  # nothing from a CDN
    assert httpx.post(px.url + "/ui/logout").status_code == 403  # no Origin: refused
    assert httpx.post(px.url + "/ui/logout", headers={"origin": "https://evil.example"}).status_code == 403
    assert httpx.get(px.url + "/ui/callback", params={"code": "x", "state": "y"}).status_code == 400


def test_login_request_uses_pkce_and_secure_cookies_behind_tls(
    emulator: Emulator, oidc_provider: OpenIDProvider, tmp_path: Path  # noqa: F811
) -> None:
    import base64
    from urllib.parse import parse_qs, urlsplit

    from llm_proxy.web.ui import Sealer, session_key

    text = _config(emulator, oidc_provider, f"sqlite+aiosqlite:///{tmp_path / 'l.db'}", tmp_path / "spool").replace(
        "ui: {enabled: true, client_id: llm-proxy-ui}",
        "ui: {enabled: true, client_id: llm-proxy-ui, redirect_uri: 'https://llm.example.com/ui/callback', "
        "session_secret: s3cret}")
    with ProxyServer(native_config(text)) as px:
        r = httpx.get(px.url + "/ui/login", follow_redirects=False)
    assert r.status_code == 302
    where = urlsplit(r.headers["location"])
    assert where.geturl().startswith(oidc_provider.issuer)
    q = {k: v[0] for k, v in parse_qs(where.query).items()}
    assert q["redirect_uri"] == "https://llm.example.com/ui/callback" and q["code_challenge_method"] == "S256"
    assert "code_verifier" not in q
    cookie = r.headers["set-cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/ui/" in cookie
    sealed = cookie.split(";", 1)[0].split("=", 1)[1].strip('"')
    pending = Sealer(session_key(native_config(text).settings.ui, None)).open(sealed)  # the configured secret
    assert pending is not None and pending["state"] == q["state"]
    digest = hashlib.sha256(pending["verifier"].encode()).digest()
    assert base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == q["code_challenge"]


def test_vendored_chart_library_is_the_pinned_file() -> None:
    vendor = ROOT / "src" / "llm_proxy" / "ui" / "vendor"
    readme = (vendor / "README.md").read_text()
    digest = hashlib.sha256((vendor / "chart.umd.min.js").read_bytes()).hexdigest()
    assert digest in readme
    assert (vendor / "chart.js-LICENSE.md").read_text().startswith("The MIT License")


# ---- in the browser ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium on this machine: `make browser` installs Debian's chromium (as .ci/run does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield b
        b.close()


def _login(browser: Any, px: ProxyServer, sub: str) -> Any:
    page = browser.new_context(viewport={"width": 1280, "height": 1100}).new_page()
    page.goto(px.url + "/ui/")
    page.click("#login")
    page.fill("input[name=login]", sub)  # oidc-provider's development login form
    page.fill("input[name=password]", "any")
    page.click("button[type=submit]")
    page.click("button[type=submit]")  # the consent page: "Continue"
    page.wait_for_url(px.url + "/ui/")
    page.wait_for_selector("body[data-loaded=true]", timeout=15000)
    return page


def _number(page: Any, sel: str) -> int:
    return int(page.inner_text(sel).replace(",", ""))


def _percentiles(events: list[UsageEvent], subject: str | None) -> str:
    import math

    lat = sorted(e.latency_ms for e in events if e.latency_ms is not None and subject in (None, e.subject))
    return " / ".join(f"{round(lat[max(1, math.ceil(q * len(lat))) - 1]):,}" for q in (0.5, 0.95, 0.99)) + " ms"


def _page_groups(page: Any) -> dict[str, tuple[int, int]]:
    """The page's per-group table: group -> (requests, tokens)."""
    out: dict[str, tuple[int, int]] = {}
    for tr in page.query_selector_all("#groups tbody tr"):
        cells = [td.inner_text() for td in tr.query_selector_all("td")]
        out[cells[0]] = (int(cells[1].replace(",", "")), int(cells[3].replace(",", "")))
    return out


def _csv_groups(page: Any, px: ProxyServer) -> dict[str, tuple[int, int]]:
    """Per-group sums of the CSV the page's export link gives."""
    text = page.context.request.get(px.url + page.get_attribute("#csv", "href")).text()
    out: dict[str, tuple[int, int]] = {}
    for r in csv.DictReader(io.StringIO(text)):
        n, t = out.get(r["group"] or NO_GROUP, (0, 0))
        out[r["group"] or NO_GROUP] = (n + int(r["requests"]), t + int(r["total_tokens"] or 0))
    return out


def _page_totals(page: Any) -> dict[str, int]:
    return {
        "requests": _number(page, "#total-requests"),
        "errors": _number(page, "#total-errors"),
        "prompt_tokens": _number(page, "#total-prompt"),
        "completion_tokens": _number(page, "#total-completion"),
        "total_tokens": _number(page, "#total-tokens"),
    }


def test_a_user_sees_their_own_totals(browser: Any, seeded: tuple[ProxyServer, list[UsageEvent]]) -> None:
    px, events = seeded
    page = _login(browser, px, ALICE)
    totals = _page_totals(page)
    ledger = _ledger_totals(px, ALICE)
    assert totals == {k: int(ledger[k]) for k in totals}  # the ledger's numbers
    assert totals == _sums(events, ALICE)  # which are the seeded rows'
    assert page.inner_text("#scope") == "Your usage"
    assert page.inner_text("#latency-pct") == _percentiles(events, ALICE)
    assert page.is_hidden("#users-chart")  # per-user series: admins only
    groups = _page_groups(page)
    assert groups == _ledger_groups(px, ALICE) == _group_sums(events, ALICE)  # per group: the ledger's numbers
    assert set(groups) == {"eng", "ml", NO_GROUP} and "sales" not in page.inner_text("#groups")
    assert _csv_groups(page, px) == groups  # the export has the groups
    assert "bob" not in page.inner_text("#users")
    cookie = next(c for c in page.context.cookies() if c["name"] == "llmp_session")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui/"
    assert page.evaluate("document.cookie") == ""  # not readable by scripts
    csv_text = page.context.request.get(px.url + "/ui/api/usage.csv?from=30d&group_by=day,user,model").text()
    rows = list(csv.DictReader(io.StringIO(csv_text)))
    assert {r["user"] for r in rows} == {ALICE}
    assert sum(int(r["total_tokens"] or 0) for r in rows) == totals["total_tokens"]
    DOCS.mkdir(exist_ok=True)
    page.screenshot(path=str(DOCS / "dashboard-user.png"), full_page=True)
    page.click("#logout")
    page.wait_for_selector("#signin:not([hidden])")
    page.context.close()


def test_an_admin_sees_everyone(browser: Any, seeded: tuple[ProxyServer, list[UsageEvent]]) -> None:
    px, events = seeded
    page = _login(browser, px, ROOT_USER)
    totals = _page_totals(page)
    ledger = _ledger_totals(px, None)
    assert totals == {k: int(ledger[k]) for k in totals}
    assert totals == _sums(events, None)
    assert page.inner_text("#scope").startswith("Everyone")
    assert page.inner_text("#latency-pct") == _percentiles(events, None)
    assert page.is_visible("#users-chart")
    users = page.inner_text("#users")
    assert "alice" in users and "bob" in users
    groups = _page_groups(page)
    assert groups == _ledger_groups(px, None) == _group_sums(events, None)
    assert set(groups) == {"eng", "ml", "sales", NO_GROUP}
    assert _csv_groups(page, px) == groups
    from playwright.sync_api import expect  # waits by polling the DOM (the page's CSP forbids eval)

    page.select_option("#preset", "1d")  # the range picker: only the rows of the last day
    recent = [e for e in events if e.started_at >= time.time() - 86400]
    expect(page.locator("#total-requests")).to_have_text(f"{len(recent):,}")
    page.select_option("#preset", "30d")
    expect(page.locator("#total-requests")).to_have_text(f"{totals['requests']:,}")
    page.screenshot(path=str(DOCS / "dashboard-admin.png"), full_page=True)
    page.context.close()
