"""Credential sources: a literal key or a mounted Secret file re-read when it changes (rotation)."""

from __future__ import annotations

import functools
import os
import re
import time
from collections.abc import Iterable, Mapping
from urllib.parse import quote, quote_plus

# Shorter "secrets" (a placeholder such as "none") would only mangle messages.
_MIN_SECRET = 4


class KeySource:
    """Returns the current API key. A file (api_key_file) wins over a literal and is re-checked
    at most once per `recheck_seconds`, so a rotated Kubernetes Secret is picked up without restart."""

    __slots__ = ("_checked", "_key", "_literal", "_mtime", "_path", "recheck_seconds")

    def __init__(self, literal: str | None, path: str | None, recheck_seconds: float = 1.0) -> None:
        self._literal = literal or None
        self._path = path
        self._key: str | None = self._literal
        self._mtime = -1.0
        self._checked = 0.0
        self.recheck_seconds = recheck_seconds
        if path:
            self._reload(time.monotonic())

    def _reload(self, now: float) -> None:
        self._checked = now
        assert self._path is not None
        try:
            mtime = os.stat(self._path).st_mtime
            if mtime != self._mtime:
                with open(self._path, encoding="utf-8") as fh:
                    self._key = fh.read().strip() or self._literal
                self._mtime = mtime
        except OSError:
            self._key = self._literal

    def get(self) -> str | None:
        if self._path is not None:
            now = time.monotonic()
            if now - self._checked >= self.recheck_seconds:
                self._reload(now)
        return self._key

    def describe(self) -> str:
        return f"file {self._path}" if self._path else "api_key"


REDACTED = "[redacted]"


@functools.lru_cache(maxsize=64)
def _secret_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One case-insensitive pattern for every form of the given secrets an upstream may echo: as sent, and
    percent-encoded (query strings, URLs in messages). Compiled once per set of secrets (keys rotate rarely)."""
    forms: set[str] = set()
    for s in secrets:
        forms.add(s)
        forms.add(quote(s, safe=""))
        forms.add(quote_plus(s, safe=""))
    if not forms:
        return None
    # Longest first: a form that contains another must win the alternation.
    return re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)), re.IGNORECASE)


def _pattern_for(secrets: Iterable[str | None]) -> re.Pattern[str] | None:
    return _secret_pattern(tuple(sorted({s for s in secrets if s and len(s) >= _MIN_SECRET})))


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Remove every credential that an upstream might echo back (any letter case, percent-encoded too)."""
    pattern = _pattern_for(secrets)
    return text if pattern is None else pattern.sub(REDACTED, text)


def contains_secret(text: str, secrets: Iterable[str | None]) -> bool:
    pattern = _pattern_for(secrets)
    return pattern is not None and pattern.search(text) is not None


# Static headers configured on a provider whose values are credentials (llama-stack api_token, a gateway's key).
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|password|cookie|signature", re.IGNORECASE)


def header_secrets(headers: Mapping[str, str]) -> list[str | None]:
    """Values of configured extra headers that carry credentials, to be scrubbed like the provider's key."""
    return [v for k, v in headers.items() if _CREDENTIAL_HEADER.search(k)]
