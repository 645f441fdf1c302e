"""Header access that keeps repeated headers apart (aiohttp multi-dicts) and works on plain mappings."""

from __future__ import annotations

from collections.abc import Mapping


def header_values(headers: Mapping[str, str], name: str) -> list[str]:
    """Every value of a header, case-insensitively; repeated headers are returned separately."""
    getall = getattr(headers, "getall", None)
    if getall is not None:
        return list(getall(name, []))
    lname = name.lower()
    return [v for k, v in headers.items() if k.lower() == lname]
