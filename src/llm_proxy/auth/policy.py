"""Access policy: which principals may use which models, and who is an admin."""

from __future__ import annotations

from fnmatch import fnmatchcase

from ..config import PolicyRule, PolicySettings
from ..types import Principal


def _matches(rule: PolicyRule, p: Principal) -> bool:
    return rule.match.matches(p)  # a rule without conditions applies to every authenticated principal


class RulePolicy:
    """Allow-lists from rules; with no rules every principal may use every configured model."""

    def __init__(self, settings: PolicySettings) -> None:
        self._rules = settings.rules
        self._default_all = settings.default_allow_all_models and not any(r.models for r in settings.rules)
        self._cache: dict[tuple[Principal, str], bool] = {}

    def may_use(self, principal: Principal, model_id: str) -> bool:
        scope = principal.models
        if scope is not None:  # a service API key: the models it was created for, whatever the rules say
            return any(fnmatchcase(model_id, g) for g in scope)
        if self._default_all:
            return True
        key = (principal, model_id)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        ok = any(
            _matches(r, principal) and any(fnmatchcase(model_id, g) for g in r.models) for r in self._rules
        )
        if len(self._cache) > 50_000:
            self._cache.clear()
        self._cache[key] = ok
        return ok

    def is_admin(self, principal: Principal) -> bool:
        if principal.models is not None:
            return False  # a service API key sees only its own usage, whatever the rules say
        return principal.is_admin or any(r.admin and _matches(r, principal) for r in self._rules)
