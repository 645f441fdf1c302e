"""Raw HTTP to the proxy (http.client: exact control of headers, repeated ones included) and token tools."""

from __future__ import annotations

import base64
import http.client
import json
import time
from dataclasses import dataclass
from typing import Any

from ..helpers import ProxyServer

CHAT = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return dict(self.json()["error"])


def request(
    px: ProxyServer,
    headers: list[tuple[str, str]],
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    body: Any = CHAT,
) -> Reply:
    conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=30)
    try:
        conn.putrequest(method, path)
        data = json.dumps(body).encode() if body is not None and method == "POST" else b""
        for name, value in headers:
            conn.putheader(name, value)
        if data:
            conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def bearer(px: ProxyServer, token: str, **kw: Any) -> Reply:
    return request(px, [("Authorization", f"Bearer {token}")], **kw)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def parts(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    h, p, s = token.split(".")
    return json.loads(unb64(h)), json.loads(unb64(p)), s


def assemble(header: dict[str, Any], payload: dict[str, Any], signature: str) -> str:
    return ".".join((b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), signature))


def proxy_config(emulator_url: str, auth: str) -> str:
    """Native config for auth tests: the emulator as upstream with two models, then `auth` (YAML lines)."""
    return f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 2}}
providers:
  - {{id: openai, type: openai, base_url: {emulator_url}, api_key: sk-upstream-secret-0123456789}}
models:
  - {{id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o}}
  - {{id: openai/gpt-4o-mini, provider: openai, upstream_model: gpt-4o-mini}}
{auth}
"""


def seconds_until_status(port: int, token: str, want: int, deadline: float = 5.0) -> float:
    """Poll a chat request with `token` until it gets `want`; the seconds it took (fails after `deadline`)."""
    start = time.monotonic()
    while (status := status_of(port, token)) != want:
        assert time.monotonic() - start < deadline, f"still {status} after {deadline} s"
    return time.monotonic() - start


def status_of(port: int, token: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT),
                     headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def run_yaml(emulator_url: str, server_auth: str = "") -> str:
    """A llama-stack run.yaml as Konveyor's operator renders it (model `proxied-model` -> openai/gpt-4o), with
    `server_auth` (YAML lines under `server:`) or no auth block at all."""
    return f"""
version: 2
image_name: kai
apis: [inference]
providers:
  inference:
    - provider_id: openai
      provider_type: remote::openai
      config: {{base_url: {emulator_url}, api_key: sk-upstream-secret-0123456789}}
registered_resources:
  models:
    - {{model_id: proxied-model, provider_id: openai, provider_model_id: gpt-4o}}
server:
  port: 8321
{server_auth}
"""
