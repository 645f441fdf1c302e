"""One signer per upstream credential scheme: bearer, api-key style headers, and AWS SigV4."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from .base import UpstreamRequest
from .credentials import KeySource


class HeaderKeySigner:
    """Puts the current key in one header: `authorization: Bearer <key>`, `api-key`, `x-api-key`,
    `x-goog-api-key`... The key never goes into the URL, so it cannot end up in access logs."""

    __slots__ = ("header", "key", "missing_names", "prefix")

    def __init__(self, header: str, key: KeySource, missing_names: tuple[str, ...], prefix: str = "") -> None:
        self.header = header
        self.key = key
        self.prefix = prefix
        self.missing_names = missing_names

    def missing(self) -> list[str]:
        return [] if self.key.get() else list(self.missing_names[:1])

    def secrets(self) -> list[str | None]:
        return [self.key.get()]

    def apply(self, request: UpstreamRequest) -> None:
        key = self.key.get()
        if key:
            request.headers[self.header] = self.prefix + key


def bearer(key: KeySource, missing_names: tuple[str, ...]) -> HeaderKeySigner:
    return HeaderKeySigner("authorization", key, missing_names, "Bearer ")


SIGV4_TIMESTAMP = "%Y%m%dT%H%M%SZ"


class SigV4Signer:
    """AWS Signature Version 4 using botocore's canonicalisation.

    The signature covers the method, the URL exactly as given (path and query), every header present
    at signing time (content-type, host, x-amz-date, x-amz-security-token) and the SHA-256 of the body.
    Headers added after signing are not covered, so they may be added freely; a signed one must not change.
    """

    __slots__ = ("_clock", "access_key", "region", "secret_key", "service", "session_token")

    def __init__(
        self,
        access_key: str | None,
        secret_key: str | None,
        session_token: str | None,
        region: str,
        service: str,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        self.access_key = access_key or None
        self.secret_key = secret_key or None
        self.session_token = session_token or None
        self.region = region
        self.service = service
        self._clock = clock or (lambda: datetime.now(UTC))

    @classmethod
    def from_settings(
        cls,
        access_key: str | None,
        secret_key: str | None,
        session_token: str | None,
        region: str,
        service: str,
        env: Mapping[str, str] | None = None,
    ) -> SigV4Signer:
        """Explicit settings win; otherwise the standard AWS_* environment variables."""
        env = os.environ if env is None else env
        if not access_key and not secret_key:
            access_key = env.get("AWS_ACCESS_KEY_ID")
            secret_key = env.get("AWS_SECRET_ACCESS_KEY")
            session_token = session_token or env.get("AWS_SESSION_TOKEN")
        return cls(access_key, secret_key, session_token, region, service)

    def missing(self) -> list[str]:
        out = []
        if not self.access_key:
            out.append("AWS_ACCESS_KEY_ID")
        if not self.secret_key:
            out.append("AWS_SECRET_ACCESS_KEY")
        return out

    def secrets(self) -> list[str | None]:
        return [self.secret_key, self.session_token]

    def apply(self, request: UpstreamRequest) -> None:
        if not self.access_key or not self.secret_key:
            return
        for h in list(request.headers):
            if h.lower() in ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"):
                del request.headers[h]
        timestamp = self._clock().strftime(SIGV4_TIMESTAMP)
        request.headers["x-amz-date"] = timestamp
        if self.session_token:
            request.headers["x-amz-security-token"] = self.session_token
        # Spelled out (instead of SigV4Auth.add_auth) so the clock is ours and botocore's debug log,
        # which prints the canonical request including the session token, is never involved.
        # botocore is imported here, not at module load: it costs ~8 MB per worker that has no Bedrock.
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import ReadOnlyCredentials

        creds = ReadOnlyCredentials(self.access_key, self.secret_key, self.session_token)
        auth = SigV4Auth(creds, self.service, self.region)
        aws = AWSRequest(method=request.method, url=request.url, data=request.body, headers=dict(request.headers))
        aws.context["timestamp"] = timestamp
        aws.context["payload_signing_enabled"] = True
        canonical = auth.canonical_request(aws)
        signature = auth.signature(auth.string_to_sign(aws, canonical), aws)
        signed = auth.signed_headers(auth.headers_to_sign(aws))
        request.headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={auth.scope(aws)}, SignedHeaders={signed}, Signature={signature}"
        )
