"""OpenAI-style error responses."""

from __future__ import annotations

from aiohttp import web

from ..errors import ProxyError

_JSON = "application/json"


def error_response(err: ProxyError, request_id: str) -> web.Response:
    headers = {**err.headers, "x-request-id": request_id}
    return web.Response(status=err.status, body=err.body(), content_type=_JSON, headers=headers)


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
