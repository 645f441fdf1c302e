"""The upstream client's own exceptions, and `_map`: the one place upstream I/O exceptions become ProxyErrors."""

from __future__ import annotations

from ...errors import ProxyError, UpstreamTimeout, UpstreamUnreachable


class BadResponse(Exception):
    """The upstream broke HTTP/1.1 framing (the connection is dropped)."""


class TooLarge(BadResponse):
    """A non-streamed body (or its inflated form) over the provider's `max_response_bytes`."""


class ProxyRefused(ConnectionError):
    """The HTTP proxy would not open a tunnel to the upstream."""

    def __init__(self, status: int) -> None:
        super().__init__(f"proxy answered {status} to CONNECT")
        self.status = status


class _Closed(ConnectionError):
    def __init__(self, got_bytes: bool) -> None:
        super().__init__("connection closed")
        self.got_bytes = got_bytes  # any byte of the response had arrived


def _map(exc: BaseException, provider_id: str, stage: str) -> ProxyError:
    """Every foreign exception from upstream I/O becomes a ProxyError here, and nowhere else."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, TimeoutError):
        if stage == "connecting":
            return UpstreamUnreachable(f"Upstream provider '{provider_id}' connection timed out")
        return UpstreamTimeout(f"Upstream provider '{provider_id}' timed out {stage}")
    if isinstance(exc, TooLarge):
        return ProxyError(
            f"Upstream provider '{provider_id}' sent a response larger than the proxy accepts ({exc})",
            status=502, type="api_error", code="upstream_response_too_large",
        )
    if isinstance(exc, BadResponse):
        return UpstreamUnreachable(
            f"Upstream provider '{provider_id}' sent an invalid HTTP response ({exc})", code="bad_upstream_response"
        )
    if isinstance(exc, ProxyRefused):
        return UpstreamUnreachable(
            f"Upstream provider '{provider_id}' is unreachable: the HTTP proxy answered {exc.status} to CONNECT"
        )
    if stage == "connecting":
        return UpstreamUnreachable(f"Upstream provider '{provider_id}' is unreachable")
    return UpstreamUnreachable(f"Upstream provider '{provider_id}' closed the connection {stage}")
