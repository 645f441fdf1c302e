"""The ProxyError tree: each error knows its HTTP status and its OpenAI error type and code."""

from __future__ import annotations

from typing import Any

import orjson


class ProxyError(Exception):
    """Base of every error that may reach a client. The message must be safe to show."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers: dict[str, str] = headers or {}
        # What the upstream said when `message` is our generic text instead (scrubbed): for the log, never a client.
        self.detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return orjson.dumps(self.to_dict())


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


BEARER_CHALLENGE = 'Bearer error="invalid_token"'


class Unauthorized(ProxyError):
    """401. `challenge` is the WWW-Authenticate value unless `headers` sets one; None sends no challenge (for
    credentials the client cannot present itself, such as identity headers set by a gateway in front)."""

    status = 401
    type = "authentication_error"
    code = "invalid_token"

    def __init__(self, message: str, *, challenge: str | None = BEARER_CHALLENGE, **kw: Any) -> None:
        headers = kw.pop("headers", None) or {}
        if challenge is not None:
            headers.setdefault("WWW-Authenticate", challenge)
        super().__init__(message, headers=headers, **kw)


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    """The upstream answered with an error; status and message are passed through."""

    type = "api_error"


class UpstreamUnreachable(ProxyError):
    status = 502
    type = "api_error"
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "api_error"
    code = "upstream_timeout"


class ServiceUnavailable(ProxyError):
    status = 503
    type = "api_error"
    code = "service_unavailable"


class AuthUnavailable(ServiceUnavailable):
    code = "auth_unavailable"


# The closed set of error types the usage ledger and the access log record. A client may see an upstream's own
# `type` (when it is a plain token); what we store is always one of these.
ERROR_TYPES: frozenset[str] = frozenset({
    "invalid_request_error", "authentication_error", "permission_error", "rate_limit_error", "insufficient_quota",
    "api_error", "server_error", "client_disconnected",
})

# Codes the attempts list (usage row `extra.attempts`) may record: ours, and OpenAI's well-known ones.
ERROR_CODES: frozenset[str] = frozenset({
    "upstream_auth_failed", "upstream_unreachable", "upstream_timeout", "bad_upstream_response", "bad_upstream_url",
    "bad_upstream_header", "upstream_response_too_large", "upstream_stream_truncated", "upstream_stream_empty",
    "service_unavailable", "overloaded", "model_error", "model_not_ready",
    "model_not_found", "rate_limit_exceeded", "budget_exceeded", "limits_unavailable", "insufficient_quota",
    "request_too_large", "provider_disabled",
    "auth_unavailable", "context_length_exceeded", "content_filter", "invalid_api_key", "server_error",
    "client_disconnected",
})


def ledger_error_type(exc: ProxyError) -> str:
    """`exc`'s type if it is one of ours (ERROR_TYPES), else the one its status implies."""
    if exc.type in ERROR_TYPES:
        return exc.type
    status = exc.status
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def ledger_error_code(exc: ProxyError) -> str:
    """What the attempts list records for a failed attempt: a code from ERROR_CODES, else the ledger type."""
    code = exc.code
    return code if code is not None and code in ERROR_CODES else ledger_error_type(exc)


class ConfigError(Exception):
    """Configuration problems; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def internal_error(request_id: str) -> ProxyError:
    return ProxyError(f"Internal server error (request id {request_id})", status=500, type="server_error")
