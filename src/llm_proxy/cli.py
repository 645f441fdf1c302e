"""Command line: serve | check-config | emulator | db upgrade | usage | keys | --version (thin: parses, then calls)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from .config import LoadedConfig, load_config, load_config_text
from .errors import ConfigError

log = logging.getLogger("llm_proxy")


def _print_problems(path: str, err: ConfigError) -> None:
    print(f"llm-proxy: configuration {path} has {len(err.problems)} problem(s):", file=sys.stderr)
    for p in err.problems:
        print(f"  - {p}", file=sys.stderr)


def _load(path: str) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as err:
        _print_problems(path, err)
        raise SystemExit(1) from None


def _report(loaded: LoadedConfig) -> None:
    for w in loaded.warnings:
        log.warning(w)
    for n in loaded.notes:
        log.info(n)
    for pid, reason in loaded.disabled_providers.items():
        log.warning("provider disabled", extra={"provider": pid, "reason": reason})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        loaded = load_config(args.path)
    except ConfigError as err:
        _print_problems(args.path, err)
        return 1
    from .app import create_app  # validates that every provider can be built

    try:
        create_app(loaded)
    except ValueError as exc:
        print(f"llm-proxy: configuration {args.path} has 1 problem(s):\n  - {exc}", file=sys.stderr)
        return 1
    print(f"{args.path}: OK ({loaded.source} format)")
    print(f"  providers: {', '.join(p.id + ' (' + p.type + ')' for p in loaded.settings.providers) or 'none'}")
    print(f"  models: {', '.join(m.id for m in loaded.settings.models) or 'none'}")
    print(f"  auth: {loaded.settings.auth.mode_label}")
    for pid, reason in loaded.disabled_providers.items():
        print(f"  disabled provider {pid}: {reason}")
    for w in loaded.warnings:
        print(f"  warning: {w}")
    return 0


DEV_CONFIG = """
server:
  port: 8321
  drain_delay_seconds: 0
providers:
  - id: openai
    type: openai
    base_url: {base_url}
    api_key: {api_key}
models:
  - id: openai/gpt-4o
    provider: openai
    upstream_model: gpt-4o
    aliases: [proxied-model]
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
  - id: openai/text-embedding-3-small
    provider: openai
    upstream_model: text-embedding-3-small
    type: embedding
default_model: openai/gpt-4o
auth:
  mode: none
  allow_unauthenticated: true
