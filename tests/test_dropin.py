"""Drop-in for the seed: the operator's run.yaml (auth on) served unchanged by `llm-proxy serve`, then the
seed's e2e steps: script the emulator like setup-llemulator.sh, three chat completions return the scripted
replies in order, an invalid token gets 401."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llm_proxy.emulator import start_emulator

from .conftest_oidc import OpenIDProvider, oidc_provider  # noqa: F401  (fixture)
from .helpers import LoopThread

SEED = Path(__file__).parent / "fixtures" / "seed" / "run.yaml"
EMULATOR_KEY = "dummy-key-for-llemulator"
REPLIES = [
    "This is a test response from llemulator for LLM proxy testing.",
    "The integration between llm-proxy and llemulator is working correctly.",
    "Test successful: llm-proxy can communicate with the mock OpenAI endpoint.",
]


def _render(emulator_url: str, op: OpenIDProvider) -> str:
    """The operator template's values for this machine: the emulator and the OpenID provider's URLs."""
    text = SEED.read_text()
    text = text.replace("http://llemulator.konveyor-tackle.svc.cluster.local/v1", emulator_url)
    text = text.replace("http://keycloak-sso:8080/auth/realms/tackle/protocol/openid-connect/certs", op.jwks_uri)
    text = text.replace("http://keycloak-sso.konveyor-tackle.svc:8080/auth/realms/tackle", op.issuer)
    return text.replace("host: kai-db.konveyor-tackle.svc", "host: 127.0.0.1")


@pytest.fixture
def seed_proxy(oidc_provider: OpenIDProvider, tmp_path: Path) -> Iterator[tuple[str, LoopThread, object]]:  # noqa: F811
    lt = LoopThread("seed-emulator")
    emu = lt.run(start_emulator(api_key=EMULATOR_KEY))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(_render(emu.base_url, oidc_provider))
    env = {**os.environ, "OPENAI_API_KEY": EMULATOR_KEY, "POSTGRESQL_PASSWORD": "not-a-real-password"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_proxy", "serve", "--config", str(cfg), "--port", "0"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stderr, selectors.EVENT_READ)
    port = None
    deadline = time.monotonic() + 30
    while port is None and time.monotonic() < deadline:
        if not sel.select(timeout=deadline - time.monotonic()):
            break
        line = proc.stderr.readline()
        if not line:
            break
        if '"msg":"listening"' in line:
            port = json.loads(line)["port"]
    assert port is not None, "proxy did not start"
    try:
        yield f"http://127.0.0.1:{port}", lt, emu
    finally:
        proc.terminate()
        proc.wait(30)
        lt.run(emu.close())
        lt.stop()


def test_seed_e2e_steps(seed_proxy: tuple[str, LoopThread, object], oidc_provider: OpenIDProvider) -> None:  # noqa: F811
    url, _lt, emu = seed_proxy
    # setup-llemulator.sh: POST /_emulator/script with the provider key as bearer.
    script = json.dumps({"reset": True, "models": ["gpt-4o", "gpt-4", "gpt-3.5-turbo"], "responses": REPLIES})
    req = urllib.request.Request(
        emu.url + "/_emulator/script", data=script.encode(), method="POST",  # type: ignore[attr-defined]
        headers={"Authorization": f"Bearer {EMULATOR_KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert "error" not in resp.read().decode()

    # The client learns the model from the client config, as the hub serves it.
    with urllib.request.urlopen(url + "/v1/client-config", timeout=10) as resp:
        model = json.loads(resp.read())["model"]
    assert model == "openai/gpt-4o"

    client = openai.OpenAI(base_url=url + "/v1", api_key=oidc_provider.token(user="alice"), max_retries=0)
    for i, expected in enumerate(REPLIES):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Test message {i + 1}"}], max_tokens=100
        )
        assert r.choices[0].message.content == expected

    bad = openai.OpenAI(base_url=url + "/v1", api_key="invalid-token-12345", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as ei:
        bad.chat.completions.create(model=model, messages=[{"role": "user", "content": "Test"}], max_tokens=5)
    assert ei.value.status_code == 401
