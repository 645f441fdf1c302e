"""Service API keys: `llm-proxy keys create | list | revoke`, model scope, combined modes, and revocation
reaching two proxy processes on one PostgreSQL within 5 s."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llm_proxy.cli import main
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.store.api_keys import ApiKeyStore, hash_key

from ..conftest import Emulator
from ..helpers import ProxyServer, native_config
from ..store.dbutil import create_pg_database, drop_pg_database, pg_available, pg_url
from ..test_shutdown import Proc
from .fake_hub import FakeHub
from .util import CHAT, bearer, proxy_config, seconds_until_status

REVOCATION_DEADLINE = 5.0


def keys_config(emulator_url: str, db_url: str, modes: str = "api_keys", extra: str = "") -> str:
    auth = f"auth:\n  mode: {modes}\n  api_keys: {{refresh_seconds: 1}}\n{extra}\ndatabase: {{url: '{db_url}'}}"
    return proxy_config(emulator_url, auth)


def create_key(cfg: Path, capsys: pytest.CaptureFixture[str], *args: str) -> str:
    capsys.readouterr()
    assert main(["keys", "create", "--config", str(cfg), *args]) == 0
    out = capsys.readouterr()
    key = out.out.strip()
    assert key.startswith("llmp_") and len(key) > 40
    assert key not in out.err
    return key


def key_id(key: str) -> str:
    return key[len("llmp_"):].split("_", 1)[0]


@pytest.fixture
def sqlite_cfg(tmp_path: Path, emulator: Emulator) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(keys_config(emulator.base_url, f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}"))
    return cfg


def test_create_use_scope_list_and_revoke(
    sqlite_cfg: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = create_key(sqlite_cfg, capsys, "--name", "ci-bot", "--models", "openai/gpt-4o", "--expires", "90d")
    sink = MemoryUsageSink()
    with ProxyServer(native_config(sqlite_cfg.read_text()), usage=sink) as px:
        ok = bearer(px, key)
        assert ok.status == 200, ok.body
        other = bearer(px, key, body={**CHAT, "model": "openai/gpt-4o-mini"})
        assert other.status == 403, other.body
        models = bearer(px, key, method="GET", path="/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["openai/gpt-4o"]
        unknown = bearer(px, "llmp_000000000000_" + "x" * 43)
        assert unknown.status == 401 and unknown.headers["WWW-Authenticate"].startswith("Bearer")
        row = next(e for e in sink.events if e.status == 200)
        assert (row.subject, row.username) == (f"apikey:{key_id(key)}", "ci-bot")

        capsys.readouterr()
        assert main(["keys", "list", "--config", str(sqlite_cfg), "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [(k["id"], k["name"], k["models"], k["revoked_at"]) for k in listed] == [
            (key_id(key), "ci-bot", ["openai/gpt-4o"], None)]
        assert listed[0]["expires_at"] > time.time() + 89 * 86400
        assert main(["keys", "list", "--config", str(sqlite_cfg)]) == 0
        table = capsys.readouterr().out
        assert "ci-bot" in table and key not in table and hash_key(key) not in table

        assert main(["keys", "revoke", "--config", str(sqlite_cfg), key_id(key)]) == 0
        took = seconds_until_status(px.port, key, 401, REVOCATION_DEADLINE)
        assert took < REVOCATION_DEADLINE
        assert main(["keys", "revoke", "--config", str(sqlite_cfg), key_id(key)]) == 1  # already revoked
    leaks = [r.name for r in caplog.records if key in r.getMessage() or hash_key(key) in r.getMessage()]
    assert leaks == []
    assert key not in repr(list(sink.events)) and hash_key(key) not in repr(list(sink.events))


async def test_expired_keys_are_not_loaded(tmp_path: Path) -> None:
    store = ApiKeyStore(f"sqlite+aiosqlite:///{tmp_path / 'k.db'}")
    try:
        await store.migrate()
        _, live = await store.create("live", ["*"], time.time() + 3600)
        await store.create("old", ["*"], time.time() - 1)
        assert [r.id for r in await store.load()] == [live.id]
    finally:
        await store.close()


def test_api_keys_beside_hub_never_reach_the_hub(
    sqlite_cfg: Path, capsys: pytest.CaptureFixture[str], emulator: Emulator, tmp_path: Path
) -> None:
    hub = FakeHub()
    try:
        key = create_key(sqlite_cfg, capsys, "--name", "svc", "--models", "openai/*")
        text = keys_config(emulator.base_url, f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}",
                           "[api_keys, hub]", f"  hub: {{url: '{hub.url}'}}")
        with ProxyServer(native_config(text)) as px:
            assert bearer(px, key).status == 200
            assert bearer(px, "llmp_000000000000_" + "y" * 43).status == 401
            assert hub.self_hits == 0  # the prefix makes them api_keys' tokens: the Hub never sees them
            assert bearer(px, hub.personal_token("lee")).status == 200
            assert hub.self_hits == 1
            health = px.services.authenticator.health()
            assert health["ok"] and set(health["modes"]) == {"api_keys", "hub"}
    finally:
        hub.close()


@pytest.fixture
def pg_db() -> Iterator[str]:
    if not asyncio.run(pg_available()):
        pytest.skip("PostgreSQL is not reachable")
    name = asyncio.run(create_pg_database("keys"))
    yield name
    asyncio.run(drop_pg_database(name))


def test_revocation_reaches_two_proxy_processes_on_postgres_within_5_s(
    pg_db: str, emulator: Emulator, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfgs = []
    for i in range(2):
        cfg = tmp_path / f"p{i}.yaml"
        cfg.write_text(keys_config(emulator.base_url, pg_url(pg_db)).replace(
            "refresh_seconds: 1", "refresh_seconds: 5") + f"usage: {{spool_dir: '{tmp_path / f'spool{i}'}'}}\n")
        cfgs.append(cfg)
    key = create_key(cfgs[0], capsys, "--name", "nightly", "--models", "openai/gpt-4o")
    procs = [Proc(cfg) for cfg in cfgs]
    try:
        for p in procs:
            assert p.listening.wait(30), "".join(p.raw)
        for p in procs:
            seconds_until_status(p.port, key, 200, 10)
        revoked_at = time.monotonic()
        assert main(["keys", "revoke", "--config", str(cfgs[1]), key]) == 0  # the whole key works too
        for p in procs:
            seconds_until_status(p.port, key, 401, REVOCATION_DEADLINE - (time.monotonic() - revoked_at))
        took = time.monotonic() - revoked_at
        print(f"revocation reached both processes in {took:.3f} s")
        assert took < REVOCATION_DEADLINE
        for p in procs:
            assert not any(key in line or hash_key(key) in line for line in p.raw)
    finally:
        for p in procs:
            p.kill()


_SERVING = """
import asyncio, json, os, sys
from llm_proxy.app import build_authenticator
from llm_proxy.config import load_config_text

