"""The one place that reads configuration: native YAML or llama-stack run.yaml, with ${env.X} substitution."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .types import Principal

# --------------------------------------------------------------------------------------------------
# Provider types. The registry in providers/ must implement every canonical type listed here.
# --------------------------------------------------------------------------------------------------

CANONICAL_PROVIDER_TYPES: tuple[str, ...] = (
    "openai",
    "openai_compat",
    "vllm",
    "ollama",
    "groq",
    "together",
    "fireworks",
    "azure",
    "anthropic",
    "gemini",
    "bedrock",
)

PROVIDER_TYPE_ALIASES: dict[str, str] = {
    **{t: t for t in CANONICAL_PROVIDER_TYPES},
    **{f"remote::{t}": t for t in CANONICAL_PROVIDER_TYPES},
    "openai-compat": "openai_compat",
    "remote::openai-compat": "openai_compat",
    "remote::passthrough": "openai_compat",
    "azure-openai": "azure",
    "azure_openai": "azure",
    "remote::azure-openai": "azure",
    "google": "gemini",
    "remote::google": "gemini",
}

# Types that cannot work without a credential; the others (local servers) may run keyless.
KEYED_TYPES = frozenset({"openai", "azure", "anthropic", "gemini", "groq", "together", "fireworks"})

DEFAULT_KEY_ENV: dict[str, tuple[str, ...]] = {
    "openai": ("OPENAI_API_KEY",),
    "azure": ("AZURE_OPENAI_API_KEY",),
    "anthropic": ("ANTHROPIC_API_KEY",),
    "gemini": ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
    "groq": ("GROQ_API_KEY",),
    "together": ("TOGETHER_API_KEY",),
    "fireworks": ("FIREWORKS_API_KEY",),
}

DEFAULT_BASE_URL: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "vllm": "http://localhost:8000/v1",
    "ollama": "http://localhost:11434/v1",
    "groq": "https://api.groq.com/openai/v1",
    "together": "https://api.together.xyz/v1",
    "fireworks": "https://api.fireworks.ai/inference/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
}


# OpenAI-compatible servers that read only `max_tokens` (llama.cpp, Ollama, older vLLM): a client's
# `max_completion_tokens` is renamed for them unless the provider says otherwise (max_tokens_field).
MAX_TOKENS_RENAMED_TYPES = frozenset({"vllm", "ollama", "openai_compat"})


def max_tokens_field(settings: ProviderSettings) -> str:
    """The provider's max_tokens_field, or its type's default."""
    if settings.max_tokens_field is not None:
        return settings.max_tokens_field
    return "max_tokens" if settings.type in MAX_TOKENS_RENAMED_TYPES else "as_sent"


def normalize_provider_type(raw: str) -> str | None:
    return PROVIDER_TYPE_ALIASES.get(raw.strip().lower())


def provider_key_env_name(provider_id: str) -> str:
    """`<PROVIDER_ID>_API_KEY`, made a valid environment variable name."""
    return re.sub(r"[^A-Z0-9_]", "_", provider_id.upper()) + "_API_KEY"


# --------------------------------------------------------------------------------------------------
# Settings models. extra="allow" so unknown keys can be reported as warnings instead of dropped.
# --------------------------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=False, populate_by_name=True)


class TimeoutSettings(_Model):
    connect: float = 10.0
    first_byte: float = 300.0
    idle: float = 120.0
    total: float = 900.0


class MetricsSettings(_Model):
    """GET /metrics (Prometheus text). No authentication, as Prometheus scrapes: it holds no user ids, tokens or
    secrets, only bounded labels. `allow`: networks (CIDR) a scrape may come from; empty: any."""

    enabled: bool = True
    path: str = Field("/metrics", pattern=r"^/[A-Za-z0-9._/-]*$")
    allow: list[str] = Field(default_factory=list)

    @field_validator("allow")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"server.metrics.allow: '{net}' is not an IP network (CIDR)") from None
        return v


class ServerSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8321, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=1024)
    drain_delay_seconds: float = Field(5.0, ge=0)
    shutdown_grace_seconds: float = Field(25.0, ge=0)
    access_log: bool = True
    allow_non_loopback_unauthenticated: bool = False
    # Client connections, per worker (see docs/design.md "Client connections"). A request head must arrive
    # within header_timeout_seconds of the connection opening or of its first byte, its body within
    # body_timeout_seconds of the head; an idle kept-alive connection is closed after keepalive_timeout_seconds.
    header_timeout_seconds: float = Field(10.0, gt=0)
    body_timeout_seconds: float = Field(60.0, gt=0)
    keepalive_timeout_seconds: float = Field(75.0, gt=0)
    max_connections: int = Field(1024, ge=1)  # more are answered 503 and closed
    max_header_bytes: int = Field(64 * 1024, ge=4096)  # the whole head: request line and every header; 431
    max_header_field_bytes: int = Field(16 * 1024, ge=1024)  # one header line (name + value); 431
    max_authorization_bytes: int = Field(32 * 1024, ge=1024)  # Authorization alone (big Keycloak tokens); 431
    max_json_depth: int = Field(64, ge=8, le=200)  # nesting of the JSON body; 400 json_too_deep
    # Host names (no port) accepted in the Host header: exact names, ".example.com" for a domain and its
    # subdomains, "*" for any. Unset: any Host, except in auth mode none without
    # allow_non_loopback_unauthenticated, where only loopback names are (against DNS rebinding). Loopback
    # names (localhost, 127.0.0.1, [::1]) are always accepted. A refused Host gets 421.
    allowed_hosts: list[str] | None = None
    metrics: MetricsSettings = Field(default_factory=lambda: MetricsSettings())


class ProviderSettings(_Model):
    id: str
    type: str
    base_url: str | None = None
    api_key: str | None = Field(default=None, repr=False)
    api_key_file: str | None = None
    api_version: str | None = None
    region: str | None = None
    aws_access_key_id: str | None = Field(default=None, repr=False)
    aws_secret_access_key: str | None = Field(default=None, repr=False)
    aws_session_token: str | None = Field(default=None, repr=False)
    headers: dict[str, str] = Field(default_factory=dict)
    verify_tls: bool = True
    tls_cafile: str | None = None
    timeouts: TimeoutSettings = Field(default_factory=TimeoutSettings)
    max_connections: int = Field(256, ge=1)
    # A non-streamed answer (an error body included) larger than this, before or after gzip/deflate decoding, is
    # refused with 502 `upstream_response_too_large` and its connection dropped (streams are relayed as they come).
    max_response_bytes: int = Field(32 * 1024 * 1024, ge=1024)
    # Route `<id>/<anything>` to upstream model `<anything>` even when not registered.
    passthrough_models: bool = False
    # Provider-specific options.
    auth: Literal["api_key", "entra"] | None = None  # azure: "entra" sends the token as a bearer
    sampling_params: bool = False  # anthropic: forward temperature/top_p (newer models reject them)
    default_max_tokens: int | None = Field(default=None, ge=1)  # anthropic: when the client sets none
    # OpenAI-compatible types: what a client's `max_completion_tokens` becomes upstream. `as_sent` passes it
    # through; `max_tokens` renames it (llama.cpp, Ollama and vLLM before 0.6 ignore the new name and would
    # not stop); `both` sends both names. Unset: `max_tokens` for vllm, ollama and openai_compat, else `as_sent`.
    max_tokens_field: Literal["as_sent", "max_tokens", "both"] | None = None


class RetrySettings(_Model):
    """Per-request retry budget. Connect errors, timeouts, 5xx and 429 are retried; 4xx never."""

    max_attempts: int = Field(default=3, ge=1, le=20)  # attempts in all, the first one included
    base_delay: float = Field(default=0.2, ge=0)  # seconds; doubles per retry of a deployment already tried, jittered
    max_delay: float = Field(default=5.0, ge=0)
    # Seconds from the start of routing: no attempt, backoff or retry-after wait goes past it, and each
    # attempt's wait for its first byte is cut there. A stream that has started is bounded by timeouts.total.
    deadline: float | None = Field(default=60.0, gt=0)


class CircuitBreakerSettings(_Model):
    """A deployment failing `failure_threshold` times in a row leaves rotation for `cooldown` seconds, then
    gets a single probe request (half-open) before it is trusted again."""

    failure_threshold: int = Field(default=3, ge=1)
    cooldown: float = Field(default=30.0, ge=0)


class DeploymentSettings(_Model):
    """One place a model is served: a provider instance and that provider's name for the model."""

    provider: str
    upstream_model: str
    weight: float = Field(default=1.0, gt=0)  # strategy weighted
    timeouts: TimeoutSettings | None = None  # per field, over the model's and the provider's


