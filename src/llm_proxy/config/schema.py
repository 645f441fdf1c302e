"""The settings models: the native config format, validated by pydantic (and published as a JSON Schema)."""

from __future__ import annotations

import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..types import Principal

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
    # A client API the provider speaks itself gets its requests as they came, the model renamed, instead of
    # translated (type anthropic: /v1/messages; type openai: /v1/responses). Unset: true for anthropic, and for
    # openai when its base URL is OpenAI's own (api.openai.com).
    native_client_api: bool | None = None


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


def json_schema() -> dict[str, Any]:
    """JSON Schema of the native config format (published as schema/config.schema.json)."""
    schema = Settings.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llm-proxy configuration"
    return schema