CONFIG = '''
providers: []
auth: {mode: api_keys}
database: {url: "%s"}
''' % os.environ["KEYS_URL"]

async def main():
    auth = build_authenticator(load_config_text(CONFIG, env={}, path="<test>"))
    await auth.start()
    p = await auth.authenticate({"Authorization": "Bearer " + os.environ["KEY"]}, None)
    assert p.subject.startswith("apikey:"), p
    await auth.close()

asyncio.run(main())
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("sqlalchemy", "alembic"))))
"""


def test_key_lookups_do_not_import_sqlalchemy(
    sqlite_cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = create_key(sqlite_cfg, capsys, "--name", "lean", "--models", "*")
    env = {**os.environ, "KEYS_URL": f"sqlite+aiosqlite:///{tmp_path / 'ledger.db'}", "KEY": key}
    out = subprocess.run([sys.executable, "-c", _SERVING], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_bad_expiry_and_unknown_key_id(sqlite_cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for expires, why in (("2001-01-01", "in the past"), ("soon", "duration such as 90d")):
        assert main(["keys", "create", "--config", str(sqlite_cfg), "--name", "x", "--models", "*",
                     "--expires", expires]) == 2
        assert why in capsys.readouterr().err
    assert main(["keys", "revoke", "--config", str(sqlite_cfg), "nosuchkey"]) == 1
    assert "no active API key" in capsys.readouterr().err
