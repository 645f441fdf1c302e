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


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


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


class ConfigError(Exception):
    """Configuration problems; carries every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def internal_error(request_id: str) -> ProxyError:
    return ProxyError(f"Internal server error (request id {request_id})", status=500, type="server_error")
