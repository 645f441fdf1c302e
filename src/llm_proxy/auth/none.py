"""The explicit no-authentication mode: every caller is the anonymous principal."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import ANONYMOUS, Principal


class NoAuth:
    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def authenticate(self, headers: Mapping[str, str], peer: str | None) -> Principal:
        return ANONYMOUS

    def health(self) -> dict[str, Any]:
        return {"ok": True, "mode": "none"}
