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
_PARTIAL_MIN = 24
_PIECE = 16
_KEY_CHARS = r"[A-Za-z0-9_\-./+=%~]{0,512}"


class _Scrubber:
    """One case-insensitive pattern for every form of a set of secrets an upstream may echo: as sent, and
    percent-encoded (query strings, URLs in messages), and with needles for a cheap pre-check, so that a message
    that holds none of them (the usual case) costs a casefold and a few substring tests, not a regex pass."""

    __slots__ = ("needles", "pattern")

    def __init__(self, secrets: tuple[str, ...]) -> None:
        forms: set[str] = set()
        for s in secrets:
            forms.add(s)
            forms.add(quote(s, safe=""))
            forms.add(quote_plus(s, safe=""))
        # Longest first: a form that contains another must win the alternation.
        full = sorted(forms, key=len, reverse=True)
        alternatives = [re.escape(f) for f in full]
        # A long key cut short (an upstream that truncates its message mid-key) is still a leak: its first
        # _PIECE characters and whatever key characters follow them go too.
        alternatives += [re.escape(f[:_PIECE]) + _KEY_CHARS for f in full if len(f) >= _PARTIAL_MIN]
        self.pattern = re.compile("|".join(alternatives), re.IGNORECASE)
        # Every match starts with one of these.
        self.needles = tuple({f[:_PIECE].casefold() for f in full})

    def present(self, text: str) -> bool:
        """False only when the pattern cannot match. Beyond ASCII, case rules differ in corners (the regex folds
        U+0130 to "i", casefold does not), so such text always takes the regex."""
        if not text.isascii():
            return True
        folded = text.casefold()
        return any(n in folded for n in self.needles)


@functools.lru_cache(maxsize=64)
def _scrubber(secrets: tuple[str, ...]) -> _Scrubber | None:
    # Compiled once per set of secrets (keys rotate rarely).
    return _Scrubber(secrets) if secrets else None


def _scrubber_for(secrets: Iterable[str | None]) -> _Scrubber | None:
    return _scrubber(tuple(sorted({s for s in secrets if s and len(s) >= _MIN_SECRET})))


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Remove every credential that an upstream might echo back (any letter case, percent-encoded too)."""
    sc = _scrubber_for(secrets)
    if sc is None or not sc.present(text):
        return text
    return sc.pattern.sub(REDACTED, text)


def contains_secret(text: str, secrets: Iterable[str | None]) -> bool:
    sc = _scrubber_for(secrets)
    return sc is not None and sc.present(text) and sc.pattern.search(text) is not None


# Static headers configured on a provider whose values are credentials (llama-stack api_token, a gateway's key).
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|password|cookie|signature", re.IGNORECASE)


def header_secrets(headers: Mapping[str, str]) -> list[str | None]:
    """Values of configured extra headers that carry credentials, to be scrubbed like the provider's key."""
    return [v for k, v in headers.items() if _CREDENTIAL_HEADER.search(k)]
