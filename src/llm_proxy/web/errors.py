"""OpenAI-style error responses."""

from __future__ import annotations

import logging

from aiohttp import web

from ..errors import ProxyError, internal_error
from .response import JSON, Reply

log = logging.getLogger("llm_proxy.web")


def error_response(err: ProxyError, request_id: str) -> web.Response:
    return Reply(err.body(), JSON, status=err.status, headers=err.headers, request_id=request_id)


def from_http_exception(exc: web.HTTPException) -> ProxyError:
    status = exc.status
    if status == 404:
        return ProxyError("Not found", status=404, type="invalid_request_error", code="not_found")
    if status == 405:
        allow = exc.headers.get("Allow", "")
        return ProxyError("Method not allowed", status=405, type="invalid_request_error", code="method_not_allowed",
                          headers={"Allow": allow})
    if status == 413:
        return ProxyError(
            "Request body is larger than the configured limit",
            status=413, type="invalid_request_error", code="request_too_large",
        )
    return ProxyError(exc.reason or "Request failed", status=status, type="invalid_request_error")


def as_proxy_error(exc: Exception, request_id: str, path: str) -> ProxyError:
    """What a client is told of an exception a handler raised (call it in the `except` block: an unexpected one
    is logged with its traceback, which the client never sees)."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, web.HTTPException):
        return from_http_exception(exc)
    log.exception("unhandled error", extra={"request_id": request_id, "path": path})
    return internal_error(request_id)
