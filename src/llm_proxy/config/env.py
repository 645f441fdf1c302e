"""The environment's part in a config: ${env.X} substitution, and the variables that configure auth."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# --------------------------------------------------------------------------------------------------
# Environment substitution
# --------------------------------------------------------------------------------------------------

_ENV_RE = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)(?:(:=|:\+|:)([^}]*))?\}")


@dataclass
class _Subst:
    env: Mapping[str, str]
    unset: list[tuple[str, str]] = field(default_factory=list)  # (path, var)

    def string(self, value: str, path: str) -> str | None:
        whole = _ENV_RE.fullmatch(value)

        def repl(m: re.Match[str]) -> str:
            name, op, arg = m.group(1), m.group(2), m.group(3)
            current = self.env.get(name)
            if op == ":+":
                return (arg or "") if current else ""
            if op in (":=", ":"):
                return current if current else (arg or "")
            if current is None:
                self.unset.append((path, name))
                return ""
            return current

        before = len(self.unset)
        out = _ENV_RE.sub(repl, value)
        if len(self.unset) > before:
            return out  # already reported as unset; "" keeps the field's type so other checks still run
        # A value that was only a substitution and came out empty means "not set" (llama-stack does the same).
        if whole is not None and out == "":
            return None
        return out

    def walk(self, node: Any, path: str) -> Any:
        if isinstance(node, str):
            return self.string(node, path)
        if isinstance(node, list):
            return [self.walk(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if isinstance(node, dict):
            return {k: self.walk(v, f"{path}.{k}" if path else str(k)) for k, v in node.items()}
        return node


def _broken_form_lines(text: str) -> list[tuple[int, str]]:
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        for m in _ENV_RE.finditer(line):
            if m.group(2) == ":":
                out.append((no, m.group(0)))
    return out


# Environment variables that configure authentication whatever the config file says (Konveyor's operator
# renders a run.yaml without an auth block; these on its Deployment switch hub mode on). See docs/konveyor.md.
AUTH_MODE_ENV = "LLM_PROXY_AUTH_MODE"  # a mode or a comma-separated list: hub | api_keys,hub | ...
HUB_URL_ENV = "LLM_PROXY_HUB_URL"
HUB_CACHE_TTL_ENV = "LLM_PROXY_HUB_CACHE_TTL"
HUB_ISSUERS_ENV = "LLM_PROXY_HUB_ISSUERS"  # comma-separated extra `iss` values of the Hub's JWTs


def _auth_env(doc: dict[str, Any], env: Mapping[str, str], notes: list[str], problems: list[str]) -> None:
    raw = {name: env.get(name, "").strip() for name in (AUTH_MODE_ENV, HUB_URL_ENV, HUB_CACHE_TTL_ENV,
                                                         HUB_ISSUERS_ENV)}
    if not any(raw.values()):
        return
    auth = doc.get("auth")
    auth = dict(auth) if isinstance(auth, dict) else {}
    if raw[AUTH_MODE_ENV]:
        modes = [m.strip() for m in raw[AUTH_MODE_ENV].split(",") if m.strip()]
        auth["mode"] = modes[0] if len(modes) == 1 else modes
        notes.append(f"auth.mode is {','.join(modes)} (from {AUTH_MODE_ENV})")
    hub = auth.get("hub")
    hub = dict(hub) if isinstance(hub, dict) else {}
    if raw[HUB_URL_ENV]:
        hub["url"] = raw[HUB_URL_ENV]
    if raw[HUB_CACHE_TTL_ENV]:
        try:
            hub["cache_ttl"] = float(raw[HUB_CACHE_TTL_ENV])
        except ValueError:
            problems.append(f"{HUB_CACHE_TTL_ENV}: '{raw[HUB_CACHE_TTL_ENV]}' is not a number of seconds")
    if raw[HUB_ISSUERS_ENV]:
        hub["issuers"] = [i.strip() for i in raw[HUB_ISSUERS_ENV].split(",") if i.strip()]
    if hub:
        auth["hub"] = hub
    doc["auth"] = auth
