"""Credential sources: a literal key or a mounted Secret file re-read when it changes (rotation)."""

from __future__ import annotations

import os
import time


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


def scrub(text: str, secrets: list[str | None]) -> str:
    """Remove any credential that an upstream might echo back in an error message."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "[redacted]")
    return text
