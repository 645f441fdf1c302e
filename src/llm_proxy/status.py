"""Readiness report -> Kubernetes-style conditions (Ready, APIKeysConfigured, ...), for `llm-proxy status`."""

from __future__ import annotations

from typing import Any


def _cond(ctype: str, ok: bool, reason: str, message: str) -> dict[str, str]:
    return {"type": ctype, "status": "True" if ok else "False", "reason": reason, "message": message}


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

    auth = checks.get("auth") or {}
    mode = auth.get("mode", "none")
    if mode != "oidc":
        out.append(_cond("IdentityProviderReachable", True, "NotUsed", f"auth mode {mode}"))
    else:
        issuers = auth.get("issuers") or {}
        bad = {i: v.get("error") or "no keys" for i, v in issuers.items() if not v.get("keys")}
        if not bad:
            msg = f"signing keys loaded for {len(issuers)} issuer(s)"
            out.append(_cond("IdentityProviderReachable", True, "KeysLoaded", msg))
        else:
            msg = "; ".join(f"{i}: {e}" for i, e in sorted(bad.items()))
            out.append(_cond("IdentityProviderReachable", bool(auth.get("ok")), "KeysUnavailable", msg))

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