database:
  url: ${{env.DATABASE_URL:=sqlite+aiosqlite:///./var/llm-proxy.db}}
usage:
  spool_dir: ./var/spool
"""


def _dev_config(emulator_url: str | None) -> LoadedConfig:
    if emulator_url:
        text = DEV_CONFIG.format(base_url=emulator_url, api_key="emulator")
    else:
        text = DEV_CONFIG.format(base_url="https://api.openai.com/v1", api_key="${env.OPENAI_API_KEY}")
    return load_config_text(text, path="<dev>")


def cmd_serve(args: argparse.Namespace) -> int:
    from .logs import setup_logging

    setup_logging(args.log_level)
    if args.config:
        loaded = _load(args.config)
    elif args.dev:
        loaded = None
    else:
        print("llm-proxy serve: --config PATH is required (or --dev for a local setup)", file=sys.stderr)
        return 2
    if loaded is not None:
        _report(loaded)
        settings = loaded.settings
        host = args.host or settings.server.host
        port = args.port if args.port is not None else settings.server.port
        workers = args.workers or settings.server.workers
        if settings.auth.mode == "none":
            log.warning("AUTHENTICATION IS DISABLED (auth.mode none): every caller is anonymous")
            if not _is_loopback(host) and not settings.server.allow_non_loopback_unauthenticated:
                print(
                    f"llm-proxy: refusing to serve without authentication on non-loopback address {host}; "
                    "set server.allow_non_loopback_unauthenticated: true to allow it",
                    file=sys.stderr,
                )
                return 1
    else:
        host = args.host or "127.0.0.1"
        port = args.port if args.port is not None else 8321
        workers = 1
    if workers > 1:
        return _serve_workers(args, loaded, host, port, workers)
    _install_uvloop()
    asyncio.run(_serve_one(loaded, host, port, reuse_port=False))
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency on Linux
        pass


async def _serve_one(
    loaded: LoadedConfig | None, host: str, port: int, reuse_port: bool, metrics_dir: str | None = None
) -> None:
    from .app import create_app
    from .web.server import serve

    emulator = None
    if loaded is None:  # --dev
        if os.environ.get("OPENAI_API_KEY"):
            loaded = _dev_config(None)
            log.warning("dev mode: proxying to OpenAI with OPENAI_API_KEY")
        else:
            from .emulator import start_emulator

            emulator = await start_emulator()
            loaded = _dev_config(emulator.base_url)
            banner = (
                "NO OPENAI_API_KEY SET: replies come from the bundled emulator at "
                f"{emulator.base_url} (not a real model). Export OPENAI_API_KEY to proxy to OpenAI."
            )
            print("\n" + "!" * len(banner) + "\n" + banner + "\n" + "!" * len(banner) + "\n", file=sys.stderr)
            log.warning(banner)
        _report(loaded)
    try:
        app = create_app(loaded, metrics_dir=metrics_dir)
    except ValueError as exc:
        raise SystemExit(f"llm-proxy: {exc}") from None
    try:
        await serve(app, host, port, reuse_port=reuse_port)
    finally:
        if emulator is not None:
            await emulator.close()


def _worker(config_path: str, host: str, port: int, log_level: str, metrics_dir: str) -> None:
    from .logs import setup_logging

    setup_logging(log_level)
    loaded = _load(config_path)
    _install_uvloop()
    asyncio.run(_serve_one(loaded, host, port, reuse_port=True, metrics_dir=metrics_dir))


def _serve_workers(args: argparse.Namespace, loaded: LoadedConfig | None, host: str, port: int, n: int) -> int:
    if loaded is None or not args.config:
        print("llm-proxy: --workers needs --config", file=sys.stderr)
        return 2
    import shutil
    import tempfile

    # The workers' metrics totals, summed by whichever worker answers a scrape (core/metrics.py); per run.
    metrics_dir = tempfile.mkdtemp(prefix="llm-proxy-metrics-")
    import secrets

    from .app import UI_SESSION_KEY_ENV

    os.environ.setdefault(UI_SESSION_KEY_ENV, secrets.token_urlsafe(32))  # one dashboard session key for all
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(args.config, host, port, args.log_level, metrics_dir))
             for _ in range(n)]
    for p in procs:
        p.start()

    def forward(signum: int, _frame: object) -> None:
        for p in procs:
            if p.pid and p.is_alive():
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        for p in procs:
            p.join()
            code = code or (p.exitcode or 0)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def cmd_emulator(args: argparse.Namespace) -> int:
    from .emulator import main as emulator_main

    emulator_main(args.host, args.port, args.api_key or os.environ.get("EMULATOR_API_KEY"))
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.engine import make_url

    from .store.db import upgrade_url

    database = _load(args.config).settings.database
    url = database.url
    shown = make_url(url).render_as_string(hide_password=True)
    try:
        revision = asyncio.run(upgrade_url(url, table_prefix=database.table_prefix))
    except Exception as exc:
        print(f"llm-proxy db upgrade: {shown}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"{shown}: at revision {revision}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    from .core.usage_report import fetch_report, format_csv, format_table, parse_group_by, parse_time

    loaded = _load(args.config)
    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
        group_by = parse_group_by(args.by)
    except ValueError as exc:
        print(f"llm-proxy usage: {exc}", file=sys.stderr)
        return 2
    try:
        doc = asyncio.run(
            fetch_report(loaded.settings.database.url, since=since, until=until, group_by=group_by, subject=args.user,
                         table_prefix=loaded.settings.database.table_prefix)
        )
    except Exception as exc:
        print(f"llm-proxy usage: cannot read the usage database: {type(exc).__name__}: {exc}\n"
              "  (is it reachable, and migrated with `llm-proxy db upgrade`?)", file=sys.stderr)
        return 1
    if args.json:
        import orjson

        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    elif args.csv:
        sys.stdout.write(format_csv(doc))
    else:
        sys.stdout.write(format_table(doc))
    return 0


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _expiry(raw: str | None) -> float | None:
    """`--expires`: a duration from now (90d, 12h, 30m, 2w) or an ISO date/datetime; None: never."""
    if not raw or raw.lower() == "never":
        return None
    import time
    from datetime import UTC, datetime

    unit = _DURATION_UNITS.get(raw[-1:].lower())
    if unit is not None and raw[:-1].isdigit() and int(raw[:-1]) > 0:
        return time.time() + int(raw[:-1]) * unit
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise ValueError(f"--expires '{raw}': give a duration such as 90d, 12h, 30m or an ISO date") from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if when.timestamp() <= time.time():
        raise ValueError(f"--expires '{raw}' is in the past")
    return when.timestamp()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def cmd_keys(args: argparse.Namespace) -> int:
    """`keys create | list | revoke`: service API keys in the ledger database (migrated first)."""
    from .store.api_keys import ApiKeyStore
    from .store.db import upgrade_url
    from .types import API_KEY_PREFIX as KEY_PREFIX

    database = _load(args.config).settings.database
    url = database.url
    try:
        expires = _expiry(getattr(args, "expires", None))
    except ValueError as exc:
        print(f"llm-proxy keys: {exc}", file=sys.stderr)
        return 2

    async def run() -> int:
        await upgrade_url(url, table_prefix=database.table_prefix)
        store = ApiKeyStore(url, table_prefix=database.table_prefix)
        try:
            if args.keys_command == "create":
                models = [m.strip() for m in args.models.split(",") if m.strip()]
                if not models:
                    print("llm-proxy keys create: --models names no model", file=sys.stderr)
                    return 2
                key, rec = await store.create(args.name, models, expires)
                print(f"created API key {rec.id} ({rec.name}) for models {', '.join(rec.models)}; "
                      f"expires {_when(rec.expires_at)}. It is shown only now:", file=sys.stderr)
                print(key)
                return 0
            if args.keys_command == "list":
                records = await store.list()
                if args.json:
                    print(json.dumps([r.public() for r in records], indent=2))
                    return 0
                print(f"{'ID':<12}  {'NAME':<24}  {'CREATED':<25}  {'EXPIRES':<25}  {'REVOKED':<25}  MODELS")
                for r in records:
                    print(f"{r.id:<12}  {r.name:<24}  {_when(r.created_at):<25}  {_when(r.expires_at):<25}  "
                          f"{_when(r.revoked_at):<25}  {','.join(r.models)}")
                return 0
            wanted = args.key_id
            if wanted.startswith(KEY_PREFIX):  # the whole key given: its id is the part after the prefix
                wanted = wanted[len(KEY_PREFIX):].split("_", 1)[0]
            if await store.revoke(wanted):
                print(f"revoked API key {wanted}")
                return 0
            print(f"llm-proxy keys revoke: no active API key with id '{wanted}'", file=sys.stderr)
            return 1
        finally:
            await store.close()

    try:
        return asyncio.run(run())
    except Exception as exc:
        print(f"llm-proxy keys: cannot use the database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def cmd_limits_show(args: argparse.Namespace) -> int:
    """`limits show`: every counter in the limits store against its rule (the store the proxies share)."""
    from .core.limits import build_store, snapshot

    settings = _load(args.config).settings.limits
    if not settings.rules:
        print("llm-proxy limits show: the config has no limits.rules", file=sys.stderr)
        return 1
    if settings.store == "memory":
        print("llm-proxy limits show: limits.store is memory: the counters live in the serving process only; "
              "use a redis:// store to see them from here", file=sys.stderr)
        return 1

    async def run() -> list[dict[str, Any]]:
        store = build_store(settings)
        try:
            return await snapshot(settings, store, user=args.user)
        finally:
            await store.close()

    try:
        rows = asyncio.run(run())
    except Exception as exc:
        print(f"llm-proxy limits show: cannot read the limits store: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("rule", "limit", "key", "used", "max", "remaining", "reset")
    cells = [[c.upper() for c in cols], *[[_limit_cell(r[c]) for c in cols] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    if not rows:
        print("(no counters: nothing counted yet" + (f" for {args.user})" if args.user else ")"))
    return 0


def _limit_cell(value: Any) -> str:
    return f"{value:.6f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


def cmd_client_config(args: argparse.Namespace) -> int:
    from .web.state import client_config_for

    loaded = _load(args.config)
    print(json.dumps(client_config_for(loaded.settings), indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    from .status import conditions

    url = args.url.rstrip("/") + "/v1/health/ready"
    req = urllib.request.Request(url)  # noqa: S310 - operator-given URL
    token = args.token or os.environ.get("LLM_PROXY_TOKEN")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:  # noqa: S310 - operator-given URL
            code, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        code, body = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        print(f"llm-proxy status: cannot reach {url}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
        return 2
    try:
        report = json.loads(body)
    except ValueError:
        print(f"llm-proxy status: {url} did not answer with JSON (HTTP {code})", file=sys.stderr)
        return 2
    conds = conditions(report, code)
    if args.json:
        print(json.dumps({"conditions": conds}, indent=2))
    else:
        width = max(len(c["type"]) for c in conds)
        for c in conds:
            print(f"{c['type']:<{width}}  {c['status']:<5}  {c['reason']}: {c['message']}")
    return 0 if conds[0]["status"] == "True" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-proxy", description="OpenAI-compatible LLM gateway")
    parser.add_argument("--version", action="version", version=f"llm-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the proxy")
    p.add_argument("--config", help="native config YAML or llama-stack run.yaml")
    p.add_argument("--dev", action="store_true", help="local setup: OpenAI if OPENAI_API_KEY is set, else the emulator")
    p.add_argument("--host", default=None, help="bind address (default from config, else 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default from config, else 8321)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (SO_REUSEPORT)")
    p.add_argument("--log-level", default=os.environ.get("LLM_PROXY_LOG_LEVEL", "INFO"))
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file and report every problem")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("emulator", help="run the scriptable OpenAI-compatible fake upstream")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require this bearer key (default $EMULATOR_API_KEY)")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("db", help="database maintenance")
    db_sub = p.add_subparsers(dest="db_command", required=True)
    q = db_sub.add_parser("upgrade", help="run the usage ledger's migrations (idempotent)")
    q.add_argument("--config", required=True, help="config whose database.url to migrate")
    q.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("usage", help="print a usage report from the ledger database")
    p.add_argument("--config", required=True, help="config whose database.url to read")
    p.add_argument("--since", default="7d", help="start: 7d, 12h, 2024-05-01, ISO datetime or unix seconds")
    p.add_argument("--until", default=None, help="end (exclusive), same forms as --since (default: now)")
    p.add_argument("--by", "--group-by", dest="by", default="user,model",
                   help="group keys: user, model, day, provider, endpoint, status, group (a request under each of "
                        "its caller's groups; none: empty), client_api")
    p.add_argument("--user", default=None, help="only this principal subject")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(func=cmd_usage)
    p = sub.add_parser("keys", help="service API keys (stored hashed in the ledger database)")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    q = keys_sub.add_parser("create", help="create a key and print it once")
    q.add_argument("--config", required=True, help="config whose database.url holds the keys")
    q.add_argument("--name", required=True, help="who or what uses the key (shown in usage reports)")
    q.add_argument("--models", required=True, help="comma-separated model ids the key may use (globs: openai/*, *)")
    q.add_argument("--expires", default=None, help="90d, 12h, 30m, 2w, an ISO date, or never (default)")
    q.set_defaults(func=cmd_keys)
    q = keys_sub.add_parser("list", help="list keys (never the keys themselves)")
    q.add_argument("--config", required=True)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_keys)
    q = keys_sub.add_parser("revoke", help="revoke a key by id (every replica stops accepting it within seconds)")
    q.add_argument("--config", required=True)
    q.add_argument("key_id", help="the key's id (from keys list), or the key itself")
    q.set_defaults(func=cmd_keys)

    p = sub.add_parser("limits", help="request, token and dollar limits")
    limits_sub = p.add_subparsers(dest="limits_command", required=True)
    q = limits_sub.add_parser("show", help="current usage against every rule (from the limits store)")
    q.add_argument("--config", required=True, help="config whose limits.store and rules to read")
    q.add_argument("--user", default=None, help="only the counters of this principal subject (or API key)")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_limits_show)

    p = sub.add_parser("client-config", help="print the client config JSON (model, enabled) for the default model")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_client_config)

    p = sub.add_parser("status", help="print a running proxy's readiness as Kubernetes-style conditions")
    p.add_argument("--url", default="http://127.0.0.1:8321")
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--token", help="bearer token, for the checks' details from a non-local address "
                   "(default: $LLM_PROXY_TOKEN)")
    p.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
