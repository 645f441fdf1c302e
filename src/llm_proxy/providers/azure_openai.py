"""Azure OpenAI: OpenAI's wire format on deployment URLs (or the v1 surface), keyed by `api-key` or Entra ID."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from ..config import ProviderSettings
from ..errors import BadRequest, ProxyError, RateLimited
from .base import Endpoint, Target, UpstreamRequest
from .credentials import KeySource, header_secrets
from .openai_compat import OpenAICompatProvider, OpenAIStreamDecoder, error_from_openai_body
from .signing import HeaderKeySigner, bearer

# Latest generally-available date-versioned data-plane API (overridable: api_version or AZURE_OPENAI_API_VERSION).
DEFAULT_API_VERSION = "2024-10-21"

_PATHS: dict[str, str] = {
    "chat.completions": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}


_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class AzureStreamDecoder(OpenAIStreamDecoder):
    """OpenAI chunks, minus Azure's leading `prompt_filter_results` chunk (no choices, no usage, `object: ""`),
    which breaks clients that read `chunk.choices[0]`."""

    __slots__ = ()

    def _frames(self, events: list[tuple[bytes | None, bytes]]) -> list[bytes]:
        kept = [
            (name, payload) for name, payload in events
            if not (b"prompt_filter_results" in payload and _EMPTY_CHOICES.search(payload)
                    and b'"usage"' not in payload)
        ]
        return super()._frames(kept)


class AzureOpenAIProvider(OpenAICompatProvider):
    """Two URL shapes, chosen from base_url:

    * `https://<resource>.openai.azure.com` -> `/openai/deployments/<deployment>/<op>?api-version=<v>`, where the
      deployment is the model's upstream_model;
    * `https://<resource>.openai.azure.com/openai/v1` -> `/openai/v1/<op>` with the deployment in the body's `model`
      (api-version only sent when configured explicitly, e.g. `preview`).

    Credentials: `api_key` / `api_key_file` go in the `api-key` header. With the extra setting `auth: entra`, the same
    key (or file, re-read on rotation, or env AZURE_OPENAI_AD_TOKEN) is an Entra ID access token sent as a bearer token.
    """

    def __init__(self, settings: ProviderSettings, env: Mapping[str, str] | None = None) -> None:
        super().__init__(settings)
        env = os.environ if env is None else env
        self.auth_mode = settings.auth or "api_key"
        if self.auth_mode not in ("api_key", "entra"):
            raise ValueError(f"provider '{settings.id}': auth must be 'api_key' or 'entra', not '{self.auth_mode}'")
        self.v1 = self.base_url.endswith("/openai/v1")
        explicit_version = settings.api_version or env.get("AZURE_OPENAI_API_VERSION")
        self.api_version: str | None = explicit_version if self.v1 else (explicit_version or DEFAULT_API_VERSION)
        self.signer: HeaderKeySigner
        if self.auth_mode == "entra":
            literal = settings.api_key or env.get("AZURE_OPENAI_AD_TOKEN")
            self.key = KeySource(literal, settings.api_key_file)
            self.signer = bearer(self.key, ("AZURE_OPENAI_AD_TOKEN",))
        else:
            self.signer = HeaderKeySigner("api-key", self.key, ("AZURE_OPENAI_API_KEY",))
        self._has_header_auth = any(h.lower() in ("api-key", "authorization") for h in settings.headers)

    def missing_credentials(self) -> list[str]:
        return [] if self._has_header_auth else self.signer.missing()

    def url_for(self, endpoint: Endpoint, deployment: str) -> str:
        if endpoint not in _PATHS:
            raise BadRequest(f"endpoint {endpoint} is not supported by Azure OpenAI")
        if self.v1:
            url = self.base_url + _PATHS[endpoint]
        else:
            url = f"{self.base_url}/openai/deployments/{quote(deployment, safe='')}{_PATHS[endpoint]}"
        if self.api_version:
            url += "?api-version=" + quote(self.api_version, safe="")
        return url

    def build_request(
        self, endpoint: Endpoint, body: dict[str, Any], target: Target, stream: bool
    ) -> UpstreamRequest:
        req = super().build_request(endpoint, body, target, stream)
        req.url = self.url_for(endpoint, target.upstream_model)
        return req

    async def sign(self, request: UpstreamRequest) -> None:
        self.signer.apply(request)

    def stream_decoder(self, endpoint: Endpoint, target: Target, client_wants_usage: bool) -> AzureStreamDecoder:
        return AzureStreamDecoder(target.public_model, client_wants_usage, self.secrets(), self.id)

    def secrets(self) -> list[str | None]:
        return [*self.signer.secrets(), *header_secrets(self.settings.headers)]

    def parse_error(self, status: int, headers: Mapping[str, str], raw: bytes) -> ProxyError:
        err = error_from_openai_body(status, headers, raw, self.id, self.secrets())
        # Azure puts the HTTP status in `code` ("429"); OpenAI clients expect a symbolic code.
        if err.code is not None and err.code.isdigit():
            err.code = "rate_limit_exceeded" if isinstance(err, RateLimited) else None
        return err


def create(settings: ProviderSettings) -> AzureOpenAIProvider:
    return AzureOpenAIProvider(settings)