class PriceSettings(_Model):
    """USD per million tokens, for a model the price catalogue does not know (or to override it)."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)  # unset: cached tokens cost as input


class ModelSettings(_Model):
    id: str
    # Single-deployment form. With `deployments`, leave these out; after loading they name the first
    # (primary) deployment either way.
    provider: str | None = None
    upstream_model: str | None = None
    deployments: list[DeploymentSettings] = Field(default_factory=list)
    strategy: Literal["fallback", "weighted", "least_busy"] = "fallback"
    # Unset: every deployment is tried once (a single deployment is not retried), no overall deadline.
    retry: RetrySettings | None = None
    circuit_breaker: CircuitBreakerSettings = Field(default_factory=lambda: CircuitBreakerSettings())
    aliases: list[str] = Field(default_factory=list)
    type: Literal["llm", "embedding"] = "llm"
    timeouts: TimeoutSettings | None = None  # per field, over the provider's
    price: PriceSettings | None = None  # unset: the genai-prices catalogue (core/pricing.py), else no cost


DEFAULT_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]


class OIDCIssuerSettings(_Model):
    issuer: str
    jwks_uri: str | None = None
    audiences: list[str] = Field(default_factory=list)
    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    leeway_seconds: float = Field(30.0, ge=0)
    accept_azp: bool = False


class OIDCSettings(_Model):
    issuers: list[OIDCIssuerSettings] = Field(default_factory=list)
    verify_tls: bool = True
    tls_cafile: str | None = None
    key_recheck_period: float = Field(3600.0, gt=0)
    stale_keys_seconds: float = Field(24 * 3600.0, ge=0)
    min_refresh_interval: float = Field(10.0, ge=0)
    claims_mapping: dict[str, str] = Field(default_factory=dict)
    client_id: str | None = None  # for resource_access.<client>.roles


class TrustedHeaderSettings(_Model):
    subject_header: str = "x-forwarded-user"
    username_header: str | None = "x-forwarded-preferred-username"
    email_header: str | None = "x-forwarded-email"
    groups_header: str | None = "x-forwarded-groups"
    roles_header: str | None = "x-forwarded-roles"
    secret_header: str = "x-llm-proxy-secret"
    secret: str | None = Field(default=None, repr=False)
    trusted_networks: list[str] = Field(default_factory=list)


class PolicyMatch(_Model):
    roles: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    subjects: list[str] = Field(default_factory=list)

    def matches(self, p: Principal) -> bool:
        """Any listed role, group, scope or subject of the principal; no conditions at all match everyone."""
        if not (self.roles or self.groups or self.scopes or self.subjects):
            return True
        return (
            any(r in p.roles for r in self.roles)
            or any(g in p.groups for g in self.groups)
            or any(s in p.scopes for s in self.scopes)
            or p.subject in self.subjects
        )


class PolicyRule(_Model):
    match: PolicyMatch = Field(default_factory=PolicyMatch)
    models: list[str] = Field(default_factory=list)
    admin: bool = False


class PolicySettings(_Model):
    rules: list[PolicyRule] = Field(default_factory=list)
    default_allow_all_models: bool = True


class RemoteTokenSettings(_Model):
    """Common to the modes that ask a service about each (new) token: hub and introspection."""

    cache_ttl: float = Field(60.0, gt=0)  # a token seen valid is trusted this long without asking again
    negative_cache_ttl: float = Field(5.0, ge=0)  # a rejected token is rejected without asking for this long
    cache_size: int = Field(10000, ge=1)
    timeout: float = Field(5.0, gt=0)  # per call to the service
    verify_tls: bool = True
    tls_cafile: str | None = None


class HubSettings(RemoteTokenSettings):
    """Konveyor's Hub (tackle2-hub) in front: its own JWTs are verified locally (discovery at <url>/oidc),
    any other bearer is resolved with GET <url>/auth/self."""

    url: str | None = None  # the Hub's base URL, e.g. http://tackle-hub.konveyor-tackle.svc:8080
    # More `iss` values to accept for the Hub's JWTs (the Hub names its issuer after the host it was reached
    # on, so tokens issued through its external route carry that host); the discovered issuer is always accepted.
    issuers: list[str] = Field(default_factory=list)
    audiences: list[str] = Field(default_factory=list)  # empty: `aud` is not checked (the Hub sets its client ids)
    algorithms: list[str] = Field(default_factory=lambda: list(DEFAULT_ALGORITHMS))
    leeway_seconds: float = Field(30.0, ge=0)


class IntrospectionSettings(RemoteTokenSettings):
    """Opaque tokens checked by a service: RFC 7662 introspection (client credentials), an OIDC userinfo-style
    GET with the bearer, or llama-stack's `custom` endpoint (POST {"api_key": ...})."""

    kind: Literal["rfc7662", "userinfo", "custom"] = "rfc7662"
    url: str | None = None
    client_id: str | None = None  # rfc7662: the resource server's client credentials
    client_secret: str | None = Field(default=None, repr=False)
    client_auth: Literal["basic", "post"] = "basic"  # client_secret_basic or client_secret_post
    token_type_hint: str | None = "access_token"
    # Principal field -> dotted claim path(s) in the response, as auth.oidc.claims_mapping.
    claims_mapping: dict[str, str] = Field(default_factory=dict)
    issuer: str | None = None  # recorded as the principal's issuer (default: the URL's origin)


