"""Translation of a llama-stack run.yaml into the native config's dict (before validation)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

# --------------------------------------------------------------------------------------------------
# llama-stack run.yaml -> native dict
# --------------------------------------------------------------------------------------------------

_LS_IGNORED_TOP = {
    "version",
    "image_name",
    "apis",
    "external_providers_dir",
    "telemetry",
    "conversations_store",
    "metadata_store",
    "inference_store",
    "logging",
    "vector_stores",
    "safety",
    "benchmarks",
    "shields",
    "vector_dbs",
    "datasets",
    "scoring_fns",
    "tool_groups",
}
_LS_RESOURCE_IGNORED = {"shields", "vector_dbs", "datasets", "scoring_fns", "benchmarks", "tool_groups"}


def _is_llama_stack(doc: Mapping[str, Any]) -> bool:
    return isinstance(doc.get("providers"), dict) or "apis" in doc or "image_name" in doc


def _sql_backend_url(backend: Mapping[str, Any]) -> str | None:
    kind = str(backend.get("type", ""))
    if kind in ("sql_postgres", "postgres"):
        user = quote(str(backend.get("user") or "postgres"), safe="")
        password = backend.get("password")
        auth = f"{user}:{quote(str(password), safe='')}" if password else user
        host = backend.get("host") or "localhost"
        port = backend.get("port") or 5432
        db = backend.get("db") or "llamastack"
        return f"postgresql+asyncpg://{auth}@{host}:{port}/{db}"
    if kind in ("sql_sqlite", "sqlite"):
        return f"sqlite+aiosqlite:///{backend.get('db_path') or './var/llm-proxy.db'}"
    return None


def _from_llama_stack(
    doc: dict[str, Any], warnings: list[str], notes: list[str], auth_from_env: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in doc:
        if key in _LS_IGNORED_TOP:
            notes.append(f"llama-stack key '{key}' is not used by llm-proxy (ignored)")
        elif key not in ("providers", "registered_resources", "models", "server", "storage"):
            warnings.append(f"unknown key '{key}' in llama-stack config (ignored)")

    providers: list[dict[str, Any]] = []
    prov_section = doc.get("providers") or {}
    if isinstance(prov_section, dict):
        for api, entries in prov_section.items():
            if api != "inference":
                notes.append(f"llama-stack providers.{api} is not used by llm-proxy (ignored)")
                continue
            for i, entry in enumerate(entries or []):
                if not isinstance(entry, dict):
                    warnings.append(f"providers.inference[{i}] is not a mapping (ignored)")
                    continue
                cfg = dict(entry.get("config") or {})
                p: dict[str, Any] = {"id": entry.get("provider_id"), "type": entry.get("provider_type")}
                for k in list(entry):
                    if k not in ("provider_id", "provider_type", "config", "module"):
                        warnings.append(f"unknown key 'providers.inference[{i}].{k}' (ignored)")
                if "url" in cfg and "base_url" not in cfg:
                    cfg["base_url"] = cfg.pop("url")
                if "region_name" in cfg and "region" not in cfg:
                    cfg["region"] = cfg.pop("region_name")
                if "api_base" in cfg and "base_url" not in cfg:
                    cfg["base_url"] = cfg.pop("api_base")
                if "api_token" in cfg:  # remote::vllm's name for its key
                    token = cfg.pop("api_token")
                    if "api_key" not in cfg:
                        cfg["api_key"] = token
                    elif token is not None and cfg["api_key"] != token:
                        warnings.append(
                            f"providers.inference[{i}].config: both api_key and api_token are set; using api_key"
                        )
                for k in ("tls_verify",):
                    if k in cfg:
                        cfg["verify_tls"] = cfg.pop(k)
                for k in ("refresh_models", "allowed_models", "max_tokens"):
                    if k in cfg:
                        notes.append(f"providers.inference[{i}].config.{k} is not used by llm-proxy (ignored)")
                        cfg.pop(k)
                p.update(cfg)
                providers.append(p)
    out["providers"] = providers

    resources = doc.get("registered_resources") or {}
    models_raw: list[Any] = []
    if isinstance(resources, dict):
        models_raw.extend(resources.get("models") or [])
        for k in resources:
            if k in _LS_RESOURCE_IGNORED:
                if resources[k]:
                    notes.append(f"registered_resources.{k} is not used by llm-proxy (ignored)")
            elif k != "models":
                warnings.append(f"unknown key 'registered_resources.{k}' (ignored)")
    models_raw.extend(doc.get("models") or [])
    models: list[dict[str, Any]] = []
    with_models: set[str] = set()
    for i, m in enumerate(models_raw):
        if not isinstance(m, dict):
            warnings.append(f"models[{i}] is not a mapping (ignored)")
            continue
        pid = m.get("provider_id")
        mid = str(m.get("model_id") or "")
        upstream = str(m.get("provider_model_id") or "")
        if not upstream:
            upstream = mid.split("/", 1)[1] if pid and mid.startswith(f"{pid}/") else mid
        public = f"{pid}/{upstream}" if pid else mid
        aliases = [mid] if mid and mid != public else []
        mtype = str(m.get("model_type") or "llm")
        for k in m:
            if k not in ("model_id", "provider_id", "provider_model_id", "model_type", "metadata"):
                warnings.append(f"unknown key 'models[{i}].{k}' (ignored)")
        models.append(
            {
                "id": public,
                "provider": pid,
                "upstream_model": upstream,
                "aliases": aliases,
                "type": "embedding" if mtype == "embedding" else "llm",
            }
        )
        if pid:
            with_models.add(str(pid))
    out["models"] = models
    # llama-stack lists a provider's models dynamically when none are registered; the closest
    # equivalent here is to pass `<provider_id>/<model>` through to the upstream unchanged.
    for p in providers:
        if p.get("id") not in with_models:
            p.setdefault("passthrough_models", True)

    server = dict(doc.get("server") or {})
    auth_cfg = server.pop("auth", None)
    native_server: dict[str, Any] = {}
    for k, v in server.items():
        if k in ("port", "host", "workers"):
            native_server[k] = v
        elif k in ("tls_certfile", "tls_keyfile", "tls_cafile", "disable_ipv6", "quota", "cors"):
            warnings.append(f"server.{k} is not supported by llm-proxy (ignored)")
        else:
            warnings.append(f"unknown key 'server.{k}' (ignored)")
    out["server"] = native_server
    if isinstance(auth_cfg, dict):
        out["auth"] = _ls_auth(auth_cfg, warnings)
    elif auth_from_env:
        pass  # LLM_PROXY_AUTH_MODE names the mode (the operator's run.yaml has no auth block): see _auth_env
    else:
        # llama-stack serves without authentication when server.auth is absent (the operator's later
        # topology puts an authenticating hub in front). Keep that behaviour for drop-in use, loudly.
        warnings.append(
            "llama-stack config has no server.auth: serving WITHOUT authentication, as llama-stack does; "
            "put an authenticating gateway in front or add server.auth"
        )
        out["auth"] = {"mode": "none", "allow_unauthenticated": True}
        native_server["allow_non_loopback_unauthenticated"] = True

    storage = doc.get("storage")
    if isinstance(storage, dict):
        backends = storage.get("backends") or {}
        stores = storage.get("stores") or {}
        inference = stores.get("inference") if isinstance(stores, dict) else None
        name = inference.get("backend") if isinstance(inference, dict) else None
        chosen = backends.get(name) if name and isinstance(backends, dict) else None
        if chosen is None and isinstance(backends, dict):
            chosen = next(
                (b for b in backends.values() if isinstance(b, dict) and str(b.get("type", "")).startswith("sql_")),
                None,
            )
        if isinstance(chosen, dict):
            url = _sql_backend_url(chosen)
            if url:
                out["database"] = {"url": url}
                if chosen.get("table_prefix"):
                    out["database"]["table_prefix"] = chosen["table_prefix"]
            else:
                warnings.append(f"storage backend type '{chosen.get('type')}' is not supported (ignored)")
    return out


def _ls_claims_mapping(mapping: Mapping[str, Any], warnings: list[str]) -> dict[str, str]:
    """llama-stack maps claim -> attribute category; ours maps principal field -> claim path(s)."""
    by_field: dict[str, list[str]] = {}
    for claim, category in mapping.items():
        field_name = {"roles": "roles", "teams": "groups", "projects": "groups", "namespaces": "groups"}.get(
            str(category)
        )
        if field_name is None:
            warnings.append(f"server.auth.provider_config.claims_mapping: category '{category}' is not supported")
            continue
        by_field.setdefault(field_name, []).append(str(claim))
    return {k: ",".join(v) for k, v in by_field.items()}


def _ls_auth(auth_cfg: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    pc = auth_cfg.get("provider_config") or {}
    for k in auth_cfg:
        if k not in ("provider_config", "access_policy", "route_policy"):
            warnings.append(f"unknown key 'server.auth.{k}' (ignored)")
    if auth_cfg.get("access_policy"):
        warnings.append("server.auth.access_policy is not supported; use llm-proxy's auth.policy (ignored)")
    kind = pc.get("type")
    if kind == "custom":
        return _ls_custom_auth(pc, warnings)
    if kind != "oauth2_token":
        warnings.append(
            f"server.auth.provider_config.type '{kind}' is not supported; only oauth2_token and custom are"
        )
        return {"mode": "oidc"}
    jwks = pc.get("jwks") or {}
    issuer: dict[str, Any] = {"issuer": pc.get("issuer")}
    if isinstance(jwks, dict) and jwks.get("uri"):
        issuer["jwks_uri"] = jwks["uri"]
    aud = pc.get("audience")
    if aud:
        issuer["audiences"] = [aud] if isinstance(aud, str) else list(aud)
    oidc: dict[str, Any] = {"issuers": [issuer]}
    for k in ("verify_tls", "tls_cafile"):
        if k in pc:
            oidc[k] = pc[k]
    if isinstance(pc.get("claims_mapping"), dict):
        oidc["claims_mapping"] = _ls_claims_mapping(pc["claims_mapping"], warnings)
    if isinstance(jwks, dict) and jwks.get("token"):
        warnings.append("server.auth.provider_config.jwks.token is not supported (JWKS is fetched without it)")
    if isinstance(jwks, dict) and jwks.get("key_recheck_period"):
        oidc["key_recheck_period"] = jwks["key_recheck_period"]
    for k in pc:
        if k not in ("type", "jwks", "issuer", "audience", "verify_tls", "tls_cafile", "claims_mapping"):
            warnings.append(f"unknown key 'server.auth.provider_config.{k}' (ignored)")
    return {"mode": "oidc", "oidc": oidc}


def _ls_custom_auth(pc: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    """llama-stack's `custom` provider (an endpoint that validates the token) is introspection of kind custom."""
    intro: dict[str, Any] = {"kind": "custom", "url": pc.get("endpoint")}
    for k in pc:
        if k not in ("type", "endpoint"):
            warnings.append(f"unknown key 'server.auth.provider_config.{k}' (ignored)")
    return {"mode": "introspection", "introspection": intro}
