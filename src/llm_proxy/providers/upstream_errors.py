"""An upstream's error made safe to relay and to store: the one function every translator's error path ends in.

Everything an upstream says when it fails is untrusted text: it may echo the credential we sent (in any field, in
any letter case, percent-encoded), and a failing server may describe its own internals (file paths, traceback
lines). `upstream_error` scrubs every configured credential from the message, relays the upstream's `type`,
`code` and `param` only when they are plain tokens with no credential in them, keeps only well-formed
`retry-after` values, and replaces a 5xx message that looks like internals with our own (the original, scrubbed,
goes to `ProxyError.detail` for the log). Only error paths call this: successful responses never pay for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import ProxyError, RateLimited, UpstreamError
from .credentials import contains_secret, scrub

MAX_MESSAGE = 2000
MAX_DETAIL = 1000  # what the log keeps of an unreadable 5xx body

# A relayable `type` / `code`: one short word such as invalid_request_error, BadRequestError, 429, content_filter.
_TOKEN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# A run this long with no separator is not a word but a key, a hash or an id.
_SEGMENT = re.compile(r"[A-Za-z0-9]{33,}")
# A relayable `param`: a JSON path such as messages[0].content or tools[2].function.name.
_PARAM = re.compile(r"[A-Za-z0-9_.\[\]-]{1,128}")

_RETRY_AFTER = re.compile(r"\d{1,10}(?:\.\d{1,6})?|[A-Za-z]{3}, \d{2} [A-Za-z]{3} \d{4} \d{2}:\d{2}:\d{2} GMT")
_RETRY_AFTER_MS = re.compile(r"\d{1,12}(?:\.\d{1,6})?")

# What a server's internals look like in an error message: Python / Java / JS / Go stack frames, source file
# paths, package directories.
_INTERNALS = re.compile(
    r"Traceback \(most recent call last\)"
    r'|File "[^"\n]+", line \d+'
    r"|\bat [\w$.<>]+\([^()\n]*:\d+\)"
    r"|\n\s+at \S"
    r"|(?:^|[\s(\"'=:])(?:/[\w.@+-]+){2,}\.(?:py|pyc|js|mjs|cjs|ts|go|java|kt|scala|rb|rs|cc|cpp|c|h|php|cs|so)\b"
    r"|(?:^|[\s(\"'=:])/(?:usr|opt|home|srv|app|var|root|workspace|tmp|lib|etc)/[\w.@+-]+/"
    r"|\b[A-Za-z]:\\[\w. -]+\\"
    r"|\.(?:py|go|js|ts|rs|java|rb|php):\d+\b"
    r"|\bgoroutine \d+ \[|\bpanic: |site-packages|dist-packages|node_modules"
)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def safe_token(value: Any, secrets: Iterable[str | None]) -> str | None:
    """`value` as a string if it may be relayed as an error `type` or `code`, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        value = str(value)
    if not isinstance(value, str) or not _TOKEN.fullmatch(value) or _SEGMENT.search(value):
        return None
    return None if contains_secret(value, secrets) else value


def safe_param(value: Any, secrets: Iterable[str | None]) -> str | None:
    if not isinstance(value, str) or not _PARAM.fullmatch(value) or _SEGMENT.search(value):
        return None
    return None if contains_secret(value, secrets) else value


def safe_text(value: Any, secrets: Iterable[str | None], limit: int = MAX_MESSAGE) -> str | None:
    """Upstream free text for a client or a log: credentials and control characters removed, then cut."""
    if not isinstance(value, str) or not value:
        return None
    # Scrub before cutting, so the cut cannot leave half a key behind.
    text = _CONTROL.sub(" ", scrub(value, secrets))
    return text[:limit] if len(text) > limit else text


def status_from(value: Any, default: int = 502) -> int:
    """An HTTP error status an upstream put in a body field (vLLM's and Gemini's `code`), else `default`."""
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value < 600:
        return value
    return default


def looks_internal(message: str) -> bool:
    """True when a message shows a server's internals (stack frames, source paths)."""
    return _INTERNALS.search(message) is not None or message.count("\n") >= 4


def retry_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The upstream's retry-after / retry-after-ms, when they are what those headers may hold."""
    out: dict[str, str] = {}
    v = headers.get("retry-after")
    if v and _RETRY_AFTER.fullmatch(v.strip()):
        out["retry-after"] = v.strip()
    v = headers.get("retry-after-ms")
    if v and _RETRY_AFTER_MS.fullmatch(v.strip()):
        out["retry-after-ms"] = v.strip()
    return out


def upstream_error(
    status: int,
    headers: Mapping[str, str],
    message: Any,
    etype: Any,
    code: Any,
    param: Any,
    provider_id: str,
    secrets: Iterable[str | None],
    raw: bytes = b"",
) -> ProxyError:
    """The ProxyError for an upstream failure. `message`, `etype`, `code` and `param` are the upstream's raw
    values (any JSON type, or None) or a translator's own mapping; `status` is the upstream's HTTP status; `raw`
    the body, kept (scrubbed, cut) for the log when a 5xx has no message we could read."""
    secrets = list(secrets)
    text = safe_text(message, secrets)
    if status in (401, 403):
        # A 401 from the proxy means "your token is bad"; an upstream credential problem is ours.
        err: ProxyError = UpstreamError(
            f"Upstream provider '{provider_id}' rejected the proxy's credentials (HTTP {status})",
            status=502,
            type="api_error",
            code="upstream_auth_failed",
        )
        err.detail = text
        return err
    if not 400 <= status < 600:
        status = 502
    out_headers = retry_headers(headers)
    etype = safe_token(etype, secrets)
    code = safe_token(code, secrets)
    param = safe_param(param, secrets)
    detail = None
    if text is None:
        text = f"Upstream provider '{provider_id}' returned HTTP {status}"
        if status >= 500 and raw:
            # Decoded well past what is kept, so the cut never falls inside a key the scrub has to recognise.
            detail = safe_text(raw[: 4 * MAX_DETAIL].decode("utf-8", "replace"), secrets, MAX_DETAIL)
    elif status >= 500 and looks_internal(text):
        detail = text
        text = f"Upstream provider '{provider_id}' failed with an internal error (HTTP {status})"
    if status == 429:
        err = RateLimited(text, type=etype or "rate_limit_error", code=code or "rate_limit_exceeded", param=param,
                          headers=out_headers)
    else:
        err = UpstreamError(text, status=status, type=etype or ("invalid_request_error" if status < 500 else
                            "api_error"), code=code, param=param, headers=out_headers)
    err.detail = detail
    return err


def scrub_error(err: ProxyError, secrets: Iterable[str | None]) -> None:
    """Scrub an error's client-visible strings in place: the last pass over whatever an attempt raised (its
    message may quote an upstream's header, and another provider's credentials are checked here too)."""
    secrets = list(secrets)
    err.message = scrub(err.message, secrets)
    err.args = (err.message,)
    if err.detail is not None:
        err.detail = scrub(err.detail, secrets)
    if err.param is not None and contains_secret(err.param, secrets):
        err.param = None
    if contains_secret(err.type, secrets):
        err.type = "api_error"
    if err.code is not None and contains_secret(err.code, secrets):
        err.code = None
    for k, v in list(err.headers.items()):
        if contains_secret(v, secrets):
            del err.headers[k]
