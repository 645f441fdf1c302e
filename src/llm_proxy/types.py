"""Frozen value types shared by every layer (no I/O, no framework imports)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Built by auth/, read by core/ and the usage ledger."""

    subject: str
    username: str | None = None
    email: str | None = None
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    issuer: str | None = None
    auth_method: str = "none"
    is_admin: bool = False
    models: tuple[str, ...] | None = None  # a service API key's model scope (globs); None: the policy decides


ANONYMOUS = Principal(subject="anonymous", username="anonymous", auth_method="none")


@dataclass(slots=True)
class Usage:
    """Token counts as reported by the upstream, or estimated by core/usage_estimate.py when it reported none
    (`estimated`)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int | None = None
    estimated: bool = False

    @classmethod
    def from_openai(cls, data: Any) -> Usage | None:
        if not isinstance(data, dict):
            return None
        get = data.get
        prompt = get("prompt_tokens")
        completion = get("completion_tokens")
        total = get("total_tokens")
        details = get("prompt_tokens_details")
        # The usual report: three non-zero ints (not bools), cached tokens as an int or absent. The same values the
        # general path below gives, without its int() calls and `or` defaults.
        if type(prompt) is int and type(completion) is int and type(total) is int and total:
            if details is None:
                return cls(prompt, completion, total)
            if type(details) is dict:
                cached = details.get("cached_tokens")
                if type(cached) is int:
                    return cls(prompt, completion, total, cached)
        prompt = int(prompt or 0)
        completion = int(completion or 0)
        total = int(total or (prompt + completion))
        cached = None
        if isinstance(details, dict) and details.get("cached_tokens") is not None:
            cached = int(details["cached_tokens"])
        return cls(prompt, completion, total, cached)

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


@dataclass(slots=True)
class UsageEvent:
    """One finished request, as the ledger stores it. request_id is the idempotency key.

    Not frozen: one is built per request, and a frozen dataclass sets each of its 25 fields through
    object.__setattr__ (~3 us a request). Nothing changes an event once it is built.
    """

    request_id: str
    started_at: float  # unix seconds
    ended_at: float
    endpoint: str
    status: int
    subject: str | None = None
    username: str | None = None
    model: str | None = None  # public id the client asked for
    provider_id: str | None = None
    upstream_model: str | None = None
    streamed: bool = False
    error_type: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    latency_ms: float | None = None
    ttft_ms: float | None = None
    upstream_latency_ms: float | None = None
    attempts: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # New fields go at the end only (the journal's lines are positional: store/journal_format.py:JOURNAL_FIELDS).
    usage_estimated: bool = False  # the token counts are estimates (the upstream reported none)
    cost_usd: float | None = None  # what the answer cost (core/pricing.py); None: the model has no price
    # The caller's groups (Principal.groups; a list once read back from a journal line); None or empty: none.
    groups: tuple[str, ...] | list[str] | None = None
    client_api: str | None = None  # the ingress's name (ingress/: "openai.chat", ...); None: not recorded


# Service API keys (`llm-proxy keys create`) start with this; auth/ recognises them by it, store/ keeps them.
API_KEY_PREFIX = "llmp_"


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A service API key as stored (its sha256, never the key)."""

    id: str
    name: str
    key_hash: str
    models: tuple[str, ...]
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: never the key or its hash."""
        return {
            "id": self.id,
            "name": self.name,
            "models": list(self.models),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }
