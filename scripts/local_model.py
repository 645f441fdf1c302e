#!/usr/bin/env python3
"""`make run LOCAL_MODEL=1`: the offline quickstart with a real model.

Starts llama.cpp's OpenAI-compatible server (llama-cpp-python, built by `make real-deps`) on gemma-3-270m on a free
loopback port, then the proxy in front of it serving the model as `local/gemma-3-270m` (no authentication, loopback
only, like `make run`). Ctrl-C or SIGTERM stops both.
"""

from __future__ import annotations

import argparse
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

MODEL_ID = "local/gemma-3-270m"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"local-model: the llama.cpp server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (our own loopback URL)
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("local-model: the llama.cpp server did not start in time")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--python", required=True, help="interpreter of the real-model venv (make real-deps)")
    p.add_argument("--model", required=True, help="the gguf file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8321)
    p.add_argument("--n-ctx", type=int, default=4096)
    args = p.parse_args()

    port = free_port()
    llama = subprocess.Popen(
        [args.python, "-m", "llama_cpp.server", "--model", args.model, "--model_alias", "gemma-3-270m",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(args.n_ctx), "--embedding", "true",
         "--verbose", "false", "--chat_format", "gemma"],
        stdin=subprocess.DEVNULL,
    )
    proxy: subprocess.Popen[bytes] | None = None
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        if proxy is not None and proxy.poll() is None:
            proxy.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        wait_ready(f"http://127.0.0.1:{port}/v1/models", llama)
        with tempfile.TemporaryDirectory(prefix="llm-proxy-local-") as tmp:
            cfg = Path(tmp) / "config.yaml"
            cfg.write_text(f"""
providers:
  - {{id: local, type: vllm, base_url: "http://127.0.0.1:{port}/v1", api_key: not-checked}}
models:
  - {{id: {MODEL_ID}, provider: local, upstream_model: gemma-3-270m}}
  - {{id: local/embed, provider: local, upstream_model: gemma-3-270m, type: embedding}}
default_model: {MODEL_ID}
auth: {{mode: none, allow_unauthenticated: true}}
database: {{url: "sqlite+aiosqlite:///{tmp}/usage.db"}}
usage: {{spool_dir: "{tmp}/spool"}}
""")
            print(f"local-model: llama.cpp on 127.0.0.1:{port}; try model '{MODEL_ID}' at "
                  f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
            if stop:
                return 0
            proxy = subprocess.Popen([str(Path(sys.executable).parent / "llm-proxy"), "serve", "--config", str(cfg),
                                      "--host", args.host, "--port", str(args.port)])
            return proxy.wait()
    finally:
        llama.terminate()
        try:
            llama.wait(20)
        except subprocess.TimeoutExpired:
            llama.kill()


if __name__ == "__main__":
    raise SystemExit(main())
