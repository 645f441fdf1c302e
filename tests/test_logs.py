"""The access log: one JSON line per API request, buffered, never carrying tokens or keys."""

from __future__ import annotations

import os

import openai
import orjson

from llm_proxy.logs import AccessLog

from .conftest import Emulator, basic_config
from .helpers import ProxyServer, native_config


def test_access_log_lines_are_json_and_flush_on_size(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog(fd=fd, flush_bytes=200)
        log.log({"request_id": "req_1", "status": 200})  # no loop running: written at once
        for i in range(5):
            log.log({"request_id": f"req_{i}", "status": 200, "path": "/v1/chat/completions"})
        log.flush()
    finally:
        os.close(fd)
    lines = [orjson.loads(x) for x in path.read_bytes().splitlines()]
    assert len(lines) == 6
    assert lines[0]["msg"] == "request" and lines[0]["logger"] == "llm_proxy.access" and lines[0]["ts"].endswith("Z")


def test_proxy_writes_one_line_per_request_without_secrets(emulator: Emulator, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "access.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        with ProxyServer(native_config(basic_config(emulator.base_url))) as px:
            px.services.access_log = AccessLog(fd=fd)
            c = openai.OpenAI(base_url=px.base_url, api_key="client-secret-token-xyz", max_retries=0)
            c.chat.completions.create(model="openai/gpt-4o", messages=[{"role": "user", "content": "hi"}])
            try:
                c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
            except openai.NotFoundError:
                pass
        # stopping the server flushed the buffer
    finally:
        os.close(fd)
    text = path.read_text()
    lines = [orjson.loads(x) for x in text.splitlines()]
    assert [(x["status"], x["model"]) for x in lines] == [(200, "openai/gpt-4o"), (404, "nope")]
    assert all(x["request_id"].startswith("req_") and x["latency_ms"] >= 0 for x in lines)
    assert "client-secret-token-xyz" not in text and "sk-upstream" not in text
