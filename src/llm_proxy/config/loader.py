"""Loading a config: read, substitute, translate llama-stack, validate everything; every problem reported at once."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ConfigError
from .env import AUTH_MODE_ENV, HUB_URL_ENV, _auth_env, _broken_form_lines, _Subst
from .llama_stack import _from_llama_stack, _is_llama_stack
from .provider_types import (
    DEFAULT_BASE_URL,
    DEFAULT_KEY_ENV,
    KEYED_TYPES,
    PROVIDER_TYPE_ALIASES,
    normalize_provider_type,
    provider_key_env_name,
)
from .schema import (
    BEARER_MODES,
    LIMIT_KINDS,
    AuthSettings,
    DeploymentSettings,
    LimitsSettings,
    ModelSettings,
    ProviderSettings,
    Settings,
)


@dataclass
class LoadedConfig:
    """The outcome of loading: settings plus everything worth telling the operator."""

    settings: Settings
    source: str  # "native" | "llama-stack"
    path: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    disabled_providers: dict[str, str] = field(default_factory=dict)  # id -> reason


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _collect_extras(model: BaseModel, path: str, warnings: list[str]) -> None:
    for key in model.model_extra or {}:
        warnings.append(f"unknown key '{path}{key}' (ignored)")
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            _collect_extras(value, f"{path}{name}.", warnings)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _collect_extras(item, f"{path}{name}[{i}].", warnings)


def _check_url(url: str | None, what: str, problems: list[str]) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{what}: '{url}' is not an http(s) URL")


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load and validate a config file. Raises ConfigError listing every problem found."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file {p}: {exc.strerror}"]) from None
    return load_config_text(text, env=env, path=str(p))


def load_config_text(text: str, env: Mapping[str, str] | None = None, path: str | None = None) -> LoadedConfig:
    env = os.environ if env is None else env
    problems: list[str] = []
    warnings: list[str] = []
    notes: list[str] = []
    where = path or "<config>"
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError([f"{where}: invalid YAML{at}: {getattr(exc, 'problem', exc)}"]) from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError([f"{where}: top level must be a mapping"])

    for line, expr in _broken_form_lines(text):
        warnings.append(
            f"{where}:{line}: '{expr}' uses ':' without '='; treated as ':=' (a default). Write "
            f"'${{env.NAME:=default}}'"
        )

    subst = _Subst(env)
    doc = subst.walk(doc, "")
    source = "native"
    if _is_llama_stack(doc):
        source = "llama-stack"
        doc = _from_llama_stack(doc, warnings, notes, auth_from_env=bool(env.get(AUTH_MODE_ENV, "").strip()))
    _auth_env(doc, env, notes, problems)

    # Map unset variables to the provider they belong to: that provider is disabled, not fatal.
    disabled: dict[str, str] = {}
    prov_list = doc.get("providers") or []
    for upath, var in subst.unset:
        idx = _provider_index(upath, source)
        if idx is not None and isinstance(prov_list, list) and idx < len(prov_list):
            pid = str(prov_list[idx].get("id") or f"#{idx}")
            disabled.setdefault(pid, f"environment variable {var} is not set")
        else:
            problems.append(f"environment variable {var} is not set (used at '{upath}')")

    settings = _validate_sections(doc, problems)
    _collect_extras(settings, "", warnings)
    _validate(settings, problems, disabled, env)
    if problems:
        raise ConfigError(problems)
    return LoadedConfig(settings, source, path, warnings, notes, disabled)


def _pydantic_problems(exc: ValidationError, prefix: str, problems: list[str]) -> None:
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        problems.append(f"{prefix}{'.' if prefix and loc else ''}{loc}: {err['msg']}")


_LIST_ITEMS: dict[str, type[BaseModel]] = {"providers": ProviderSettings, "models": ModelSettings}


def _validate_sections(doc: dict[str, Any], problems: list[str]) -> Settings:
    """Validate section by section (and list items one by one) so one bad value hides no other problem."""
    values: dict[str, Any] = {}
    for key, raw in doc.items():
        item_model = _LIST_ITEMS.get(key)
        if item_model is not None and isinstance(raw, list):
            items = []
            for i, item in enumerate(raw):
                try:
                    items.append(item_model.model_validate(item))
                except ValidationError as exc:
                    _pydantic_problems(exc, f"{key}[{i}]", problems)
            values[key] = items
            continue
        values[key] = raw
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        _pydantic_problems(exc, "", problems)
        # Keep going with defaults for the broken sections so later checks still run.
        bad = {str(e["loc"][0]) for e in exc.errors() if e["loc"]}
        return Settings.model_validate({k: v for k, v in values.items() if k not in bad})


def _provider_index(upath: str, source: str) -> int | None:
    m = re.match(r"^providers(?:\.inference)?\[(\d+)\]", upath)
    if not m:
        return None
    idx = int(m.group(1))
    if source == "llama-stack" and not upath.startswith("providers.inference"):
        return None
    return idx


def _validate(settings: Settings, problems: list[str], disabled: dict[str, str], env: Mapping[str, str]) -> None:
    seen_providers: set[str] = set()
    known = ", ".join(sorted(PROVIDER_TYPE_ALIASES))
    for i, p in enumerate(settings.providers):
        if not p.id:
            problems.append(f"providers[{i}]: id is empty")
        if p.id in seen_providers:
            problems.append(f"providers[{i}]: duplicate provider id '{p.id}'")
        seen_providers.add(p.id)
        canonical = normalize_provider_type(p.type or "")
        if canonical is None:
            problems.append(f"providers[{i}] ('{p.id}'): unknown provider type '{p.type}'; known types: {known}")
            continue
        p.type = canonical
        if p.base_url is None:
            p.base_url = DEFAULT_BASE_URL.get(canonical)
        if canonical in ("azure", "openai_compat") and not p.base_url and p.id not in disabled:
            problems.append(f"providers[{i}] ('{p.id}'): base_url is required for type {canonical}")
        _check_url(p.base_url, f"providers[{i}] ('{p.id}') base_url", problems)
        if p.base_url:
            p.base_url = p.base_url.rstrip("/")
        if not p.api_key and not p.api_key_file and canonical != "bedrock":
            # Default credential names, then the <PROVIDER_ID>_API_KEY fallback. (Not for Bedrock: an
            # api_key there switches it from SigV4 to bearer auth, which must be asked for explicitly.)
            for name in (*DEFAULT_KEY_ENV.get(canonical, ()), provider_key_env_name(p.id)):
                if env.get(name):
                    p.api_key = env[name]
                    break
        entra_env = canonical == "azure" and p.auth == "entra" and bool(env.get("AZURE_OPENAI_AD_TOKEN"))
        if canonical in KEYED_TYPES and not (p.api_key or p.api_key_file or entra_env) and p.id not in disabled:
            names = " or ".join((*DEFAULT_KEY_ENV.get(canonical, ()), provider_key_env_name(p.id)))
            disabled[p.id] = f"no API key (set {names}, api_key or api_key_file)"
        if canonical == "bedrock" and not p.region:
            p.region = env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1"

    seen_models: dict[str, str] = {}
    for i, m in enumerate(settings.models):
        _validate_deployments(i, m, seen_providers, problems)
        for name in (m.id, *m.aliases):
            if name in seen_models:
                problems.append(f"models[{i}]: duplicate model id '{name}' (also {seen_models[name]})")
            seen_models[name] = f"models[{i}]"
    if settings.default_model and settings.default_model not in seen_models:
        problems.append(f"default_model '{settings.default_model}' is not a configured model id")

    auth = settings.auth
    _validate_auth(auth, problems)
    _validate_limits(settings.limits, problems)
    if settings.database.url and "://" not in settings.database.url:
        problems.append(f"database.url: '{settings.database.url}' is not a database URL")


def _validate_limits(limits: LimitsSettings, problems: list[str]) -> None:
    store = limits.store
    if store != "memory" and not store.startswith(("redis://", "rediss://", "unix://")):
        problems.append("limits.store: neither memory nor a redis:// / rediss:// / unix:// URL")
    elif store != "memory":
        try:
            u = urlsplit(store)
            u.port  # noqa: B018 (raises on a bad port)
            db = u.path.strip("/")
            if u.scheme != "unix" and db and not db.isdigit():
                raise ValueError("the database must be a number")
        except ValueError as exc:
            problems.append(f"limits.store: not a usable Redis URL ({exc})")
    names: set[str] = set()
    for i, rule in enumerate(limits.rules):
        if rule.name in names:
            problems.append(f"limits.rules[{i}]: duplicate rule name '{rule.name}'")
        names.add(rule.name)
        if not any(getattr(rule, k) is not None for k in LIMIT_KINDS):
            problems.append(f"limits.rules[{i}] ('{rule.name}'): no limit set; use one or more of "
                            + ", ".join(LIMIT_KINDS))
        dims = rule.dimensions
        if not dims or len(set(dims)) != len(dims):
            problems.append(f"limits.rules[{i}] ('{rule.name}'): per must name each of "
                            "user, group, model, api_key, global at most once")


def _validate_auth(auth: AuthSettings, problems: list[str]) -> None:
    modes = auth.modes
    if not modes:
        problems.append("auth.mode: the list of modes is empty")
    if len(modes) > 1:
        if len(set(modes)) != len(modes):
            problems.append(f"auth.mode: {list(modes)} names a mode twice")
        other = [m for m in modes if m not in BEARER_MODES]
        if other:
            problems.append(
                f"auth.mode: {other} cannot be combined with other modes; a list may hold {', '.join(BEARER_MODES)}"
            )
    if auth.mode == "none" and not auth.allow_unauthenticated:
        problems.append(
            "auth.mode is 'none' but auth.allow_unauthenticated is not true; "
            "set auth.mode to oidc or trusted_header, or allow unauthenticated access explicitly"
        )
    if "hub" in modes:
        if not auth.hub.url:
            problems.append(f"auth.hub.url: the Hub's base URL is required for mode hub (or set {HUB_URL_ENV})")
        _check_url(auth.hub.url, "auth.hub.url", problems)
        for i, alias in enumerate(auth.hub.issuers):
            _check_url(alias, f"auth.hub.issuers[{i}]", problems)
    if "introspection" in modes:
        it = auth.introspection
        if not it.url:
            problems.append("auth.introspection.url: the endpoint is required for mode introspection")
        _check_url(it.url, "auth.introspection.url", problems)
        if it.kind == "rfc7662" and not (it.client_id and it.client_secret):
            problems.append(
                "auth.introspection: kind rfc7662 needs client_id and client_secret (the resource server's)"
            )
    for name, tls in (("hub", auth.hub), ("introspection", auth.introspection)):
        if name in modes and tls.tls_cafile and not Path(tls.tls_cafile).is_file():
            problems.append(f"auth.{name}.tls_cafile: file '{tls.tls_cafile}' does not exist")
    if "oidc" in modes:
        if not auth.oidc.issuers:
            problems.append("auth.oidc.issuers: at least one trusted issuer is required for mode oidc")
        for i, iss in enumerate(auth.oidc.issuers):
            _check_url(iss.issuer, f"auth.oidc.issuers[{i}].issuer", problems)
            _check_url(iss.jwks_uri, f"auth.oidc.issuers[{i}].jwks_uri", problems)
            if not iss.audiences:
                problems.append(f"auth.oidc.issuers[{i}].audiences: at least one audience is required")
            bad = [a for a in iss.algorithms if a.upper() == "NONE" or a.upper().startswith("HS")]
            if bad:
                problems.append(f"auth.oidc.issuers[{i}].algorithms: {bad} are not allowed (asymmetric only)")
        if auth.oidc.tls_cafile and not Path(auth.oidc.tls_cafile).is_file():
            problems.append(f"auth.oidc.tls_cafile: file '{auth.oidc.tls_cafile}' does not exist")
    if auth.mode == "trusted_header":
        th = auth.trusted_header
        if not th.secret and not th.trusted_networks:
            problems.append("auth.trusted_header: set a shared secret or trusted_networks (or both)")


def _validate_deployments(i: int, m: ModelSettings, providers: set[str], problems: list[str]) -> None:
    """Normalise both model forms to `deployments`; `provider`/`upstream_model` then name the primary."""
    where = f"models[{i}] ('{m.id}')"
    if m.deployments:
        if m.provider is not None or m.upstream_model is not None:
            problems.append(f"{where}: give either provider/upstream_model or deployments, not both")
        seen: set[tuple[str, str]] = set()
        for j, d in enumerate(m.deployments):
            if d.provider not in providers:
                problems.append(f"{where}: deployments[{j}]: unknown provider '{d.provider}'")
            if not d.upstream_model:
                problems.append(f"{where}: deployments[{j}]: upstream_model is empty")
            if (d.provider, d.upstream_model) in seen:
                problems.append(f"{where}: deployments[{j}] repeats provider '{d.provider}' and upstream_model")
            seen.add((d.provider, d.upstream_model))
        m.provider, m.upstream_model = m.deployments[0].provider, m.deployments[0].upstream_model
        return
    if not m.provider:
        problems.append(f"{where}: provider is required (or a list of deployments)")
    elif m.provider not in providers:
        problems.append(f"{where}: unknown provider '{m.provider}'")
    if not m.upstream_model:
        problems.append(f"{where}: upstream_model is empty")
    if m.provider and m.upstream_model:
        m.deployments = [DeploymentSettings(provider=m.provider, upstream_model=m.upstream_model)]
