"""Verified JWT claims (Keycloak-shaped by default) to a Principal, through a dotted `claims_mapping`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..types import Principal

log = logging.getLogger("llm_proxy.auth")

FIELDS = ("subject", "username", "email", "groups", "roles", "scopes")
_LIST_FIELDS = frozenset({"groups", "roles", "scopes"})
_MAX_ITEMS = 1000
_MAX_LEN = 1024


def claim_path(claims: Mapping[str, Any], path: str) -> Any:
    """Follow a dotted path (`realm_access.roles`). A key that itself contains dots is matched whole first,
    so `resource_access.my.client.roles` finds the client `my.client`."""
    node: Any = claims
    rest = path
    while rest:
        if not isinstance(node, Mapping):
            return None
        if rest in node:
            return node[rest]
        parts = rest.split(".")
        for i in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:i])
            if head in node:
                node, rest = node[head], ".".join(parts[i:])
                break
        else:
            return None
    return node


def _strings(value: Any) -> list[str]:
    """A claim as a list of strings: a list keeps its string items, a string is split on spaces."""
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, str) and v]
    return []


def _dedupe(items: Iterable[str]) -> tuple[str, ...]:
    out = dict.fromkeys(i for i in items if len(i) <= _MAX_LEN)
    return tuple(list(out)[:_MAX_ITEMS])


class ClaimsMapper:
    """Builds a Principal from claims. Each mapping value is a dotted path, or several separated by commas
    (lists are merged; for single values the first path present wins)."""

    def __init__(self, mapping: Mapping[str, str] | None = None, client_ids: Sequence[str] = ()) -> None:
        self.paths: dict[str, tuple[str, ...]] = {
            "subject": ("sub",),
            "username": ("preferred_username",),
            "email": ("email",),
            "groups": ("groups",),
            "roles": ("realm_access.roles", *(f"resource_access.{c}.roles" for c in client_ids)),
            "scopes": ("scope", "scp"),
        }
        for key, value in (mapping or {}).items():
            if key not in FIELDS:
                raise ValueError(f"auth.oidc.claims_mapping: unknown key '{key}'; known keys: {', '.join(FIELDS)}")
            paths = tuple(p.strip() for p in str(value).split(",") if p.strip())
            if not paths:
                raise ValueError(f"auth.oidc.claims_mapping.{key}: empty claim path")
            self.paths[key] = paths

    def _one(self, claims: Mapping[str, Any], name: str) -> str | None:
        for path in self.paths[name]:
            value = claim_path(claims, path)
            if isinstance(value, str) and value and len(value) <= _MAX_LEN:
                return value
            if isinstance(value, int | float) and not isinstance(value, bool):
                return str(value)
        return None

    def _many(self, claims: Mapping[str, Any], name: str) -> tuple[str, ...]:
        return _dedupe(item for path in self.paths[name] for item in _strings(claim_path(claims, path)))

    def principal(self, claims: Mapping[str, Any], *, issuer: str | None, auth_method: str) -> Principal | None:
        """The principal, or None when the subject claim is missing."""
        subject = self._one(claims, "subject")
        if subject is None:
            return None
        return Principal(
            subject=subject,
            username=self._one(claims, "username"),
            email=self._one(claims, "email"),
            groups=self._many(claims, "groups"),
            roles=self._many(claims, "roles"),
            scopes=self._many(claims, "scopes"),
            issuer=issuer,
            auth_method=auth_method,
        )
