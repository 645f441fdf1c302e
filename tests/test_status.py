"""`llm-proxy status` and `client-config`: readiness as Kubernetes-style conditions, the client config JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from llm_proxy.status import conditions

from .conftest import Emulator, basic_config
from .helpers import ProxyServer, native_config

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llm_proxy", *args], capture_output=True, text=True, timeout=30)


def test_status_against_running_proxy(emulator: Emulator) -> None:
    text = basic_config(emulator.base_url).replace(
        "default_model: openai/gpt-4o",
        "  - {id: broken/x, provider: broken, upstream_model: x}\ndefault_model: openai/gpt-4o",
    ).replace("providers:\n", "providers:\n  - {id: broken, type: anthropic, api_key: '${env.NO_SUCH_KEY}'}\n", 1)
    with ProxyServer(native_config(text)) as px:
        r = _cli("status", "--url", px.url, "--json")
    assert r.returncode == 0, r.stderr
    conds = {c["type"]: c for c in json.loads(r.stdout)["conditions"]}
    assert conds["Ready"]["status"] == "True"
    assert conds["APIKeysConfigured"]["status"] == "False"
    keys = conds["APIKeysConfigured"]
    assert keys["reason"] == "SomeKeysMissing" and "NO_SUCH_KEY" in keys["message"]
    assert conds["IdentityProviderReachable"]["reason"] == "NotUsed"
    assert set(conds) == {"Ready", "APIKeysConfigured", "IdentityProviderReachable", "DatabaseReachable"}


def test_status_unreachable_exit_2() -> None:
    r = _cli("status", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert r.returncode == 2 and "cannot reach" in r.stderr


def test_conditions_from_not_ready_report() -> None:
    report = {
        "status": "NOT_READY",
        "failing": ["auth"],
        "checks": {
            "providers": {"ok": True, "providers": {"openai": {"ok": True}}},
            "auth": {"ok": False, "mode": "oidc", "issuers": {"https://kc/realms/r": {"keys": 0, "error": "timeout"}}},
            "usage": {"ok": True, "backend": "database", "database": False, "backlog": 12, "spool_bytes": 3400,
                      "last_error": "connection refused"},
        },
    }
    conds = {c["type"]: c for c in conditions(report, 503)}
    assert conds["Ready"]["status"] == "False" and "auth" in conds["Ready"]["message"]
    assert conds["APIKeysConfigured"]["status"] == "True"
    idp = conds["IdentityProviderReachable"]
    assert idp["status"] == "False" and "timeout" in idp["message"]
    assert conds["DatabaseReachable"]["status"] == "False" and "backlog 12" in conds["DatabaseReachable"]["message"]


def test_client_config_cli_matches_endpoint(tmp_path: Path) -> None:
    cfg = ROOT / "tests" / "fixtures" / "seed" / "run-noauth.yaml"
    r = subprocess.run(
        [sys.executable, "-m", "llm_proxy", "client-config", "--config", str(cfg)],
        capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "k",
                                                         "POSTGRESQL_PASSWORD": "x"},
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"model": "openai/gpt-4o", "enabled": "true"}


def test_status_says_details_are_hidden_instead_of_guessing() -> None:
    # What a non-local caller without a token gets from /v1/health/ready.
    conds = {c["type"]: c for c in conditions({"status": "OK", "failing": [], "details": "hidden"}, 200)}
    assert conds["Ready"]["status"] == "True"
    for t in ("APIKeysConfigured", "IdentityProviderReachable", "DatabaseReachable"):
        assert conds[t]["status"] == "Unknown" and conds[t]["reason"] == "DetailsHidden"


def test_status_sends_the_token(emulator: Emulator) -> None:
    from llm_proxy.types import Principal

    from .web.test_protocol import RecordingAuth

    auth = RecordingAuth(Principal(subject="ops", username="ops", auth_method="oidc"))
    with ProxyServer(native_config(basic_config(emulator.base_url)), authenticator=auth) as px:
        px.services.is_local = lambda request: False
        hidden = _cli("status", "--url", px.url, "--json")
        with_token = _cli("status", "--url", px.url, "--json", "--token", "tok-123")
    assert hidden.returncode == 0 and "DetailsHidden" in hidden.stdout
    assert with_token.returncode == 0 and auth.seen == [len("Bearer tok-123")]
    assert "DetailsHidden" not in with_token.stdout and "SomeKeysMissing" not in with_token.stdout
    conds = {c["type"]: c for c in json.loads(with_token.stdout)["conditions"]}
    assert conds["APIKeysConfigured"]["status"] == "True"


def _identity_condition(auth: dict[str, object]) -> dict[str, str]:
    report = {"status": "OK", "failing": [], "checks": {"auth": auth, "providers": {"providers": {}}}}
    return next(c for c in conditions(report, 200) if c["type"] == "IdentityProviderReachable")


def test_identity_condition_for_hub_introspection_and_lists_of_modes() -> None:
    hub_down = {"ok": True, "mode": "hub", "cached_tokens": 3, "error": "GET /auth/self: connection refused"}
    cond = _identity_condition(hub_down)
    # Still ready (seen tokens keep working), but the condition says the Hub is not answering.
    assert (cond["status"], cond["reason"]) == ("False", "LastCheckFailed") and "connection refused" in cond["message"]
    assert _identity_condition({"ok": True, "mode": "introspection", "error": None})["reason"] == "Reachable"
    chain = {"ok": True, "mode": "oidc,api_keys,hub", "modes": {
        "oidc": {"ok": True, "issuers": {"https://kc/realms/k": {"keys": 2}}},
        "api_keys": {"ok": True, "keys": 4, "error": None},
        "hub": {"ok": True, "error": None},
    }}
    cond = _identity_condition(chain)
    assert (cond["status"], cond["reason"]) == ("True", "AllReachable")
    assert "4 key(s) loaded" in cond["message"] and "hub: reachable" in cond["message"]
    chain["modes"]["hub"] = hub_down  # type: ignore[index]
    assert _identity_condition(chain)["reason"] == "LastCheckFailed"
    assert _identity_condition({"ok": True, "mode": "trusted_header"})["reason"] == "NotUsed"
