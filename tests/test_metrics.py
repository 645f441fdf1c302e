"""GET /metrics: what the counters say after real requests, bounded labels, the allow list, auth refresh
failures, and one set of totals whichever of two workers answers a scrape."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llm_proxy.core.metrics import Metrics
from llm_proxy.core.usage_memory import MemoryUsageSink
from llm_proxy.types import UsageEvent

from .conftest import Emulator, basic_config
from .helpers import ProxyServer, native_config
from .store.dbutil import free_port

MSG = [{"role": "user", "content": "hi"}]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, keyed by (sample name, sorted labels); parsed by prometheus-client's parser."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


def scrape(url: str) -> Samples:
    r = httpx.get(url + "/metrics", timeout=10, headers={"connection": "close"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def event(**kw: Any) -> UsageEvent:
    base: dict[str, Any] = {"request_id": "r", "started_at": 0.0, "ended_at": 1.0, "endpoint": "chat.completions",
                            "status": 200, "model": "openai/gpt-4o", "provider_id": "openai", "latency_ms": 50.0}
    base.update(kw)
    return UsageEvent(**base)


# ---- the counting, without a server -------------------------------------------------------------------


def test_labels_are_bounded_and_normalised() -> None:
    m = Metrics({"openai/gpt-4o": "openai/gpt-4o", "proxied-model": "openai/gpt-4o"})
    m.observe(event(model="proxied-model"))  # an alias counts as its model
    for i in range(50):  # names chosen by clients never become labels
        m.observe(event(model=f"made-up-{i}", status=404, error_type="invalid_request_error", provider_id=None))
    m.observe(event(status=502, error_type="weird upstream type", attempts=1,
                    extra={"attempts": [{"provider": "openai", "status": 502, "error": "a novel code"}]}))
    s = parse(m.render().decode())
    assert value(s, "llm_proxy_requests_total", model="openai/gpt-4o", status_class="2xx") == 1
    assert value(s, "llm_proxy_requests_total", model="unknown", status_class="4xx") == 50
    assert value(s, "llm_proxy_requests_total", error_type="other", status_class="5xx") == 1
    assert value(s, "llm_proxy_upstream_errors_total", provider="openai", error_type="other") == 1
    models = {dict(lab).get("model") for (n, lab) in s if n == "llm_proxy_requests_total"}
    assert models == {"openai/gpt-4o", "unknown"}


def test_histograms_tokens_and_limiter_refusals() -> None:
    m = Metrics({"openai/gpt-4o": "openai/gpt-4o"})
    m.observe(event(latency_ms=30.0, ttft_ms=3.0, streamed=True, prompt_tokens=10, completion_tokens=20,
                    cached_tokens=4))
    m.observe(event(latency_ms=700.0, prompt_tokens=100, completion_tokens=1))
    m.observe(event(status=429, error_type="rate_limit_error", attempts=0, provider_id=None))  # the proxy's own
    m.observe(event(status=429, error_type="rate_limit_error", attempts=1,  # the upstream's 429: not a refusal
                    extra={"attempts": [{"provider": "openai", "status": 429, "error": "rate_limit_exceeded"}]}))
    s = parse(m.render().decode())
    dur = "gen_ai_client_operation_duration_seconds"
    assert value(s, dur + "_count", gen_ai_request_model="openai/gpt-4o", gen_ai_operation_name="chat") == 4
    assert value(s, dur + "_bucket", error_type="", le="0.04") == 1  # 30 ms
    assert value(s, dur + "_bucket", error_type="", le="0.64") == 1
    assert value(s, dur + "_bucket", error_type="", le="1.28") == 2  # 700 ms
    assert value(s, dur + "_sum", error_type="") == pytest.approx(0.73)
    assert value(s, "gen_ai_server_time_to_first_token_seconds_count") == 1
    assert value(s, "gen_ai_server_time_to_first_token_seconds_bucket", le="0.005") == 1
    assert value(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == 110
    assert value(s, "gen_ai_client_token_usage_sum", gen_ai_token_type="output") == 21
    assert value(s, "gen_ai_client_token_usage_bucket", gen_ai_token_type="input", le="16.0") == 1
    assert value(s, "llm_proxy_tokens_total", type="cached") == 4
    assert value(s, "llm_proxy_tokens_total", type="prompt") == 110
    assert value(s, "llm_proxy_limiter_refusals_total", model="openai/gpt-4o", reason="rate_limit") == 1
    assert value(s, "llm_proxy_upstream_errors_total", error_type="rate_limit_exceeded") == 1


def test_workers_sharing_a_directory_show_the_same_totals(tmp_path: Path) -> None:
    """Two workers (as `serve --workers 2` runs them): either one answering sums both, and a later scrape never
    shows less than an earlier one, whichever worker answers."""
    a = Metrics({"openai/gpt-4o": "openai/gpt-4o"}, shared_dir=tmp_path, worker="a")
    b = Metrics({"openai/gpt-4o": "openai/gpt-4o"}, shared_dir=tmp_path, worker="b")
    tmp_path.mkdir(exist_ok=True)
    for _ in range(3):
        a.observe(event())
    for _ in range(5):
        b.observe(event(prompt_tokens=7))
    first = parse(a.render().decode())  # b has not written yet: a's own 3
    assert value(first, "llm_proxy_requests_total") == 3
    from_b = parse(b.render().decode())  # b writes its file, reads a's (written by a's scrape)
    from_a = parse(a.render().decode())
    for s in (from_a, from_b):
        assert value(s, "llm_proxy_requests_total") == 8
        assert value(s, "llm_proxy_tokens_total", type="prompt") == 35
        assert value(s, "llm_proxy_workers") == 2
        assert value(s, "llm_proxy_build_info") == 1
    a.observe(event())
    assert value(parse(b.render().decode()), "llm_proxy_requests_total") == 8  # a's last write
    assert value(parse(a.render().decode()), "llm_proxy_requests_total") == 9
    assert value(parse(b.render().decode()), "llm_proxy_requests_total") == 9
    assert not any(n.startswith("process_") for n, _ in from_a)  # one process's numbers would differ by worker


# ---- through the proxy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mproxy(emulator: Emulator) -> Iterator[ProxyServer]:
    with ProxyServer(native_config(basic_config(emulator.base_url)), usage=MemoryUsageSink()) as px:
        yield px


def test_requests_through_the_proxy_are_counted(mproxy: ProxyServer, emulator: Emulator) -> None:
    emulator.script({"reset": True, "responses": ["one", "two", {"error": {"status": 503, "message": "busy"}}]})
    c = openai.OpenAI(base_url=mproxy.base_url, api_key="secret-token-abc", max_retries=0)
    before = scrape(mproxy.url)
    c.chat.completions.create(model="proxied-model", messages=MSG)
    chunks = list(c.chat.completions.create(model="openai/gpt-4o", messages=MSG, stream=True))
    assert chunks
    with pytest.raises(openai.InternalServerError):
        c.chat.completions.create(model="openai/gpt-4o", messages=MSG)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model-for-user-bob", messages=MSG)
    c.embeddings.create(model="openai/text-embedding-3-small", input="x")
    r = httpx.get(mproxy.url + "/metrics", timeout=10)
    after = parse(r.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    req = "llm_proxy_requests_total"
    assert delta(req, model="openai/gpt-4o", api="chat.completions", status_class="2xx", provider="openai") == 2
    assert delta(req, model="openai/gpt-4o", status_class="5xx") == 1
    assert delta(req, model="openai/gpt-4o", status_class="5xx", error_type="") == 0  # an error type is set
    assert delta(req, model="unknown", status_class="4xx", error_type="invalid_request_error") == 1
    assert delta(req, model="openai/text-embedding-3-small", api="embeddings", status_class="2xx") == 1
    assert delta("llm_proxy_upstream_errors_total", provider="openai") == 1
    assert delta("gen_ai_server_time_to_first_token_seconds_count", gen_ai_request_model="openai/gpt-4o") == 1
    assert delta("gen_ai_client_token_usage_count", gen_ai_token_type="input", gen_ai_operation_name="chat") == 2
    assert delta("gen_ai_client_operation_duration_seconds_count", gen_ai_operation_name="embeddings") == 1
    events = list(mproxy.services.usage.events)[-5:]  # type: ignore[attr-defined]
    prompt = sum(e.prompt_tokens or 0 for e in events if e.endpoint == "chat.completions")
    assert delta("llm_proxy_tokens_total", api="chat.completions", type="prompt") == prompt  # the ledger's counts
    assert "secret-token-abc" not in r.text and "bob" not in r.text and "anonymous" not in r.text
    assert value(after, "process_resident_memory_bytes") > 0  # one process: its own numbers are there


def test_metrics_can_be_limited_to_networks_or_turned_off(emulator: Emulator) -> None:
    cfg = basic_config(emulator.base_url, "server: {metrics: {allow: [10.0.0.0/8]}}")
    with ProxyServer(native_config(cfg)) as px:
        r = httpx.get(px.url + "/metrics", timeout=10)
        assert r.status_code == 403
        assert r.json()["error"]["code"] == "metrics_not_allowed"
    cfg = basic_config(emulator.base_url, "server: {metrics: {allow: [127.0.0.0/8], path: /internal/metrics}}")
    with ProxyServer(native_config(cfg)) as px:
        assert httpx.get(px.url + "/internal/metrics", timeout=10).status_code == 200
        assert httpx.get(px.url + "/metrics", timeout=10).status_code == 404
    with ProxyServer(native_config(basic_config(emulator.base_url, "server: {metrics: {enabled: false}}"))) as px:
        assert httpx.get(px.url + "/metrics", timeout=10).status_code == 404


def test_scrapes_by_pod_address_pass_the_host_check(emulator: Emulator) -> None:
    # Prometheus scrapes the pod's IP, like the kubelet's probes: the Host check must not refuse it.
    cfg = basic_config(emulator.base_url, "server: {allowed_hosts: [llm-proxy.example.com]}")
    with ProxyServer(native_config(cfg)) as px:
        pod = {"host": "10.1.2.3:8321"}
        assert httpx.get(px.url + "/metrics", headers=pod, timeout=10).status_code == 200
        assert httpx.get(px.url + "/v1/health", headers=pod, timeout=10).status_code == 200
        assert httpx.get(px.url + "/v1/models", headers=pod, timeout=10).status_code == 421


def test_bad_allow_network_is_a_config_error(emulator: Emulator) -> None:
    from llm_proxy.errors import ConfigError

    with pytest.raises(ConfigError) as ei:
        native_config(basic_config(emulator.base_url, "server: {metrics: {allow: [not-a-net]}}"))
    assert "not-a-net" in str(ei.value)


def test_jwks_refresh_failures_are_counted(emulator: Emulator) -> None:
    dead = f"http://127.0.0.1:{free_port()}/realms/x"  # nothing listens: discovery fails
    text = basic_config(emulator.base_url).replace(
        "auth: {mode: none, allow_unauthenticated: true}",
        f"auth: {{mode: oidc, oidc: {{issuers: [{{issuer: '{dead}', audiences: [x]}}]}}}}",
    )
    with ProxyServer(native_config(text)) as px:
        s = scrape(px.url)
        assert value(s, "llm_proxy_auth_refresh_failures_total", mode="oidc") >= 1


def test_ledger_backlog_and_journal_bytes_while_the_database_is_away(emulator: Emulator, tmp_path: Path) -> None:
    from llm_proxy.core.usage import UsageLedger

    from .store.dbutil import config_text

    dead_db = f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nothing"  # nothing listens there
    loaded = native_config(config_text(emulator.base_url, dead_db, tmp_path / "spool"))
    with ProxyServer(loaded, usage=UsageLedger.from_config(loaded)) as px:
        c = openai.OpenAI(base_url=px.base_url, api_key="k", max_retries=0)
        for _ in range(3):
            c.chat.completions.create(model="openai/gpt-4o", messages=MSG)
        s = scrape(px.url)
        assert value(s, "llm_proxy_ledger_backlog_rows") == 3
        assert value(s, "llm_proxy_journal_bytes") > 0


# ---- two worker processes -----------------------------------------------------------------------------


async def _serve_two_workers(cfg: Path, port: int, tmp: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "TMPDIR": str(tmp)}  # where the parent makes the workers' metrics directory
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llm_proxy", "serve", "--config", str(cfg), "--workers", "2",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, env=env,
    )
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient() as c:
        while True:
            try:
                if (await c.get(f"http://127.0.0.1:{port}/v1/health")).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "workers did not start"
            await asyncio.sleep(0.05)
    # Both workers listening: each writes its file at start.
    while len(list(tmp.glob("llm-proxy-metrics-*/w-*.json"))) < 2:
        assert time.monotonic() < deadline, "workers did not start"
        await asyncio.sleep(0.05)
    return proc


async def test_two_workers_scrapes_agree(emulator: Emulator, tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(basic_config(emulator.base_url, f"server: {{port: {port}, drain_delay_seconds: 0}}\n"
                                "usage: {enabled: false}"))
    shared = tmp_path / "tmp"
    shared.mkdir()
    proc = await _serve_two_workers(cfg, port, shared)
    n = 60
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            for i in range(n):  # a new connection each: SO_REUSEPORT spreads them over both workers
                r = await c.post("/v1/chat/completions", headers={"connection": "close"},
                                 json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": str(i)}]})
                assert r.status_code == 200

            async def total() -> tuple[float, float]:
                r = await c.get("/metrics", headers={"connection": "close"})
                s = parse(r.text)
                return value(s, "llm_proxy_requests_total"), value(s, "llm_proxy_workers")

            deadline = time.monotonic() + 10
            while await total() != (n, 2):  # the other worker's totals are at most a second old
                assert time.monotonic() < deadline, await total()
                await asyncio.sleep(0.1)
            seen = [await total() for _ in range(20)]
        assert seen == [(n, 2)] * 20
        import orjson

        files = list(shared.glob("llm-proxy-metrics-*/w-*.json"))
        per_worker = [sum(v[0] for _, v in orjson.loads(f.read_bytes())["llm_proxy_requests"]) for f in files]
        assert len(per_worker) == 2 and all(k > 0 for k in per_worker), per_worker  # both served requests
        assert sum(per_worker) == n
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    assert not list(shared.glob("llm-proxy-metrics-*"))  # the parent removes the directory