class ApiKeySettings(_Model):
    """Service API keys (`llm-proxy keys create`), stored hashed in the ledger database."""

    refresh_seconds: float = Field(2.0, gt=0, le=5.0)  # poll for new and revoked keys (PostgreSQL: also NOTIFY)


AuthMode = Literal["none", "oidc", "trusted_header", "hub", "introspection", "api_keys"]
# Modes that judge a bearer token, and so can be combined in a list (tried in order, first match wins).
BEARER_MODES: tuple[str, ...] = ("oidc", "hub", "introspection", "api_keys")


class AuthSettings(_Model):
    # One mode, or several bearer modes in order (e.g. [api_keys, oidc, hub]): see docs/auth.md.
    mode: AuthMode | list[AuthMode] = "none"
    allow_unauthenticated: bool = False
    oidc: OIDCSettings = Field(default_factory=OIDCSettings)
    trusted_header: TrustedHeaderSettings = Field(default_factory=TrustedHeaderSettings)
    hub: HubSettings = Field(default_factory=HubSettings)
    introspection: IntrospectionSettings = Field(default_factory=IntrospectionSettings)
    api_keys: ApiKeySettings = Field(default_factory=ApiKeySettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    token_cache_size: int = Field(10000, ge=0)
    # A verified JWT is cached until its `exp`, but never longer than this (a token with an absurd `exp`).
    token_cache_seconds: float = Field(300.0, gt=0)

    @property
    def modes(self) -> tuple[str, ...]:
        return tuple(self.mode) if isinstance(self.mode, list) else (self.mode,)

    @property
    def mode_label(self) -> str:
        return ",".join(self.modes)


class DatabaseSettings(_Model):
    url: str = "sqlite+aiosqlite:///./var/llm-proxy.db"
    # Run the ledger's migrations at startup (`llm-proxy db upgrade` does the same on demand).
    auto_migrate: bool = True
    # Put before the name of every table (and index, and Alembic's version table) the proxy creates, so it
    # can share a database: e.g. `llm_proxy_` gives llm_proxy_usage_events and llm_proxy_alembic_version.
    table_prefix: str = Field("", pattern=r"^([a-z_][a-z0-9_]{0,23})?$")


class UsageSettings(_Model):
    enabled: bool = True
    spool_dir: str = "./var/spool"
    batch_size: int = Field(1000, ge=1)
    flush_interval_seconds: float = Field(0.25, gt=0)
    queue_size: int = Field(20000, ge=1)
    store_completions: bool = False


class TracingSettings(_Model):
    """OpenTelemetry traces (needs the `otel` extra). The OTLP exporter reads the standard OTEL_EXPORTER_OTLP_*
    variables (endpoint, headers)."""

    enabled: bool = False
    exporter: Literal["otlp", "console"] = "otlp"
    service_name: str = "llm-proxy"


class UiSettings(_Model):
    """The usage dashboard at /ui/. Login: the OIDC authorization-code flow with PKCE against `issuer` (default:
    the first auth.oidc issuer) as client `client_id` (public, or confidential with `client_secret`); the access
    token it gets is checked like any bearer, then a signed session cookie holds who it was. Without
    `client_id` the dashboard takes the bearer a gateway in front (Konveyor's Hub) sends."""

    enabled: bool = False
    issuer: str | None = None
    client_id: str | None = None
    client_secret: str | None = Field(default=None, repr=False)
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email"])
    # Default: <scheme>://<host>/ui/callback of the login request (set it behind a proxy that rewrites Host).
    redirect_uri: str | None = None
    # Signs the session cookies; default a random key per start (every worker of `serve --workers N` shares one).
    session_secret: str | None = Field(default=None, repr=False)
    session_hours: float = Field(8.0, gt=0, le=24 * 30)


LimitDimension = Literal["user", "group", "model", "api_key", "global"]

# Limit kinds: the config key -> (kind, window). Request windows slide (an exact log); tokens per minute / hour
# slide over 60 sub-buckets; per day / month are calendar windows in UTC (what a budget means to its owner).
LIMIT_KINDS: dict[str, tuple[str, str]] = {
    "requests_per_second": ("requests", "second"),
    "requests_per_minute": ("requests", "minute"),
    "requests_per_hour": ("requests", "hour"),
    "concurrent_requests": ("concurrent", "lease"),
    "tokens_per_minute": ("tokens", "minute"),
    "tokens_per_hour": ("tokens", "hour"),
    "tokens_per_day": ("tokens", "day"),
    "tokens_per_month": ("tokens", "month"),
    "usd_per_day": ("usd", "day"),
    "usd_per_month": ("usd", "month"),
}


class LimitRule(_Model):
    """One rule: a counter per `per` key (its values combined) for each principal it matches."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    per: LimitDimension | list[LimitDimension] = "user"
    match: PolicyMatch | None = None  # as auth.policy's rules; unset: every principal
    models: list[str] = Field(default_factory=list)  # globs over the model id; empty: every model
    requests_per_second: int | None = Field(default=None, ge=1)
    requests_per_minute: int | None = Field(default=None, ge=1)
    requests_per_hour: int | None = Field(default=None, ge=1)
    concurrent_requests: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_hour: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    tokens_per_month: int | None = Field(default=None, ge=1)
    usd_per_day: float | None = Field(default=None, gt=0)
    usd_per_month: float | None = Field(default=None, gt=0)

    @property
    def dimensions(self) -> tuple[str, ...]:
        return tuple(self.per) if isinstance(self.per, list) else (self.per,)


class LimitsSettings(_Model):
    """Request, token and dollar limits (core/limits.py). No rules: nothing is checked or counted."""

    store: str = "memory"  # memory (this process only) or redis://host:port/db (exact across replicas)
    on_store_error: Literal["deny", "allow"] = "deny"  # the store unreachable: 503, or serve and log loudly
    key_prefix: str = Field("llm-proxy:limits:", max_length=64)
    # A concurrent request's slot expires after this even if its replica never gives it back (crashed).
    concurrency_lease_seconds: float = Field(900.0, gt=0)
    timeout_seconds: float = Field(0.5, gt=0)  # per store call; past it the store counts as unreachable
    rules: list[LimitRule] = Field(default_factory=list)


class Settings(_Model):
    server: ServerSettings = Field(default_factory=ServerSettings)
    providers: list[ProviderSettings] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    default_model: str | None = None
    auth: AuthSettings = Field(default_factory=AuthSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    ui: UiSettings = Field(default_factory=UiSettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    redis_url: str | None = None


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
# Environment substitution
# --------------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)(?:(:=|:\+|:)([^}]*))?\}")


@dataclass
class _Subst:
    env: Mapping[str, str]
    unset: list[tuple[str, str]] = field(default_factory=list)  # (path, var)
    broken: set[str] = field(default_factory=set)

    def string(self, value: str, path: str) -> str | None:
        whole = _ENV_RE.fullmatch(value)

        def repl(m: re.Match[str]) -> str:
            name, op, arg = m.group(1), m.group(2), m.group(3)
            current = self.env.get(name)
            if op == ":+":
                return (arg or "") if current else ""
            if op in (":=", ":"):
                if op == ":":
                    self.broken.add(name)
                return current if current else (arg or "")
            if current is None:
                self.unset.append((path, name))
                return ""
            return current

        before = len(self.unset)
        out = _ENV_RE.sub(repl, value)
        if len(self.unset) > before:
            return out  # already reported as unset; "" keeps the field's type so other checks still run
        # A value that was only a substitution and came out empty means "not set" (llama-stack does the same).
        if whole is not None and out == "":
            return None
        return out

    def walk(self, node: Any, path: str) -> Any:
        if isinstance(node, str):
            return self.string(node, path)
        if isinstance(node, list):
            return [self.walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: self.walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        return node


def _broken_form_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        for m in _ENV_RE.finditer(line):
            if m.group(2) == ":":
                out.append((no, m.group(0)))
    return out


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


# Environment variables that configure authentication whatever the config file says (Konveyor's operator
# renders a run.yaml without an auth block; these on its Deployment switch hub mode on). See docs/konveyor.md.
AUTH_MODE_ENV = "LLM_PROXY_AUTH_MODE"  # a mode or a comma-separated list: hub | api_keys,hub | ...
HUB_URL_ENV = "LLM_PROXY_HUB_URL"
HUB_CACHE_TTL_ENV = "LLM_PROXY_HUB_CACHE_TTL"
HUB_ISSUERS_ENV = "LLM_PROXY_HUB_ISSUERS"  # comma-separated extra `iss` values of the Hub's JWTs


def _auth_env(doc: dict[str, Any], env: Mapping[str, str], notes: list[str], problems: list[str]) -> None:
    raw = {name: env.get(name, "").strip() for name in (AUTH_MODE_ENV, HUB_URL_ENV, HUB_CACHE_TTL_ENV,
                                                         HUB_ISSUERS_ENV)}
    if not any(raw.values()):
        return
    auth = doc.get("auth")
    auth = dict(auth) if isinstance(auth, dict) else {}
    if raw[AUTH_MODE_ENV]:
        modes = [m.strip() for m in raw[AUTH_MODE_ENV].split(",") if m.strip()]
        auth["mode"] = modes[0] if len(modes) == 1 else modes
        notes.append(f"auth.mode is {','.join(modes)} (from {AUTH_MODE_ENV})")
    hub = auth.get("hub")
    hub = dict(hub) if isinstance(hub, dict) else {}
    if raw[HUB_URL_ENV]:
        hub["url"] = raw[HUB_URL_ENV]
    if raw[HUB_CACHE_TTL_ENV]:
        try:
            hub["cache_ttl"] = float(raw[HUB_CACHE_TTL_ENV])
        except ValueError:
            problems.append(f"{HUB_CACHE_TTL_ENV}: '{raw[HUB_CACHE_TTL_ENV]}' is not a number of seconds")
    if raw[HUB_ISSUERS_ENV]:
        hub["issuers"] = [i.strip() for i in raw[HUB_ISSUERS_ENV].split(",") if i.strip()]
    if hub:
        auth["hub"] = hub
    doc["auth"] = auth


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
        idx = _provider_index(upath, source, doc)
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


def _provider_index(upath: str, source: str, doc: Mapping[str, Any]) -> int | None:
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


def json_schema() -> dict[str, Any]:
    """JSON Schema of the native config format (published as schema/config.schema.json)."""
    schema = Settings.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llm-proxy configuration"
    return schema
