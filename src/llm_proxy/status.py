"""Readiness report -> Kubernetes-style conditions (Ready, APIKeysConfigured, ...), for `llm-proxy status`."""

from __future__ import annotations

from typing import Any


def _cond(ctype: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message}


def _member(mode: str, health: dict[str, Any]) -> tuple[bool | None, str, str]:
    """(ok, reason, message) for one authentication mode; ok None: the mode uses no identity provider."""
    if mode == "oidc":
        issuers = health.get("issuers") or {}
        bad = {i: v.get("error") or "no keys" for i, v in issuers.items() if not v.get("keys")}
        if not bad:
            return True, "KeysLoaded", f"signing keys loaded for {len(issuers)} issuer(s)"
        return bool(health.get("ok")), "KeysUnavailable", "; ".join(f"{i}: {e}" for i, e in sorted(bad.items()))
    if mode in ("hub", "introspection", "api_keys"):
        # Hub / introspection: ready while the service is away (seen tokens keep working); the last error shows it.
        error = health.get("error")
        if error:
            return False, "LastCheckFailed", f"{mode}: {error}"
        what = f"{health.get('keys', 0)} key(s) loaded" if mode == "api_keys" else "reachable"
        return bool(health.get("ok", True)), "Reachable", f"{mode}: {what}"
    return None, "NotUsed", f"auth mode {mode}"


def _identity(auth: dict[str, Any]) -> dict[str, str]:
    """IdentityProviderReachable from the auth check: one mode, or each member of a list of modes."""
    members = auth.get("modes")
    parts = list(members.items()) if isinstance(members, dict) else [(str(auth.get("mode", "none")), auth)]
    judged = [_member(mode, health) for mode, health in parts]
    used = [j for j in judged if j[0] is not None]
    if not used:
        return _cond("IdentityProviderReachable", True, "NotUsed", judged[0][2] if judged else "auth mode none")
    failing = [j for j in used if not j[0]]
    reason = failing[0][1] if failing else used[0][1] if len(used) == 1 else "AllReachable"
    return _cond("IdentityProviderReachable", not failing, reason, "; ".join(j[2] for j in used))


def conditions(report: dict[str, Any], http_status: int) -> list[dict[str, str]]:
    """Turn GET /v1/health/ready's JSON into conditions with reason and message."""
    checks: dict[str, Any] = report.get("checks") or {}
    failing = report.get("failing") or []
    ready = http_status == 200 and report.get("status") == "OK"
    out = [
        _cond(
            "Ready",
            ready,
            "ProxyReady" if ready else "ProxyNotReady",
            "llm-proxy is serving" if ready else "failing checks: " + ", ".join(failing or ["unknown"]),
        )
    ]

    if report.get("details") == "hidden":
        # The proxy shows its checks only to loopback callers with a loopback Host, or with a token.
        msg = "details are shown to callers on the proxy's host (loopback) or with --token"
        out += [_cond(t, False, "DetailsHidden", msg) | {"status": "Unknown"}
                for t in ("APIKeysConfigured", "IdentityProviderReachable", "DatabaseReachable")]
        return out

    providers = (checks.get("providers") or {}).get("providers") or {}
    missing = {pid: p.get("reason", "") for pid, p in providers.items() if not p.get("ok")}
    if not providers:
        out.append(_cond("APIKeysConfigured", False, "NoProviders", "no provider is configured"))
    elif missing:
        msg = "; ".join(f"{pid}: {reason}" for pid, reason in sorted(missing.items()))
        some = len(missing) < len(providers)
        out.append(_cond("APIKeysConfigured", False, "SomeKeysMissing" if some else "KeysMissing", msg))
    else:
        out.append(_cond("APIKeysConfigured", True, "KeysPresent", f"{len(providers)} provider(s) have credentials"))

    out.append(_identity(checks.get("auth") or {}))

    usage = checks.get("usage") or {}
    if usage.get("backend") != "database":
        out.append(_cond("DatabaseReachable", True, "NotUsed", f"usage ledger backend {usage.get('backend', 'none')}"))
    elif usage.get("database"):
        out.append(_cond("DatabaseReachable", True, "Connected", f"backlog {usage.get('backlog', 0)}"))
    else:
        out.append(
            _cond(
                "DatabaseReachable",
                False,
                "Unreachable",
                f"spooling locally: backlog {usage.get('backlog', 0)}, {usage.get('spool_bytes', 0)} bytes; "
                f"last error: {usage.get('last_error') or 'none'}",
            )
        )
    return out
