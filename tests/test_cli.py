"""The CLI as users run it: check-config, serve refusing bad config, --version, the JSON schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from llm_proxy import __version__
from llm_proxy.config import json_schema

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "tests" / "fixtures" / "seed"


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return subprocess.run(
        [sys.executable, "-m", "llm_proxy", *args],
        capture_output=True, text=True, env={**base, **(env or {})}, timeout=timeout, cwd=ROOT,
    )


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_check_config_ok_on_seed(tmp_path: Path) -> None:
    r = run("check-config", str(SEED / "run.yaml"), env={"OPENAI_API_KEY": "k", "POSTGRESQL_PASSWORD": "p"})
    assert r.returncode == 0, r.stderr
    assert "llama-stack format" in r.stdout and "openai/gpt-4o" in r.stdout


def test_check_config_reports_every_problem(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "providers:\n  - {id: g, type: remote::google-ai}\n  - {id: x, type: openai, base_url: 'nope'}\n"
        "models:\n  - {id: m, provider: zz, upstream_model: q}\n"
        "auth: {mode: oidc, oidc: {issuers: [{issuer: '${env.ISSUER}', audiences: [a]}]}}\n"
    )
    r = run("check-config", str(cfg))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    for needle in ("remote::google-ai", "known types", "not an http(s) URL", "unknown provider 'zz'", "ISSUER"):
        assert needle in r.stderr, (needle, r.stderr)


def test_serve_refuses_bad_config_without_traceback(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("providers:\n  - {id: a, type: remote::azure-openai-v2}\n")
    r = run("serve", "--config", str(cfg), "--port", "0")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "remote::azure-openai-v2" in r.stderr


def test_serve_refuses_unauthenticated_non_loopback(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("providers: []\nauth: {mode: none, allow_unauthenticated: true}\n")
    r = run("serve", "--config", str(cfg), "--host", "0.0.0.0", "--port", "0")
    assert r.returncode == 1 and "refusing" in r.stderr


def test_missing_key_in_one_provider_is_not_fatal(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "providers:\n  - {id: openai, type: openai}\n  - {id: local, type: vllm, base_url: 'http://127.0.0.1:1/v1'}\n"
        "auth: {mode: none, allow_unauthenticated: true}\n"
    )
    r = run("check-config", str(cfg))
    assert r.returncode == 0
    assert "disabled provider openai" in r.stdout and "OPENAI_API_KEY" in r.stdout


def test_published_schema_is_current_and_validates_examples() -> None:
    published = json.loads((ROOT / "src/llm_proxy/schema/config.schema.json").read_text())
    assert published == json.loads(json.dumps(json_schema())), "run: make schema"
    for example in (ROOT / "examples").glob("*.yaml"):
        jsonschema.validate(yaml.safe_load(example.read_text()), published)
